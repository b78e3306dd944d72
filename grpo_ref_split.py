"""GRPO training with the reference model split out into an HTTP server (`ref_server.py`).

Launch (the reference server first, on its own GPU or machine, when beta > 0):

    python ref_server.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --device cuda:0
    CUDA_VISIBLE_DEVICES=1,2,3 deepspeed grpo_ref_split.py --config configs/gsm8k_qwen2.5.yaml
    deepspeed --hostfile hosts grpo_ref_split.py --config ...             # several nodes
    python grpo_ref_split.py --config configs/toy_cpu.yaml --max_steps 2  # one process, for debugging
    python grpo_ref_split.py --config ... --mode generate                 # a generation worker

One training step, as `train()` below reads:
  1. take `prompts_per_step` prompts (each rank an equal share), apply the chat template;
  2. sample `num_generations` completions per prompt with the policy;
  3. score them with the reward functions; group-relative advantages;
  4. reference log-probs from the server (`POST /logps`) when beta > 0; old log-probs when
     `num_iterations` > 1;
  5. `num_iterations` optimizer passes of the clipped GRPO loss with the k3 KL term, per-token
     log-probs from the fused LM head on the final hidden states (no (B, T, V) logits).
With `rollout_source: server`, steps 1-4 come from generation workers through the server's queue.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from grpo_common import checkpoint as ckpt
from grpo_common import distributed as dist_utils
from grpo_common.client import RefServerClient, RefServerError
from grpo_common.config import ConfigError, config_to_yaml, parse_config
from grpo_common.data import PromptOrder, load_prompt_dataset
from grpo_common.metrics import MetricsLogger
from grpo_common.modeling import DTYPES, completion_logps, lm_head_plan
from grpo_common.rewards import RewardFunctionError, load_reward_funcs
from grpo_common.rollout import (
    Rollouts,
    SamplingSettings,
    batch_rollout_view,
    encode_prompts,
    eos_token_ids,
    make_rollouts,
    overridden_generation_defaults,
    policy_logps,
    rollout_metrics,
)
from grpo_common.train_config import CONFIG_TYPES, RunConfig, check_run_layout
from grpo_common.wire import Batch, decode_batch, encode_batch
from stable_ops import policy_loss, reward_moments, reward_std_from_moments

# ----------------------------------------------------------------------------------- configuration


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK in the environment says the same)."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--local_rank":
            skip_next = True
        elif not arg.startswith("--local_rank="):
            kept.append(arg)
    return kept


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    """`--config FILE.yaml` plus command-line overrides -> RunConfig (ConfigError names a bad field)."""
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    try:
        sections = parse_config(CONFIG_TYPES, argv)
    except ValueError as exc:  # a __post_init__ check; ConfigError is a ValueError too
        raise ConfigError(str(exc)) from exc
    config = RunConfig(*sections)
    try:  # import user reward modules now: a typo should fail before any model is loaded
        load_reward_funcs(config.rollout.reward_funcs)
    except ValueError as exc:
        raise ConfigError(f"reward_funcs: {exc}") from exc
    return config


def resolve_train_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def deepspeed_config(config: RunConfig, world_size: int, rows_per_rank: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON (or ZeRO-2 when none is given) with batch sizes, clipping and precision from
    our config: those must agree with how the trainer splits its batches, so ours win over the file."""
    training = config.training
    if training.deepspeed is None:
        ds = {"zero_optimization": {"stage": 2}}
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
    return ds


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


# ----------------------------------------------------------------------------------- models


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ConfigError(f"model_name_or_path={path!r}: the tokenizer has no chat_template; GRPO prompts are "
                          "chat-formatted, so use an instruct/chat model or add a template to tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out, so any id works; EOS is what most chat models use.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(path: str, dtype: torch.dtype, gradient_checkpointing: bool = False, announce: bool = False):
    """The causal LM to train or sample from, with its LM-head plan checked (printed with `announce`)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"model_name_or_path={path!r} could not be loaded: {exc}") from exc
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    # Checked here, on the full weights: under ZeRO-3 they are partitioned placeholders later.
    plan = lm_head_plan(model)
    if announce:
        print(f"LM head: {plan.reason}", flush=True)
    return model


class PolicyLogps(torch.nn.Module):
    """The policy as DeepSpeed sees it: its forward is the completion log-probs (B, C) of a batch.

    Every training forward must run through the engine (`engine(...)`, i.e. `engine.forward`):
    ZeRO counts micro-batches and resets its gradient bookkeeping there. Calling `engine.module`
    directly skips that, and under ZeRO-3 with gradient accumulation each micro-batch's gradient
    then replaced the previous one (measured: the update was the last micro-batch's alone). Making
    the log-prob computation itself the wrapped module's forward routes it through DeepSpeed.
    The causal LM is `.policy` (generation, save_pretrained).
    """

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                temperature: float) -> torch.Tensor:
        return completion_logps(self.policy, input_ids, attention_mask, prompt_length, temperature)


def make_optimizer(training, parameters):
    if training.optim == "sgd":
        return torch.optim.SGD(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)


def build_engine(config: RunConfig, model, world_size: int, dtype: torch.dtype):
    """The DeepSpeed engine around `PolicyLogps(model)`, with our optimizer and LR schedule."""
    import deepspeed

    training, rollout = config.training, config.rollout
    rows_per_rank = rollout.prompts_per_step // world_size * rollout.num_generations
    ds_config = deepspeed_config(config, world_size, rows_per_rank, dtype)
    total_updates = training.max_steps * config.loss.num_iterations
    wrapped = PolicyLogps(model)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = make_optimizer(training, wrapped.parameters())
    elif training.optim != "adamw_torch":
        raise ConfigError(f"optim={training.optim!r} conflicts with the optimizer section of {training.deepspeed}; "
                          "remove one of them")

    def make_scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(training.lr_scheduler_type, training.warmup_steps, total_updates))

    engine, *_ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=make_scheduler,
                                      model_parameters=None if optimizer else wrapped.parameters(), config=ds_config)
    return engine


# ----------------------------------------------------------------------------------- one step


class PeerRankFailed(RuntimeError):
    """Another rank failed at a point where this one waited for it; that rank prints the cause."""


class StopRequested:
    """Ctrl-C or SIGTERM sets a flag; the loop finishes its step, saves, and exits (ranks agree first)."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put back the handlers that were there before (the trainer may run inside a larger program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then exiting "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def zero_loss(engine, batch: Batch) -> torch.Tensor:
    """A loss of exactly 0 whose backward visits every parameter (2 tokens through the model).

    Stands in for a micro-batch whose loss was not finite: DeepSpeed's gradient-accumulation
    bookkeeping needs a forward, a backward and a step per micro-batch on every rank, and this one
    adds a zero gradient instead of NaN.
    """
    ids = batch.input_ids[:1, :2].to(engine.device)
    return engine(ids, torch.ones_like(ids), 1, 1.0).float().sum() * 0.0


def engine_logps(engine, batch: Batch, rows: slice, grad: bool) -> torch.Tensor:
    """(b, C) float32 completion log-probs of `batch`'s `rows` through the engine's forward."""
    device = engine.device
    with torch.set_grad_enabled(grad):
        return engine(batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device), batch.prompt_length,
                      batch.temperature).float()


def train_on_batch(engine, batch: Batch, config: RunConfig, world_size: int) -> dict[str, float]:
    """`num_iterations` optimizer updates on one batch; returns this rank's loss metrics (means).

    The batch is split into `gradient_accumulation_steps` micro-batches; DeepSpeed divides each
    micro-batch loss by that number and steps the optimizer at the last one.
    """
    loss_cfg, training = config.loss, config.training
    GA = training.gradient_accumulation_steps
    rows = batch.batch_size // GA
    parts = [slice(m * rows, (m + 1) * rows) for m in range(GA)]
    mask = batch.completion_mask
    old_logps = batch.old_logps
    if old_logps is None and loss_cfg.num_iterations > 1:
        # The sampling policy's log-probs, frozen for all passes (TRL's mu > 1): forwards, no graph.
        engine.eval()
        old_logps = torch.cat([engine_logps(engine, batch, part, grad=False).cpu() for part in parts])
        engine.train()
    # DAPO normalizes by the tokens of the whole step on all ranks; DeepSpeed averages ranks and
    # micro-batches, so each micro-batch divides by (global tokens / (ranks x GA)).
    global_tokens = dist_utils.all_reduce_sum([float(mask.sum())])[0]
    num_items = max(global_tokens, 1.0) / (world_size * GA)

    # Loss metrics of the whole step, whatever the micro-batching: each micro-batch's value weighs
    # what it averages over (its tokens; its sequences for GSPO's per-sequence clip metrics), so
    # with GA 2 a step logs what GA 1 logs. `loss` itself weighs each micro-batch equally: that is
    # the quantity DeepSpeed averages into the gradient.
    totals: dict[str, list[float]] = {}  # key -> [weighted sum, weight]
    per_sequence = loss_cfg.importance_sampling_level == "sequence"
    nonfinite = 0
    grad_norms = []
    learning_rate = math.nan
    for _ in range(loss_cfg.num_iterations):
        poisoned = False
        for m, part in enumerate(parts):
            loss = None
            if not poisoned:
                logps = engine_logps(engine, batch, part, grad=True)  # (b, C) float32, carries the gradient
                device = logps.device
                loss, metrics = policy_loss(
                    logps,
                    None if old_logps is None else old_logps[part].to(device),
                    None if batch.ref_logps is None else batch.ref_logps[part].to(device),
                    batch.advantages[part].to(device),
                    mask[part].to(device),
                    beta=loss_cfg.beta,
                    epsilon_low=loss_cfg.epsilon,
                    epsilon_high=loss_cfg.epsilon_high,
                    loss_type=loss_cfg.loss_type,
                    max_completion_length=config.rollout.max_completion_length,
                    importance_sampling_level=loss_cfg.importance_sampling_level,
                    num_items=num_items,
                )
                # One scalar collective per micro-batch: every rank must skip together, or the
                # gradient all-reduce inside backward would pair up different micro-batches.
                poisoned = dist_utils.any_rank(not bool(torch.isfinite(loss)))
                if poisoned:
                    print(f"warning: non-finite loss ({float(loss.detach())}) on a micro-batch of some rank: this "
                          "update is skipped (counted in nonfinite_steps)", file=sys.stderr, flush=True)
                if not poisoned:
                    tokens, sequences = float(mask[part].sum()), float(part.stop - part.start)
                    weights = {key: sequences if per_sequence and key != "kl" else tokens for key in metrics}
                    for key, value in {"loss": loss, **metrics}.items():
                        total = totals.setdefault(key, [0.0, 0.0])
                        total[0] += float(value.detach()) * weights.get(key, 1.0)
                        total[1] += weights.get(key, 1.0)
            if poisoned:
                loss = zero_loss(engine, batch)
            engine.backward(loss)
            if m == GA - 1:
                learning_rate = float(engine.optimizer.param_groups[0]["lr"])  # this update's scheduled rate
            if m == GA - 1 and poisoned:
                # Skip the update: no parameter moves with a learning rate of 0 (the finite micro-batches'
                # gradients still reach Adam's moments, which keeps them finite too). The scheduler steps
                # inside engine.step() and writes the next update's rate into the groups itself, so
                # nothing is restored afterwards: the skipped update uses up its own slot of the
                # schedule, and the next one gets its own rate.
                for group in engine.optimizer.param_groups:
                    group["lr"] = 0.0
                engine.step()
                nonfinite += 1
            else:
                engine.step()
        norm = engine.get_global_grad_norm()
        if norm is not None and not poisoned:
            grad_norms.append(float(norm))
    result = {key: total / weight if weight > 0 else 0.0 for key, (total, weight) in totals.items()}
    result["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
    result["nonfinite_updates"] = float(nonfinite)
    result["learning_rate"] = learning_rate
    # What each mean above weighs when ranks are combined (step_metrics); 1 for the rest.
    result["weights"] = {key: weight for key, (_, weight) in totals.items()}
    return result


# ----------------------------------------------------------------------------------- rollouts


class LocalRollouts:
    """Rollouts generated by this rank from its share of the prompts."""

    def __init__(self, config: RunConfig, tokenizer, model, rank: int, world_size: int):
        data, rollout = config.data, config.rollout
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size
        dataset = load_prompt_dataset(data.dataset_name, data.dataset_split, data.prompt_column, data.answer_column,
                                      data.dataset_config)
        self.rows, self.skipped_prompts = self._fitting_rows(dataset)
        if not self.rows:
            raise ConfigError(f"max_prompt_length={data.max_prompt_length}: every prompt of {data.dataset_name} is "
                              "longer than this after the chat template; raise it")
        self.order = PromptOrder(len(self.rows), config.training.seed)
        self.reward_funcs = load_reward_funcs(rollout.reward_funcs)
        self.settings = SamplingSettings(rollout.num_generations, rollout.max_completion_length,
                                         rollout.temperature, rollout.top_p)
        self.eos_ids = eos_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id
        ignored = overridden_generation_defaults(model, self.settings)
        if ignored and rank == 0:
            shown = ", ".join(f"{key}={value!r}" for key, value in ignored.items())
            print(f"sampling from softmax(logits / {rollout.temperature:g}) with top_p={rollout.top_p:g}, as the loss "
                  f"assumes; not applied from the model's generation_config.json: {shown}", flush=True)

    def _fitting_rows(self, dataset) -> tuple[list[dict], int]:
        """Rows whose chat-formatted prompt fits max_prompt_length (filtered once, identically on every rank)."""
        data = self.config.data
        rows = dataset.to_list()
        lengths = [len(ids) for ids in encode_prompts(self.tokenizer, [r[data.prompt_column] for r in rows],
                                                      data.system_prompt)]
        kept = [row for row, n in zip(rows, lengths, strict=True) if n <= data.max_prompt_length]
        return kept, len(rows) - len(kept)

    def next(self, model, policy_version: int) -> Rollouts:
        per_rank = self.config.rollout.prompts_per_step // self.world_size
        indices = self.order.take(self.config.rollout.prompts_per_step)  # same on every rank
        mine = [self.rows[i] for i in indices[self.rank * per_rank : (self.rank + 1) * per_rank]]
        rollout = self.config.rollout
        return make_rollouts(
            model, self.tokenizer, mine, prompt_column=self.config.data.prompt_column,
            answer_column=self.config.data.answer_column,
            system_prompt=self.config.data.system_prompt, settings=self.settings, reward_funcs=self.reward_funcs,
            reward_weights=rollout.reward_weights, scale_rewards=rollout.scale_rewards,
            mask_truncated=rollout.mask_truncated_completions, policy_version=policy_version, eos_ids=self.eos_ids,
            pad_id=self.pad_id, step_reward_std=step_reward_std if self.world_size > 1 else None,
        )


def step_reward_std(rewards: torch.Tensor) -> float:
    """Std of the scored rewards of the whole step, over every rank's share (one all-reduce)."""
    return reward_std_from_moments(*dist_utils.all_reduce_sum(reward_moments(rewards)))


class ServerRollouts:
    """Scored batches that generation workers uploaded, leased from the server's queue (GET /get).

    The contract: one uploaded batch is one training step, `prompts_per_step` prompts x
    `num_generations` completions (a worker, a world of one, builds exactly that). Rank 0 leases it
    and sends it to every rank, and each rank trains on its own `prompts_per_step / ranks` groups,
    so a worker-fed step has the shape of a local step with the same configuration: the same rows
    per rank, micro-batches and DeepSpeed batch sizes. Rank 0 acknowledges it after the update.
    """

    def __init__(self, config: RunConfig, client: RefServerClient | None, rank: int, world_size: int):
        self.config, self.client, self.rank, self.world_size = config, client, rank, world_size
        self.stale_dropped = 0
        self.leased: list[str] = []

    def next(self, policy_version: int) -> Batch:
        payload = None
        if self.rank == 0:
            try:
                payload = encode_batch(self._lease(policy_version))
            except BaseException:
                dist_utils.broadcast_bytes(None)  # release the other ranks, then fail with the real error
                raise
        payload = dist_utils.broadcast_bytes(payload)
        if payload is None:
            raise PeerRankFailed("rank 0 could not get a rollout batch from the server queue; its error is above")
        return rank_share(decode_batch(payload), self.rank, self.world_size)

    def _lease(self, policy_version: int) -> Batch:
        server, rollout = self.config.server, self.config.rollout
        deadline = time.monotonic() + server.rollout_wait
        delay = 0.05
        while True:
            batch = self.client.get(lease_seconds=max(server.ref_server_timeout, 600.0))
            if batch is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no rollout batch arrived from the server queue for {server.rollout_wait:g} s "
                        "(rollout_source=server): start generation workers with `python grpo_ref_split.py --config "
                        "... --mode generate` pointing at the same ref_server_url and output_dir"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if batch.policy_version < policy_version - server.max_staleness:
                self.client.ack(batch.batch_id)  # consumed by dropping it; never trained on
                self.stale_dropped += 1
                continue
            if batch.advantages is None or batch.completion_mask is None or batch.old_logps is None:
                raise ValueError(f"batch {batch.batch_id} from the queue lacks advantages, completion_mask or "
                                 "old_logps; generation workers must upload complete rollouts")
            expected = rollout.prompts_per_step * rollout.num_generations
            if batch.batch_size != expected or batch.num_generations != rollout.num_generations:
                raise ConfigError(
                    f"batch {batch.batch_id} from the queue has {batch.batch_size} rows in groups of "
                    f"{batch.num_generations}; this trainer's step is prompts_per_step x num_generations = "
                    f"{rollout.prompts_per_step} x {rollout.num_generations} = {expected} rows. One uploaded batch is "
                    "one training step: give the generation workers the trainer's prompts_per_step and "
                    "num_generations"
                )
            if batch.attention_mask is None:
                batch.attention_mask = torch.ones_like(batch.input_ids)
            self.leased.append(batch.batch_id)
            return batch

    def ack_all(self) -> None:
        for batch_id in self.leased:
            self.client.ack(batch_id)
        self.leased.clear()


def rank_share(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s consecutive 1/world_size of the rows of a whole-step batch (whole groups each,
    since prompts_per_step is a multiple of the ranks), every per-row field sliced alike."""
    rows = batch.batch_size // world_size
    part = slice(rank * rows, (rank + 1) * rows)
    per_row = {f.name: getattr(batch, f.name)[part] for f in dataclasses.fields(batch)
               if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **per_row)


# ----------------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, tokenizer, config: RunConfig, step: int, state: dict, rank: int) -> Path:
    """HF model + tokenizer (rank 0, consolidated under ZeRO-3), DeepSpeed state (all ranks), RNG, then
    trainer_state.json and the rename that makes the checkpoint visible."""
    output_dir = Path(config.training.output_dir)
    final = ckpt.checkpoint_dir(output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist_utils.barrier()
    save_hf_model(engine, partial, rank)
    if rank == 0:
        tokenizer.save_pretrained(partial)
    engine.save_checkpoint(str(partial), tag=ckpt.DEEPSPEED_TAG)
    ckpt.save_rng_state(partial, rank)
    dist_utils.barrier()
    if rank == 0:
        ckpt.write_json_atomic(partial / ckpt.TRAINER_STATE, state)
        if final.exists():
            import shutil

            shutil.rmtree(final)
        partial.rename(final)
        ckpt.prune_checkpoints(output_dir, config.training.save_total_limit)
    dist_utils.barrier()
    return final


def save_hf_model(engine, directory: Path, rank: int) -> None:
    """`save_pretrained` of the policy. Under ZeRO-3 every rank takes part in gathering the weights."""
    state_dict = policy_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        engine.module.policy.save_pretrained(directory, state_dict=state_dict)


def policy_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The causal LM's full state dict on rank 0 (consolidated from the partitions under ZeRO-3), with
    the names `from_pretrained` expects; None where it is the model's own (no ZeRO-3)."""
    if engine.zero_optimization_stage() != 3:
        return None
    prefix = "policy."
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # names of PolicyLogps: "policy.<name>"
    return None if state_dict is None else {key.removeprefix(prefix): value for key, value in state_dict.items()}


def generation_context(engine):
    """Under ZeRO-3, gather the full weights for `generate` (each layer would otherwise be gathered
    once per generated token); otherwise nothing to do."""
    import contextlib

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------- training


def train(config: RunConfig) -> int:
    from tqdm import tqdm

    rank, world_size, _ = dist_utils.init_distributed()
    check_run_layout(config, world_size)
    training, rollout, server = config.training, config.rollout, config.server
    output_dir = Path(training.output_dir)
    torch.manual_seed(training.seed + rank)  # different samples on each rank, reproducible per rank
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_to_yaml(*config.all()))
        (output_dir / ckpt.DONE_MARKER).unlink(missing_ok=True)
        print(f"resolved configuration (also in {output_dir / 'config.yaml'}):\n{config_to_yaml(*config.all())}",
              flush=True)

    dtype = resolve_train_dtype(config.model.dtype)
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    model = load_policy(config.model.model_name_or_path, dtype, config.model.gradient_checkpointing,
                        announce=rank == 0)
    source = None if server.rollout_source == "server" else LocalRollouts(config, tokenizer, model, rank, world_size)
    eos_ids = eos_token_ids(tokenizer, model)
    engine = build_engine(config, model, world_size, dtype)
    engine.train()

    client = None
    if config.loss.beta > 0 or server.rollout_source == "server":
        client = RefServerClient(server.ref_server_url, token=server.ref_server_token,
                                 timeout=server.ref_server_timeout, max_retries=server.ref_server_retries)
        info = client.wait_ready(timeout=server.ref_server_wait)
        if rank == 0:
            print(f"reference server ready: {info}", flush=True)
    queue = ServerRollouts(config, client, rank, world_size) if server.rollout_source == "server" else None

    # Resume: model, optimizer and scheduler from DeepSpeed; prompt order, counters and RNG from ours.
    start_step, counters = 0, {"nonfinite_steps": 0, "stale_batches": 0}
    resume = ckpt.resolve_resume(output_dir, training.resume_from_checkpoint)
    if resume is not None:
        loaded, _ = engine.load_checkpoint(str(resume), tag=ckpt.DEEPSPEED_TAG)
        if loaded is None:
            raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {resume / ckpt.DEEPSPEED_TAG}")
        state = ckpt.read_trainer_state(resume)
        start_step = state["step"]
        counters.update(state.get("counters", {}))
        if source is not None and state.get("prompt_order") is not None:
            source.order.load_state_dict(state["prompt_order"])
        if not ckpt.load_rng_state(resume, rank) and rank == 0:
            print(f"warning: {resume} has no RNG state for rank {rank}; sampling continues from a fresh seed",
                  file=sys.stderr)
        if rank == 0:
            print(f"resumed from {resume} at step {start_step}", flush=True)
    elif training.resume_from_checkpoint == "latest" and rank == 0:
        print(f"resume_from_checkpoint=latest: no checkpoint in {output_dir} yet, starting from step 0", flush=True)

    logger = MetricsLogger(output_dir, training.report_to, resume_step=start_step) if rank == 0 else None
    stop = StopRequested()
    progress = tqdm(total=training.max_steps, initial=start_step, disable=rank != 0, desc="GRPO", dynamic_ncols=True)
    func_names = [name for name, _ in source.reward_funcs] if source is not None else []
    if server.rollout_source == "server" and rank == 0:
        publish_policy_snapshot(engine, output_dir, start_step, rank)

    step = start_step
    try:
        while step < training.max_steps:
            step += 1
            started = time.perf_counter()
            engine.eval()
            if source is not None:
                with generation_context(engine):
                    rollouts = source.next(engine.module.policy, policy_version=step - 1)
                batch = rollouts.batch
                rewards, per_func, lengths, truncated = (rollouts.rewards, rollouts.per_func, rollouts.lengths,
                                                         rollouts.truncated)
            else:
                batch = queue.next(policy_version=step - 1)
                rewards, lengths, truncated = batch_rollout_view(batch, eos_ids)
                per_func = torch.empty(batch.batch_size, 0)
            engine.train()
            if config.loss.beta > 0 and batch.ref_logps is None:
                batch.ref_logps = client.logps(batch)  # (B, C); retries, then ConnectionError naming the server
            losses = train_on_batch(engine, batch, config, world_size)
            if queue is not None and rank == 0:
                queue.ack_all()
            if server.rollout_source == "server" and step % server.policy_sync_steps == 0:
                publish_policy_snapshot(engine, output_dir, step, rank)

            counters["nonfinite_steps"] += int(losses.pop("nonfinite_updates") > 0)
            if queue is not None:
                counters["stale_batches"] = queue.stale_dropped
            step_time = time.perf_counter() - started
            metrics = step_metrics(rewards, per_func, func_names, lengths, truncated, batch, losses, step_time,
                                   source, counters, world_size, rollout.num_generations)
            if rank == 0:
                if step % training.logging_steps == 0 or step == training.max_steps:
                    logger.log(step, metrics)
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', math.nan):.4f}")
            stopping = dist_utils.any_rank(stop.requested)
            if step % training.save_steps == 0 or step == training.max_steps or stopping:
                state = {"step": step, "counters": counters,
                         "prompt_order": None if source is None else source.order.state_dict()}
                path = save_checkpoint(engine, tokenizer, config, step, state, rank)
                if rank == 0:
                    progress.write(f"saved {path}")
            if stopping:
                if rank == 0:
                    progress.write(f"stopped at step {step} on request; resume with --resume_from_checkpoint latest")
                return 0
        if rank == 0:
            ckpt.write_json_atomic(output_dir / ckpt.DONE_MARKER, {"step": step})
        return 0
    finally:
        stop.restore()
        progress.close()
        if logger is not None:
            logger.close()
        if client is not None:
            client.close()


def publish_policy_snapshot(engine, output_dir: Path, version: int, rank: int) -> None:
    """Newest weights for generation workers (rollout_source: server), in Hugging Face format."""
    state_dict = policy_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        policy = engine.module.policy
        ckpt.publish_policy(output_dir, version, lambda d: policy.save_pretrained(d, state_dict=state_dict))


def step_metrics(rewards, per_func, func_names, lengths, truncated, batch: Batch, losses: dict, step_time: float,
                 source, counters: dict, world_size: int, num_generations: int) -> dict[str, float]:
    """Metrics of the whole step: rollout statistics over all ranks' rows, loss metrics weighted over ranks
    as over micro-batches (see train_on_batch)."""
    gathered = [dist_utils.gather_rows(t) for t in (rewards.float(), per_func.float(), lengths.float(),
                                                    truncated.float())]
    metrics = rollout_metrics(gathered[0], gathered[1], func_names, gathered[2], gathered[3].bool(),
                              num_generations)
    weights = losses.pop("weights", {})
    keys = sorted(losses)
    weighted = [losses[k] * weights.get(k, 1.0) for k in keys] + [weights.get(k, 1.0) for k in keys]
    totals = dist_utils.all_reduce_sum(weighted + [float(batch.attention_mask.sum())])
    for i, key in enumerate(keys):
        weight = totals[len(keys) + i]
        metrics[key] = totals[i] / weight if weight > 0 else 0.0
    metrics["step_time"] = step_time
    metrics["tokens_per_second"] = totals[-1] / step_time
    metrics["skipped_prompts"] = float(source.skipped_prompts if source is not None else 0)
    metrics["nonfinite_steps"] = float(counters["nonfinite_steps"])
    if source is None:
        metrics["stale_batches"] = float(counters["stale_batches"])
    return metrics


# ----------------------------------------------------------------------------------- generation worker


def generate(config: RunConfig) -> int:
    """A generation worker: rollouts from the newest policy snapshot, uploaded to the server's queue."""
    server, training = config.server, config.training
    check_run_layout(config, world_size=1)
    torch.manual_seed(training.seed + 1_000 * (server.worker_id + 1))
    output_dir = Path(training.output_dir)
    dtype = resolve_train_dtype(config.model.dtype)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    version, path = 0, config.model.model_name_or_path
    newest = ckpt.latest_policy(output_dir)
    if newest is not None:
        version, path = newest[0], str(newest[1])
    model = load_policy(path, dtype, announce=True).to(device).eval()
    config_for_worker = dataclasses.replace(
        config, training=dataclasses.replace(training, seed=training.seed + 7919 * server.worker_id))
    source = LocalRollouts(config_for_worker, tokenizer, model, rank=0, world_size=1)
    started = time.time()
    stop = StopRequested()
    uploaded = 0
    try:
        with RefServerClient(server.ref_server_url, token=server.ref_server_token,
                             timeout=server.ref_server_timeout, max_retries=server.ref_server_retries) as client:
            client.wait_ready(timeout=server.ref_server_wait)
            print(f"generation worker {server.worker_id}: policy version {version} from {path}", flush=True)
            while not stop.requested:
                if server.generate_steps is not None and uploaded >= server.generate_steps:
                    break
                if training_finished_since(output_dir, started):
                    print("training finished; generation worker exiting", flush=True)
                    break
                newest = ckpt.latest_policy(output_dir)
                if newest is not None and newest[0] > version:
                    try:
                        model = load_policy(str(newest[1]), dtype).to(device).eval()
                        version = newest[0]
                        print(f"generation worker {server.worker_id}: reloaded policy version {version}", flush=True)
                    except (OSError, ConfigError) as exc:  # replaced by a newer one meanwhile: next round
                        print(f"warning: could not load {newest[1]} ({exc}); keeping version {version}",
                              file=sys.stderr)
                rollouts = source.next(model, policy_version=version)
                batch = rollouts.batch
                batch.old_logps = policy_logps(model, batch).cpu()  # the sampling policy's, for the trainer's ratio
                client.upload(batch, max_wait=server.rollout_wait)
                uploaded += 1
                print(f"uploaded batch {uploaded} (policy version {version}, reward "
                      f"{rollouts.rewards.nanmean():.3f})", flush=True)
    finally:
        stop.restore()
    return 0


def training_finished_since(output_dir: Path, since: float) -> bool:
    """The trainer wrote its done marker after `since` (a marker from an earlier run does not count)."""
    marker = output_dir / ckpt.DONE_MARKER
    try:
        return marker.stat().st_mtime >= since
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_run_config(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if config.server.mode == "generate":
            return generate(config)
        return train(config)
    except (ConfigError, ConnectionError, TimeoutError, RefServerError, RewardFunctionError, PeerRankFailed) as exc:
        # Expected operational failures: one clear message (what failed, what to do), exit code 1.
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    exit_code = main()
    # Only here, at process exit: DeepSpeed keeps its own handles on the process group, so a run
    # called in-process (tests, notebooks) must leave the group up for the next one.
    dist_utils.shutdown(wait_for_all=exit_code == 0)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running C++ static destructors: after a finished two-rank ZeRO-3 run one rank
    # aborted there ("terminate called without an active exception", exit -6) with every file
    # already written. Checkpoints, metrics and logs are all closed and flushed by now.
    os._exit(exit_code)
