"""The checkpoint layout and policy snapshots (grpo_split.training.checkpoint)."""

from __future__ import annotations

import pytest
import torch

from grpo_split.config.parsing import ConfigError
from grpo_split.training import checkpoint as ckpt


def test_checkpoints_are_listed_only_when_complete_and_pruned(tmp_path):
    for step in (1, 2, 3):
        directory = ckpt.checkpoint_dir(tmp_path, step)
        directory.mkdir()
        ckpt.write_json_atomic(directory / ckpt.TRAINER_STATE, {"step": step})
    (tmp_path / "checkpoint-4").mkdir()  # no trainer_state.json: a save that never finished
    (tmp_path / "checkpoint-5.partial").mkdir()
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert ckpt.resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None
    assert ckpt.resolve_resume(tmp_path, None) is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-4"))
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert not (tmp_path / "checkpoint-5.partial").exists()


def test_policy_snapshots_appear_whole_and_old_ones_go(tmp_path):
    def save_to(directory):
        directory.mkdir()
        (directory / "model.safetensors").write_text("weights")

    assert ckpt.latest_policy(tmp_path) is None
    for version in (1, 2, 3):
        ckpt.publish_policy(tmp_path, version, save_to, keep=2)
    assert ckpt.latest_policy(tmp_path) == (3, tmp_path / "policy-3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy-2", "policy-3"]  # no temp dirs left


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(123)
    ckpt.save_rng_state(tmp_path, rank=0)
    expected = torch.rand(3)
    torch.rand(5)
    assert ckpt.load_rng_state(tmp_path, rank=0)
    assert torch.equal(torch.rand(3), expected)
    assert not ckpt.load_rng_state(tmp_path, rank=1)


def test_atomic_writes_keep_permissions_and_leave_no_temporary_file(tmp_path):
    import json
    import os
    import stat

    path = tmp_path / "state.json"
    ckpt.write_json_atomic(path, {"step": 1})
    assert json.loads(path.read_text()) == {"step": 1}
    assert stat.S_IMODE(path.stat().st_mode) == ckpt.NEW_FILE_MODE  # readable by a shared filesystem's users
    os.chmod(path, 0o600)
    ckpt.write_text_atomic(path, "replaced")
    assert path.read_text() == "replaced" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
