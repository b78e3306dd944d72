"""The DeepSpeed engine the trainer steps: its configuration, optimizer, learning-rate schedule,
and the module it wraps (`PolicyLogps`, whose forward is the completion log-probs).

`TorchEngine` implements the same small interface in plain torch for one process, so the update
step (`training.update.train_on_batch`) can be tested in milliseconds without DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from grpo_split.config.parsing import ConfigError
from grpo_split.config.trainer import RunConfig
from grpo_split.modeling import completion_logps, completion_loss
from grpo_split.training.checkpoint import has_zero_optimizer_state, resolve_resume

# DeepSpeed sizes its gradient-reduction bucket at 5e8 elements unless told otherwise: 2 GB in float32
# (twice that with overlap_comm), allocated on every rank whatever the model's size. That default
# suits large models on many GPUs; for the rest we size the bucket to the model the way the Hugging
# Face integration's "auto" does, hidden_size^2 elements (3 MB at Qwen2.5-0.5B's 896, 51 MB at
# 7B's 3584); gradients larger than the bucket bypass it (DeepSpeed reduces them on their own).
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def deepspeed_config(config: RunConfig, world_size: int, rows_per_rank: int, dtype: torch.dtype,
                     hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON (or our default, `default_zero_stage`, when none is given) with batch sizes,
    clipping and precision from our config: those must agree with how the trainer splits its batches,
    so ours win over the file.

    Settings the file leaves out are ours to choose: the reduce bucket is sized to the model
    (`hidden_size`^2 elements, see DEEPSPEED_DEFAULT_BUCKET) rather than DeepSpeed's 5e8. Where
    DeepSpeed steps our torch optimizer as it is (`plain_optimizer_step`: no ZeRO, float32),
    `gradient_clipping` is 0 and the optimizer clips instead (`build_engine`), since DeepSpeed
    would clip there without keeping the gradient norm the metrics report."""
    training = config.training
    if training.deepspeed is None:
        stage = default_zero_stage(world_size, dtype)
        if stage == 0 and resumes_zero_checkpoint(training):
            stage = 2  # written under the earlier default (ZeRO-2): stage 0 cannot load its optimizer state
        ds = {"zero_optimization": {"stage": stage}}
    else:
        try:
            ds = json.loads(Path(training.deepspeed).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"deepspeed={training.deepspeed!r} is not a readable DeepSpeed JSON file: {exc}") from exc
    micro = rows_per_rank // training.gradient_accumulation_steps
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    ds["train_batch_size"] = micro * training.gradient_accumulation_steps * world_size
    ds["gradient_clipping"] = training.max_grad_norm
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == torch.float16}
    ds.setdefault("steps_per_print", 10**9)  # our own progress bar and metrics replace DeepSpeed's prints
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # save_pretrained needs the full weights on rank 0 (consolidated from the partitions).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if zero.get("stage", 0) > 0 and hidden_size:
        zero.setdefault("reduce_bucket_size", min(DEEPSPEED_DEFAULT_BUCKET, hidden_size**2))
    if training.optim == "sgd" and "optimizer" not in ds:
        # ZeRO vets the optimizer class against a list of Adam variants, and with optimizer offload
        # insists on its own CPU Adam; SGD only ever sees the flat fp32 partitions ZeRO hands it,
        # on whichever device they live, which any torch optimizer handles.
        ds["zero_allow_untested_optimizer"] = True
        ds["zero_force_ds_cpu_optimizer"] = False
    if "optimizer" in ds:  # e.g. DeepSpeedCPUAdam for optimizer offload; fill in our values for "auto"
        params = ds["optimizer"].setdefault("params", {})
        for key, value in (("lr", training.learning_rate), ("weight_decay", training.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
    if plain_optimizer_step(ds):
        ds["gradient_clipping"] = 0.0  # the optimizer clips (build_engine), and keeps the norm
    return ds


def default_zero_stage(world_size: int, dtype: torch.dtype) -> int:
    """The ZeRO stage when no DeepSpeed JSON is given: 2 (optimizer state and gradients partitioned
    over the ranks), except for one float32 process, which gets stage 0.

    ZeRO-1/2/3 keep float32 master weights apart from the model's: a second full copy in float32
    training, and on one process nothing is partitioned, so nothing is saved in exchange. Measured
    at Qwen2.5-0.5B's shape, float32, one process (scripts/bench_memory.py, 7.4 GiB of weights,
    gradients and Adam state): ZeRO-2 peaked at 14.3 GiB, stage 0 at 11.0. ZeRO-2 held, besides its
    master copy (1.8 GiB), a flat gradient partition (1.8), a 5e8-element reduce bucket during
    backward (1.8), a flat copy of the gradient at the step (1.8) and AdamW's temporaries on the one
    flat 494M-element tensor it steps (2 x 1.8). With half precision the master copy is needed
    anyway (DeepSpeed's bf16/fp16 optimizers keep one at stage 0 too), so ZeRO-2 stays.
    """
    return 0 if world_size == 1 and dtype == torch.float32 else 2


def resumes_zero_checkpoint(training) -> bool:
    """True when the run resumes a checkpoint whose optimizer state ZeRO partitioned (a run started,
    with no DeepSpeed JSON, before one process defaulted to stage 0): DeepSpeed at stage 0 fails to
    load it, in the optimizer's load_state_dict, so that run keeps ZeRO-2."""
    checkpoint = resolve_resume(Path(training.output_dir), training.resume_from_checkpoint)
    return checkpoint is not None and has_zero_optimizer_state(checkpoint)


def plain_optimizer_step(ds: dict) -> bool:
    """True when DeepSpeed steps our torch optimizer on the model's own parameters: no ZeRO, no
    fp16/bf16 wrapper, no optimizer of DeepSpeed's."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    half = ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    return stage == 0 and not half and "optimizer" not in ds


def clip_in_optimizer_step(optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Clip the gradient (norm `max_grad_norm`; none when 0) at the start of every `optimizer.step()`
    and keep its norm where DeepSpeed's engine reads it after the step (`optimizer._global_grad_norm`,
    what ZeRO's and the bf16/fp16 optimizers set): as `TorchEngine.step` does. DeepSpeed clips a
    plain optimizer's gradient itself but drops the norm, so `grad_norm` would be missing."""
    limit = max_grad_norm if max_grad_norm > 0 else math.inf

    def clip(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))

    optimizer._global_grad_norm = None
    optimizer.register_step_pre_hook(clip)


def lr_lambda(scheduler_type: str, warmup_steps: int, total_updates: int):
    """Multiplier of the base learning rate after `n` optimizer updates: linear warmup, then the schedule."""

    def factor(n: int) -> float:
        if n < warmup_steps:
            return (n + 1) / (warmup_steps + 1)
        if scheduler_type == "constant":
            return 1.0
        progress = min(1.0, (n - warmup_steps) / max(1, total_updates - warmup_steps))
        if scheduler_type == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class PolicyLogps(torch.nn.Module):
    """The policy as DeepSpeed sees it: its forward is the completion log-probs (B, C) of a batch.

    Every training forward must run through the engine (`engine(...)`, i.e. `engine.forward`):
    ZeRO counts micro-batches and resets its gradient bookkeeping there. Calling `engine.module`
    directly skips that, and under ZeRO-3 with gradient accumulation each micro-batch's gradient
    then replaced the previous one (measured: the update was the last micro-batch's alone). Making
    the log-prob computation itself the wrapped module's forward routes it through DeepSpeed.
    The causal LM is `.policy` (generation, save_pretrained).

    With `loss_inputs` (the keyword arguments of `modeling.completion_loss` after the temperature),
    the forward returns the GRPO loss and its metrics instead, with the loss fused into the LM head.
    """

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float, loss_inputs: dict | None = None):
        if loss_inputs is not None:
            return completion_loss(self.policy, input_ids, attention_mask, prompt_length, temperature,
                                   **loss_inputs)
        return completion_logps(self.policy, input_ids, attention_mask, prompt_length, temperature)


def make_optimizer(training, parameters) -> torch.optim.Optimizer:
    """`optim`: AdamW, or plain SGD (whose update is -lr x gradient)."""
    if training.optim == "sgd":
        return torch.optim.SGD(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)


def build_engine(config: RunConfig, model, world_size: int, dtype: torch.dtype):
    """The DeepSpeed engine around `PolicyLogps(model)`, with our optimizer and LR schedule."""
    import deepspeed

    training, rollout = config.training, config.rollout
    rows_per_rank = rollout.prompts_per_step // world_size * rollout.num_generations
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    ds_config = deepspeed_config(config, world_size, rows_per_rank, dtype,
                                 hidden_size=hidden_size if isinstance(hidden_size, int) else None)
    wrapped = PolicyLogps(model)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = make_optimizer(training, wrapped.parameters())
        if plain_optimizer_step(ds_config):
            clip_in_optimizer_step(optimizer, training.max_grad_norm)
    elif training.optim != "adamw_torch":
        raise ConfigError(f"optim={training.optim!r} conflicts with the optimizer section of {training.deepspeed}; "
                          "remove one of them")

    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                      lr_scheduler=lambda opt: make_lr_scheduler(config, opt),
                                      model_parameters=None if optimizer else wrapped.parameters(), config=ds_config)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank is the identity, yet DeepSpeed would flatten every gradient into
        # 5e8-element buckets to run it at each accumulation boundary: a copy of the whole gradient
        # (1.8 GiB at Qwen2.5-0.5B's shape in float32; it raised the measured peak by 0.9 GiB).
        engine.enable_backward_allreduce = False
    return engine


def make_lr_scheduler(config: RunConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then the configured schedule, stepped once per optimizer update."""
    training = config.training
    total_updates = training.max_steps * config.loss.num_iterations
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(training.lr_scheduler_type, training.warmup_steps, total_updates))


class TorchEngine:
    """The engine interface `train_on_batch` uses, in plain torch for one process.

    It does for the update what DeepSpeed does without ZeRO: `backward` divides the loss by the
    accumulation steps, and `step` at the accumulation boundary clips the gradient, steps the
    optimizer and the LR schedule, and clears the gradient. Tests of the update step use it to run
    in milliseconds; `scripts/check_update_invariance.py` checks the real engine against the same
    float64 reference.
    """

    def __init__(self, config: RunConfig, model):
        self.module = PolicyLogps(model)
        self.optimizer = make_optimizer(config.training, self.module.parameters())
        self.lr_scheduler = make_lr_scheduler(config, self.optimizer)
        self.gradient_accumulation_steps = config.training.gradient_accumulation_steps
        self.max_grad_norm = config.training.max_grad_norm
        self.device = next(model.parameters()).device
        self._micro_steps = 0
        self._grad_norm: float | None = None

    def __call__(self, *inputs):
        return self.module(*inputs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def step(self) -> None:
        self._micro_steps += 1
        if self._micro_steps % self.gradient_accumulation_steps:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self._grad_norm
