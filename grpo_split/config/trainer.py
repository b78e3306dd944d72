"""The trainer's configuration: one dataclass per concern, TRL's GRPOConfig names where the meaning is the same.

`grpo_ref_split.py --config configs/toy_cpu.yaml --beta 0.0` fills all of them through
`grpo_split.config.parsing.parse_config` (YAML file, then command-line overrides). Each dataclass checks
its own fields on construction and raises `ConfigError` naming the field; checks that need several
dataclasses or the world size live in `check_run_layout`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from grpo_split.config.parsing import ConfigError, parse_config
from grpo_split.contract import DEFAULT_URL
from grpo_split.contract.batch import MAX_TEMPERATURE, MIN_TEMPERATURE
from grpo_split.rollouts.rewards import load_reward_funcs
from stable_ops.advantages import SCALE_MODES
from stable_ops.loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_NORMALIZERS


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {rule}")


@dataclass
class ModelConfig:
    model_name_or_path: str = field(metadata={"help": "policy to train (and the reference server's model): a local "
                                                      "directory or a hub name"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "training weights dtype; auto = bfloat16 on a GPU that supports it, else "
                                          "float32 (DeepSpeed's bf16/fp16 sections follow this)"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in backward: less memory, one more forward pass of compute"},
    )


@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None, metadata={"help": "hub dataset name, or a local .json/.jsonl/.csv/.parquet file (required in "
                                        "train mode with rollout_source=local, and in generate mode)"}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "configuration name of a hub dataset (e.g. main for openai/gsm8k)"}
    )
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    prompt_column: str = field(default="prompt", metadata={"help": "dataset column holding the question text"})
    answer_column: str | None = field(
        default="answer", metadata={"help": "column with the reference answer, passed to reward functions as "
                                            "`answer=`; none to omit"}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "system message put before every prompt by the chat template"}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "prompts longer than this many tokens (after the chat template) are skipped "
                                       "and counted in the skipped_prompts metric"}
    )

    def __post_init__(self):
        _require(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length, "must be >= 1")
        if self.answer_column in ("", "none", "None"):
            self.answer_column = None


@dataclass
class RolloutConfig:
    num_generations: int = field(default=8, metadata={"help": "completions sampled per prompt (the group size G)"})
    prompts_per_step: int = field(
        default=8, metadata={"help": "prompts per optimizer step over all ranks; each rank takes an equal share"}
    )
    max_completion_length: int = field(default=256, metadata={"help": "new tokens generated per completion at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also used for log-probs)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold; 1.0 = off"})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "give completions that hit max_completion_length without EOS no loss"}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "reward functions: built-ins (accuracy, format) or package.module:function"},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "one weight per reward function (default: all 1.0)"}
    )
    scale_rewards: Literal["group", "batch", "none"] = field(
        default="group", metadata={"help": "divide advantages by the group's std, the batch's std, or not at all"}
    )

    def __post_init__(self):
        _require(self.num_generations >= 2, "num_generations", self.num_generations,
                 "must be >= 2: GRPO's advantage compares the completions of one prompt")
        _require(self.prompts_per_step >= 1, "prompts_per_step", self.prompts_per_step, "must be >= 1")
        _require(self.max_completion_length >= 1, "max_completion_length", self.max_completion_length, "must be >= 1")
        _require(MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE, "temperature", self.temperature,
                 f"must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (the range a batch on the wire may carry)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(len(self.reward_funcs) >= 1, "reward_funcs", self.reward_funcs, "name at least one reward function")
        if self.reward_weights is not None:
            _require(len(self.reward_weights) == len(self.reward_funcs), "reward_weights", self.reward_weights,
                     f"needs one weight per reward function ({len(self.reward_funcs)}: {self.reward_funcs})")
        _require(self.scale_rewards in SCALE_MODES, "scale_rewards", self.scale_rewards, f"one of {SCALE_MODES}")


@dataclass
class LossConfig:
    beta: float = field(default=0.04, metadata={"help": "weight of the k3 KL penalty; 0 = no reference model "
                                                         "(the server is then not contacted)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range of the importance ratio"})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "upper clip range (DAPO's clip-higher); default: epsilon"}
    )
    loss_type: str = field(
        default="grpo", metadata={"help": f"loss normalization: {', '.join(LOSS_NORMALIZERS)}"}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "optimizer passes over each generated batch (TRL's mu); > 1 uses old log-probs"}
    )
    importance_sampling_level: str = field(
        default="token", metadata={"help": "token (GRPO) or sequence (GSPO) importance weights"}
    )

    def __post_init__(self):
        _require(self.beta >= 0, "beta", self.beta, "must be >= 0")
        _require(0 < self.epsilon < 1, "epsilon", self.epsilon, "must be in (0, 1)")
        if self.epsilon_high is not None:
            _require(self.epsilon_high > 0, "epsilon_high", self.epsilon_high, "must be > 0")
        _require(self.loss_type in LOSS_NORMALIZERS, "loss_type", self.loss_type,
                 f"must be one of {', '.join(LOSS_NORMALIZERS)}")
        _require(self.num_iterations >= 1, "num_iterations", self.num_iterations, "must be >= 1")
        _require(self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "importance_sampling_level",
                 self.importance_sampling_level, f"must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")


@dataclass
class TrainingConfig:
    output_dir: str = field(default="outputs/run", metadata={"help": "metrics, checkpoints and config.yaml go here"})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata={"help": "learning-rate schedule after warmup (decays to 0 at max_steps)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear warmup from 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optim: Literal["adamw_torch", "sgd"] = field(
        default="adamw_torch",
        metadata={"help": "optimizer when the DeepSpeed JSON has no optimizer section: adamw_torch, or sgd (plain "
                          "SGD without momentum, whose update is -learning_rate x gradient: what "
                          "scripts/check_update_invariance.py compares)"},
    )
    max_steps: int = field(default=100, metadata={"help": "training steps (one generated batch each)"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer update: a rank's batch is split into this many"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = off"})
    seed: int = field(default=42, metadata={"help": "seed of the prompt order, sampling and initialization"})
    logging_steps: int = field(default=1, metadata={"help": "write metrics every this many steps"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every this many steps (and at the end)"})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "keep only the newest this many checkpoints (default: keep all)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "latest (newest checkpoint in output_dir) or a checkpoint directory"}
    )
    deepspeed: str | None = field(
        default=None, metadata={"help": "DeepSpeed JSON config (configs/ds_zero2.json, ...); default: ZeRO-2"}
    )
    report_to: Literal["none", "tensorboard"] = field(
        default="none", metadata={"help": "also write TensorBoard event files to output_dir/runs"}
    )

    def __post_init__(self):
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _require(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        _require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
                 self.gradient_accumulation_steps, "must be >= 1")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be >= 0")
        _require(self.logging_steps >= 1, "logging_steps", self.logging_steps, "must be >= 1")
        _require(self.save_steps >= 1, "save_steps", self.save_steps, "must be >= 1")
        if self.save_total_limit is not None:
            _require(self.save_total_limit >= 1, "save_total_limit", self.save_total_limit, "must be >= 1")


@dataclass
class ServerLinkConfig:
    mode: Literal["train", "generate"] = field(
        default="train", metadata={"help": "train, or generate: a generation worker that uploads scored rollouts "
                                           "to the server's queue and never trains"}
    )
    rollout_source: Literal["local", "server"] = field(
        default="local", metadata={"help": "local: generate rollouts here; server: train on batches generation "
                                           "workers uploaded (GET /get)"}
    )
    ref_server_url: list[str] = field(
        default_factory=lambda: [DEFAULT_URL],
        metadata={"help": "reference server URL(s); several are used round-robin with failover"},
    )
    ref_server_token: str | None = field(
        default=None, metadata={"help": "bearer token of the server (default: env REF_SERVER_TOKEN)"}
    )
    ref_server_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for one server answer"})
    ref_server_retries: int = field(
        default=5, metadata={"help": "attempts per server call (with backoff) before a ConnectionError"}
    )
    ref_server_wait: float = field(
        default=120.0, metadata={"help": "seconds to wait at start-up for the server's /health"}
    )
    max_staleness: int = field(
        default=2, metadata={"help": "rollout_source=server: drop batches generated more than this many policy "
                                     "versions ago"}
    )
    rollout_wait: float = field(
        default=600.0, metadata={"help": "rollout_source=server: seconds without any batch before giving up; "
                                         "generate mode: seconds an upload may wait on a full queue"}
    )
    policy_sync_steps: int = field(
        default=1, metadata={"help": "rollout_source=server: publish the policy to output_dir/policy-<step> for "
                                     "generation workers every this many steps"}
    )
    worker_id: int = field(
        default=0, metadata={"help": "generate mode: this worker's index; workers with different ids sample "
                                     "different prompts"}
    )
    generate_steps: int | None = field(
        default=None, metadata={"help": "generate mode: batches to upload before exiting (default: until the trainer "
                                        "writes its final checkpoint, or Ctrl-C / SIGTERM)"}
    )

    def __post_init__(self):
        _require(len(self.ref_server_url) >= 1, "ref_server_url", self.ref_server_url, "give at least one URL")
        _require(self.ref_server_timeout > 0, "ref_server_timeout", self.ref_server_timeout, "must be > 0")
        _require(self.ref_server_retries >= 1, "ref_server_retries", self.ref_server_retries, "must be >= 1")
        _require(self.ref_server_wait > 0, "ref_server_wait", self.ref_server_wait, "must be > 0")
        _require(self.max_staleness >= 0, "max_staleness", self.max_staleness, "must be >= 0")
        _require(self.rollout_wait > 0, "rollout_wait", self.rollout_wait, "must be > 0")
        _require(self.policy_sync_steps >= 1, "policy_sync_steps", self.policy_sync_steps, "must be >= 1")
        _require(self.worker_id >= 0, "worker_id", self.worker_id, "must be >= 0")
        if self.rollout_source == "server":
            _require(self.max_staleness >= self.policy_sync_steps, "max_staleness", self.max_staleness,
                     f"must be >= policy_sync_steps ({self.policy_sync_steps}), or every batch would be stale by "
                     "the time workers see a new policy")
        if self.generate_steps is not None:
            _require(self.generate_steps >= 1, "generate_steps", self.generate_steps, "must be >= 1")
        if self.mode == "generate" and self.rollout_source == "server":
            raise ConfigError("mode=generate with rollout_source=server is invalid: a generation worker produces "
                              "rollouts itself; use rollout_source=local (the default) for workers")


CONFIG_TYPES = (ModelConfig, DataConfig, RolloutConfig, LossConfig, TrainingConfig, ServerLinkConfig)


@dataclass
class RunConfig:
    """All the trainer's settings, one attribute per concern."""

    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig
    loss: LossConfig
    training: TrainingConfig
    server: ServerLinkConfig

    def all(self) -> tuple:
        return (self.model, self.data, self.rollout, self.loss, self.training, self.server)


def check_run_layout(config: RunConfig, world_size: int) -> None:
    """Checks that need several sections or the number of ranks; ConfigError naming the fields."""
    rollout, training, server = config.rollout, config.training, config.server
    needs_dataset = server.mode == "generate" or server.rollout_source == "local"
    if needs_dataset and not config.data.dataset_name:
        raise ConfigError("dataset_name is required to generate rollouts: a hub dataset name or a local "
                          ".json/.jsonl/.csv/.parquet file")
    if rollout.prompts_per_step % world_size:
        raise ConfigError(f"prompts_per_step={rollout.prompts_per_step} must be a multiple of the number of ranks "
                          f"({world_size}): each rank generates for an equal share of the prompts")
    rows_per_rank = rollout.prompts_per_step // world_size * rollout.num_generations
    if server.mode == "train" and rows_per_rank % training.gradient_accumulation_steps:
        raise ConfigError(
            f"gradient_accumulation_steps={training.gradient_accumulation_steps} must divide the completions per rank "
            f"(prompts_per_step / ranks x num_generations = {rows_per_rank})"
        )
    if config.loss.loss_type == "dr_grpo" and rollout.max_completion_length is None:
        raise ConfigError("loss_type=dr_grpo needs max_completion_length")


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
