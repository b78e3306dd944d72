"""Checkpoint layout in `output_dir`, and the policy snapshots generation workers reload.

```
output_dir/
  config.yaml                 resolved configuration of the run
  metrics.jsonl               one line per logged step
  checkpoint-<step>/          complete checkpoints only (see below)
    config.json, model.safetensors, tokenizer files   Hugging Face format: from_pretrained(dir) works
    deepspeed/                engine state: ZeRO-partitioned optimizer, scheduler, module
    rng_state_rank<r>.safetensors
    trainer_state.json        written last: step, counters, the rollout source's state (prompt order)
  policy-<version>/           newest policy weights for generation workers (rollout_source: server)
  training_done.json          written when training ends; generation workers exit when they see it
```

A checkpoint is written into `checkpoint-<step>.partial` and renamed once every rank has written
its part and `trainer_state.json` is in place, so a crash in the middle of a save never leaves a
directory that `resume_from_checkpoint: latest` would pick.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grpo_split.config.parsing import ConfigError
from grpo_split.training import distributed as dist_utils

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
POLICY_DIR = re.compile(r"policy-(\d+)")
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
DONE_MARKER = "training_done.json"
NEW_FILE_MODE = 0o644


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            match = CHECKPOINT_DIR.fullmatch(child.name)
            if match and (child / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(output_dir: Path, value: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh run), `latest` (newest in output_dir, None if there is
    none yet, so the same command both starts and restarts a job), or a checkpoint directory."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(value)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"resume_from_checkpoint={value!r} is not a complete checkpoint (no {TRAINER_STATE}); "
                          f"pass latest or a checkpoint-<step> directory from output_dir")
    return path


def has_zero_optimizer_state(checkpoint: Path) -> bool:
    """True when the checkpoint's DeepSpeed state was written under ZeRO (stage 1-3): its optimizer
    state lies in per-rank partition files, which only a ZeRO engine loads (stage 0 keeps it in
    mp_rank_00_model_states.pt)."""
    return any((Path(checkpoint) / DEEPSPEED_TAG).glob("zero_pp_rank_*_optim_states.pt"))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader, or a crash, never sees half a file: a temporary
    file in the same directory, fsync, rename. The replaced file's permissions are kept; a new file
    gets 0644 (mkstemp's 0600 would hide it from the other users of a shared filesystem)."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, stat.S_IMODE(os.stat(path).st_mode) if path.exists() else NEW_FILE_MODE)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json_atomic(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2))


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def save_rng_state(directory: Path, rank: int) -> None:
    """This rank's torch RNG states (sampling depends on them), as safetensors: no pickle."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(Path(directory) / f"rng_state_rank{rank}.safetensors"))


def load_rng_state(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (other world size)."""
    path = Path(directory) / f"rng_state_rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and any leftover `.partial` directory."""
    removed = []
    root = Path(output_dir)
    for child in root.glob("checkpoint-*.partial"):
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    if keep is not None:
        for _, path in list_checkpoints(root)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def latest_policy(output_dir: Path) -> tuple[int, Path] | None:
    """The newest published policy snapshot: (version, directory), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), child) for child in root.iterdir() if (m := POLICY_DIR.fullmatch(child.name))]
    return max(found) if found else None


def publish_policy(output_dir: Path, version: int, save_to, keep: int = 2) -> Path:
    """Write a policy snapshot with `save_to(directory)` and make it visible atomically (rename).

    Older snapshots beyond `keep` are removed; two are kept so a worker still reading the previous
    one is not pulled out from under.
    """
    root = Path(output_dir)
    final = root / f"policy-{version}"
    tmp = root / f".policy-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_to(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    snapshots = sorted((int(m.group(1)), child) for child in root.iterdir() if (m := POLICY_DIR.fullmatch(child.name)))
    for _, old in snapshots[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- writing a checkpoint and a policy snapshot from the engine (every rank calls these) ----------


def save_checkpoint(engine, tokenizer, output_dir: Path, step: int, state: dict, rank: int,
                    save_total_limit: int | None) -> Path:
    """HF model + tokenizer (rank 0, consolidated under ZeRO-3), DeepSpeed state (all ranks), RNG, then
    trainer_state.json and the rename that makes the checkpoint visible."""
    final = checkpoint_dir(output_dir, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist_utils.barrier()
    state_dict = policy_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        engine.module.policy.save_pretrained(partial, state_dict=state_dict)
        tokenizer.save_pretrained(partial)
    engine.save_checkpoint(str(partial), tag=DEEPSPEED_TAG)
    save_rng_state(partial, rank)
    dist_utils.barrier()
    if rank == 0:
        write_json_atomic(partial / TRAINER_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(output_dir, save_total_limit)
    dist_utils.barrier()
    return final


def publish_policy_snapshot(engine, output_dir: Path, version: int, rank: int) -> None:
    """Newest weights for generation workers (rollout_source: server), in Hugging Face format."""
    state_dict = policy_state_dict(engine)  # collective under ZeRO-3: every rank takes part
    if rank == 0:
        policy = engine.module.policy
        publish_policy(output_dir, version, lambda d: policy.save_pretrained(d, state_dict=state_dict))


def policy_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The one place the full weights are gathered for saving (checkpoints and policy snapshots):
    under ZeRO-3 consolidated from the partitions onto rank 0, with the names `from_pretrained`
    expects; None without ZeRO-3, where the module's own state dict is complete."""
    if engine.zero_optimization_stage() != 3:
        return None
    prefix = "policy."
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # names of PolicyLogps: "policy.<name>"
    return None if state_dict is None else {key.removeprefix(prefix): value for key, value in state_dict.items()}


def gathered_for_generation(engine):
    """Under ZeRO-3, the full weights for the duration of `generate` (each layer would otherwise be
    gathered once per generated token); otherwise nothing to do."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()
