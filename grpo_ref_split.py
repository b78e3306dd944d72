"""GRPO training with the reference model split out into an HTTP server (`ref_server.py`).

Launch (the reference server first, on its own GPU or machine, when beta > 0):

    python ref_server.py --model_name_or_path Qwen/Qwen2.5-7B-Instruct --device cuda:0
    CUDA_VISIBLE_DEVICES=1,2,3 deepspeed grpo_ref_split.py --config configs/gsm8k_qwen2.5.yaml
    deepspeed --hostfile hosts grpo_ref_split.py --config ...             # several nodes
    python grpo_ref_split.py --config configs/toy_cpu.yaml --max_steps 2  # one process, for debugging
    python grpo_ref_split.py --config ... --mode generate                 # a generation worker

One training step, as `train()` below reads:
  1. rollouts from the rollout source (`grpo_split.rollouts.sources`): locally, each rank samples
     `num_generations` completions for its share of `prompts_per_step` chat-formatted prompts and
     scores them (group-relative advantages); or, with `rollout_source: server`, a batch that
     generation workers uploaded to the server's queue, split over the ranks;
  2. reference log-probs from the server (`POST /logps`) when beta > 0;
  3. `num_iterations` optimizer passes of the clipped GRPO loss with the k3 KL term
     (`grpo_split.training.update`), per-token log-probs from the fused LM head;
  4. metrics, and a checkpoint every `save_steps`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from grpo_split.config.parsing import ConfigError, config_to_yaml
from grpo_split.config.trainer import RunConfig, check_run_layout, parse_run_config
from grpo_split.contract.client import RefServerClient, RefServerError
from grpo_split.modeling import lm_head_plan, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from grpo_split.rollouts.rewards import RewardFunctionError
from grpo_split.rollouts.sources import RolloutSource, make_rollout_source
from grpo_split.training import checkpoint as ckpt
from grpo_split.training import distributed as dist_utils
from grpo_split.training.distributed import PeerRankFailed
from grpo_split.training.engine import build_engine
from grpo_split.training.metrics import MetricsLogger, step_metrics
from grpo_split.training.reference import PendingReference, ReadyReference
from grpo_split.training.stopping import StopRequested
from grpo_split.training.timing import PhaseTimer
from grpo_split.training.update import train_on_batch
from grpo_split.worker.loop import run_worker


def train(config: RunConfig) -> int:
    from tqdm import tqdm

    rank, world_size, _ = dist_utils.init_distributed()
    check_run_layout(config, world_size)
    training = config.training
    output_dir = Path(training.output_dir)
    torch.manual_seed(training.seed + rank)  # different samples on each rank, reproducible per rank
    if rank == 0:
        record_configuration(config, output_dir)

    dtype = resolve_dtype(config.model.dtype, resolve_device("auto"))
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    model = load_causal_lm(config.model.model_name_or_path, dtype,
                           gradient_checkpointing=config.model.gradient_checkpointing)
    if rank == 0:
        print(f"LM head: {lm_head_plan(model).reason}", flush=True)
    client = connect_reference_server(config, rank)
    source = make_rollout_source(config, tokenizer, model, client, rank, world_size)
    engine = build_engine(config, model, world_size, dtype)
    engine.train()
    start_step, counters = resume(engine, source, config, rank)

    logger = MetricsLogger(output_dir, training.report_to, resume_step=start_step) if rank == 0 else None
    stop = StopRequested()
    progress = tqdm(total=training.max_steps, initial=start_step, disable=rank != 0, desc="GRPO", dynamic_ncols=True)
    source.policy_updated(engine, start_step)

    step = start_step
    timer = PhaseTimer()
    try:
        while step < training.max_steps:
            step += 1
            timer.reset()
            started = time.perf_counter()
            engine.eval()
            with timer.phase("generate"):
                rollouts = source.next(engine, policy_version=step - 1)
            engine.train()
            batch = rollouts.batch
            timer.merge(rollouts.timings)  # generate vs rewards, measured inside; replaces the outer time
            timer.seconds["generate"] -= sum(rollouts.timings.values())
            timer.count("generate", float(rollouts.lengths.sum()))
            # Sent now, answered while the update's first forward runs (training.reference).
            if config.loss.beta > 0 and batch.ref_logps is None:
                reference = PendingReference(client, batch)  # (B, C); retries, then ConnectionError naming the server
                timer.count("reference", float(batch.attention_mask.sum()))
            else:
                reference = ReadyReference(batch.ref_logps)
            with timer.phase("update", tokens=float(batch.attention_mask.sum()) * config.loss.num_iterations):
                losses = train_on_batch(engine, batch, config, world_size, reference)
            timer.seconds["update"] -= reference.waited
            timer.seconds["reference"] = reference.waited
            source.policy_updated(engine, step)

            counters["nonfinite_steps"] += int(losses.pop("nonfinite_updates") > 0)
            metrics = step_metrics(rollouts, source.reward_names, losses, time.perf_counter() - started,
                                   {**counters, **source.metrics()}, config.rollout.num_generations, timer)
            if rank == 0:
                if step % training.logging_steps == 0 or step == training.max_steps:
                    logger.log(step, metrics)
                progress.update(1)
                progress.set_postfix(progress_fields(metrics))
            stopping = dist_utils.any_rank(stop.requested)
            if step % training.save_steps == 0 or step == training.max_steps or stopping:
                state = {"step": step, "counters": counters, "rollout_source": source.state_dict()}
                path = ckpt.save_checkpoint(engine, tokenizer, output_dir, step, state, rank, training.save_total_limit)
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


def progress_fields(metrics: dict) -> dict[str, str]:
    """The progress bar's fields: reward, kl (when there is a reference), and the step's seconds by phase."""
    fields = {"reward": f"{metrics['reward']:.3f}"}
    if "kl" in metrics:
        fields["kl"] = f"{metrics['kl']:.4f}"
    # e.g. "gen 5.1 rew 0.0 ref 0.3 upd 5.8": where the step goes, at a glance.
    fields["s"] = " ".join(f"{short} {metrics[f'timing/{name}']:.1f}" for name, short in
                           (("generate", "gen"), ("rewards", "rew"), ("reference", "ref"), ("update", "upd")))
    return fields


def record_configuration(config: RunConfig, output_dir: Path) -> None:
    """Rank 0: config.yaml in output_dir, printed too; a done marker of an earlier run removed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = config_to_yaml(*config.all())
    (output_dir / "config.yaml").write_text(text)
    (output_dir / ckpt.DONE_MARKER).unlink(missing_ok=True)
    print(f"resolved configuration (also in {output_dir / 'config.yaml'}):\n{text}", flush=True)


def connect_reference_server(config: RunConfig, rank: int) -> RefServerClient | None:
    """A client of the reference server once it answers /health; None when no server is needed."""
    server = config.server
    if config.loss.beta == 0 and server.rollout_source != "server":
        return None
    client = RefServerClient(server.ref_server_url, token=server.ref_server_token,
                             timeout=server.ref_server_timeout, max_retries=server.ref_server_retries)
    info = client.wait_ready(timeout=server.ref_server_wait)
    if rank == 0:
        print(f"reference server ready: {info}", flush=True)
    return client


def resume(engine, source: RolloutSource, config: RunConfig, rank: int) -> tuple[int, dict]:
    """(start step, counters): model, optimizer and scheduler from DeepSpeed; the rollout source's
    position, counters and RNG from ours. Fresh: (0, zero counters)."""
    training = config.training
    output_dir = Path(training.output_dir)
    counters = {"nonfinite_steps": 0}
    checkpoint = ckpt.resolve_resume(output_dir, training.resume_from_checkpoint)
    if checkpoint is None:
        if training.resume_from_checkpoint == "latest" and rank == 0:
            print(f"resume_from_checkpoint=latest: no checkpoint in {output_dir} yet, starting from step 0",
                  flush=True)
        return 0, counters
    loaded, _ = engine.load_checkpoint(str(checkpoint), tag=ckpt.DEEPSPEED_TAG)
    if loaded is None:
        raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not load {checkpoint / ckpt.DEEPSPEED_TAG}")
    state = ckpt.read_trainer_state(checkpoint)
    counters["nonfinite_steps"] = state.get("counters", {}).get("nonfinite_steps", 0)
    # Checkpoints from before the rollout sources kept their own state held the prompt order at the top.
    source.load_state_dict(state.get("rollout_source", {"prompt_order": state.get("prompt_order")}))
    if not ckpt.load_rng_state(checkpoint, rank) and rank == 0:
        print(f"warning: {checkpoint} has no RNG state for rank {rank}; sampling continues from a fresh seed",
              file=sys.stderr)
    if rank == 0:
        print(f"resumed from {checkpoint} at step {state['step']}", flush=True)
    return state["step"], counters


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_run_config(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        if config.server.mode == "generate":
            return run_worker(config)
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
