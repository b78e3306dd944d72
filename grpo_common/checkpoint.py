"""Checkpoint layout in `output_dir`, and the policy snapshots generation workers reload.

```
output_dir/
  config.yaml                 resolved configuration of the run
  metrics.jsonl               one line per logged step
  checkpoint-<step>/          complete checkpoints only (see below)
    config.json, model.safetensors, tokenizer files   Hugging Face format: from_pretrained(dir) works
    deepspeed/                engine state: ZeRO-partitioned optimizer, scheduler, module
    rng_state_rank<r>.safetensors
    trainer_state.json        written last: step, prompt order, counters
  policy-<version>/           newest policy weights for generation workers (rollout_source: server)
  training_done.json          written when training ends; generation workers exit when they see it
```

A checkpoint is written into `checkpoint-<step>.partial` and renamed once every rank has written
its part and `trainer_state.json` is in place, so a crash in the middle of a save never leaves a
directory that `resume_from_checkpoint: latest` would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
POLICY_DIR = re.compile(r"policy-(\d+)")
TRAINER_STATE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
DONE_MARKER = "training_done.json"


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


def write_json_atomic(path: Path, value) -> None:
    """Write JSON so that a reader never sees half a file (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
