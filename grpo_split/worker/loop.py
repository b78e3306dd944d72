"""A generation worker (`grpo_ref_split.py --mode generate`): samples and scores rollouts with the newest
policy snapshot the trainer published, adds the sampling policy's log-probs, and uploads each batch,
one training step's worth, to the reference server's queue."""

from __future__ import annotations

import dataclasses
import sys
import time
import uuid
from pathlib import Path

import torch

from grpo_split.config.parsing import ConfigError
from grpo_split.config.trainer import RunConfig, check_run_layout
from grpo_split.contract.client import RefServerClient
from grpo_split.modeling import (
    frozen_logps,
    lm_head_plan,
    load_frozen_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from grpo_split.rollouts.sources import LocalRollouts
from grpo_split.training import checkpoint as ckpt
from grpo_split.training.stopping import StopRequested

# Worker w samples with torch seed `seed + SAMPLING_SEED_STRIDE * (w + 1)` and orders prompts with
# seed `seed + PROMPT_SEED_STRIDE * w`: different from each other and from the trainer's ranks
# (`seed + rank`), so workers never duplicate each other's rollouts. The strides are far apart
# (and one is prime) so that no two workers' seeds coincide for any sane number of workers.
SAMPLING_SEED_STRIDE = 1_000
PROMPT_SEED_STRIDE = 7919


def run_worker(config: RunConfig) -> int:
    """Generate and upload until the trainer is done, `generate_steps` batches, or Ctrl-C / SIGTERM."""
    server, training = config.server, config.training
    check_run_layout(config, world_size=1)
    torch.manual_seed(training.seed + SAMPLING_SEED_STRIDE * (server.worker_id + 1))
    output_dir = Path(training.output_dir)
    device = resolve_device("auto")
    dtype = resolve_dtype(config.model.dtype, device)
    tokenizer = load_tokenizer(config.model.model_name_or_path)
    version, path = 0, config.model.model_name_or_path
    newest = ckpt.latest_policy(output_dir)
    if newest is not None:
        version, path = newest[0], str(newest[1])
    model = load_frozen_model(path, device, dtype)
    print(f"LM head: {lm_head_plan(model).reason}", flush=True)
    worker_config = dataclasses.replace(
        config, training=dataclasses.replace(training, seed=training.seed + PROMPT_SEED_STRIDE * server.worker_id))
    source = LocalRollouts(worker_config, tokenizer, model, rank=0, world_size=1)
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
                model, version = newest_policy(output_dir, model, version, device, dtype, server.worker_id)
                rollouts = source.generate(model, policy_version=version)
                batch = rollouts.batch
                # The sampling policy's log-probs, for the trainer's importance ratio.
                batch.old_logps = frozen_logps(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                                                  batch.temperature)
                answer = upload_across_restarts(client, batch, max_wait=server.rollout_wait,
                                                ready_wait=server.ref_server_wait)
                uploaded += 1
                print(f"uploaded batch {uploaded} (policy version {version}, reward "
                      f"{rollouts.rewards.nanmean():.3f}, queued as {answer.get('batch_id')})", flush=True)
    finally:
        stop.restore()
    return 0


def upload_across_restarts(client: RefServerClient, batch, max_wait: float, ready_wait: float) -> dict:
    """Upload `batch`; when no server answers (a restart: with --queue_dir it lost nothing it had
    accepted), wait up to `ready_wait` s for its /health and send the batch once more.

    Both sends carry one upload id: a server (with --queue_dir) that stored the batch before it was
    killed, its 202 lost, answers the resend with the stored batch's id instead of queueing it twice.
    """
    upload_id = uuid.uuid4().hex  # the same on the resend, so a server that had stored it does not queue it twice
    try:
        return client.upload(batch, max_wait=max_wait, upload_id=upload_id)
    except ConnectionError as exc:
        print(f"warning: {exc}; waiting up to {ready_wait:g} s (ref_server_wait) for the server to come back",
              file=sys.stderr, flush=True)
        client.wait_ready(timeout=ready_wait)
        return client.upload(batch, max_wait=max_wait, upload_id=upload_id)


def newest_policy(output_dir: Path, model, version: int, device, dtype, worker_id: int):
    """(model, version): the newest published policy snapshot if it is newer than `version`."""
    newest = ckpt.latest_policy(output_dir)
    if newest is None or newest[0] <= version:
        return model, version
    try:
        model = load_frozen_model(str(newest[1]), device, dtype)
    except (OSError, ConfigError) as exc:  # replaced by a newer one meanwhile: next round
        print(f"warning: could not load {newest[1]} ({exc}); keeping version {version}", file=sys.stderr)
        return model, version
    print(f"generation worker {worker_id}: reloaded policy version {newest[0]}", flush=True)
    return model, newest[0]


def training_finished_since(output_dir: Path, since: float) -> bool:
    """The trainer wrote its done marker after `since` (a marker from an earlier run does not count)."""
    marker = output_dir / ckpt.DONE_MARKER
    try:
        return marker.stat().st_mtime >= since
    except FileNotFoundError:
        return False
