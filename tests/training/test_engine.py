"""The DeepSpeed engine's configuration and the learning-rate schedule (grpo_split.training.engine)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import REPO, load_script, toy_config

from grpo_split.config.parsing import ConfigError
from grpo_split.config.trainer import parse_run_config
from grpo_split.training.engine import DEEPSPEED_DEFAULT_BUCKET, deepspeed_config, lr_lambda


def test_deepspeed_config_takes_batch_layout_and_precision_from_ours(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, gradient_accumulation_steps=2,
                      deepspeed=str(REPO / "configs" / "ds_zero2_offload.json"), max_grad_norm=0.5,
                      weight_decay=0.01)
    config = parse_run_config(argv)
    ds = deepspeed_config(config, world_size=2, rows_per_rank=8, dtype=torch.bfloat16)
    layout = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert layout == (4, 2, 16)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    zero3 = deepspeed_config(
        parse_run_config([*argv, "--deepspeed", str(REPO / "configs" / "ds_zero3.json")]), 1, 8,
        torch.float32)
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not zero3["bf16"]["enabled"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="deepspeed="):
        deepspeed_config(parse_run_config([*argv, "--deepspeed", str(bad)]), 1, 8, torch.float32)


def test_learning_rate_schedules():
    warm = lr_lambda("constant", warmup_steps=3, total_updates=10)
    assert [warm(n) for n in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda("linear", warmup_steps=0, total_updates=10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(10) == 0.0
    cosine = lr_lambda("cosine", warmup_steps=0, total_updates=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and abs(cosine(10)) < 1e-12


def test_one_float32_process_defaults_to_stage_0_and_the_optimizer_clips(tmp_path, toy_model_dir, toy_dataset_path):
    """No DeepSpeed JSON: one float32 process gets stage 0 (no float32 master copy of the weights),
    with clipping moved into the optimizer; several ranks, or half precision, keep ZeRO-2."""
    config = parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path, max_grad_norm=0.5))
    one = deepspeed_config(config, world_size=1, rows_per_rank=8, dtype=torch.float32, hidden_size=896)
    assert one["zero_optimization"] == {"stage": 0}  # no bucket either: stage 0 has none
    assert one["gradient_clipping"] == 0.0
    two = deepspeed_config(config, world_size=2, rows_per_rank=8, dtype=torch.float32, hidden_size=896)
    assert two["zero_optimization"]["stage"] == 2 and two["gradient_clipping"] == 0.5
    bf16 = deepspeed_config(config, world_size=1, rows_per_rank=8, dtype=torch.bfloat16, hidden_size=896)
    assert bf16["zero_optimization"]["stage"] == 2 and bf16["gradient_clipping"] == 0.5


def test_a_checkpoint_of_the_earlier_zero2_default_is_resumed_under_zero2(tmp_path, toy_model_dir,
                                                                           toy_dataset_path):
    """Runs started with no JSON before one process defaulted to stage 0 wrote ZeRO-2 checkpoints, whose
    partitioned optimizer state DeepSpeed at stage 0 cannot load: resuming one keeps ZeRO-2."""
    from grpo_split.training.checkpoint import TRAINER_STATE

    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, resume_from_checkpoint="latest")
    config = parse_run_config(argv)
    checkpoint = tmp_path / "out" / "checkpoint-4"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text('{"step": 4}')
    (checkpoint / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert deepspeed_config(config, 1, 8, torch.float32)["zero_optimization"]["stage"] == 0  # stage 0's own
    (checkpoint / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert deepspeed_config(config, 1, 8, torch.float32)["zero_optimization"]["stage"] == 2
    no_resume = dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                         resume_from_checkpoint=None))
    assert deepspeed_config(no_resume, 1, 8, torch.float32)["zero_optimization"]["stage"] == 0


def test_zero_buckets_are_sized_to_the_model_unless_the_json_sets_them(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path)
    default = deepspeed_config(parse_run_config(argv), world_size=2, rows_per_rank=8, dtype=torch.float32,
                               hidden_size=896)
    assert default["zero_optimization"]["reduce_bucket_size"] == 896**2
    # A JSON's stage and buckets are the user's: ds_zero2.json sets 5e7 and stays at stage 2 on one process.
    zero2 = deepspeed_config(parse_run_config([*argv, "--deepspeed", str(REPO / "configs" / "ds_zero2.json")]),
                             world_size=1, rows_per_rank=8, dtype=torch.float32, hidden_size=896)
    assert zero2["zero_optimization"]["stage"] == 2 and zero2["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert zero2["gradient_clipping"] == 1.0  # ZeRO clips, and reports the norm itself
    zero3 = parse_run_config([*argv, "--deepspeed", str(REPO / "configs" / "ds_zero3.json")])
    assert deepspeed_config(zero3, 1, 8, torch.float32, hidden_size=4096)["zero_optimization"]["reduce_bucket_size"] \
        == 4096**2
    assert deepspeed_config(zero3, 1, 8, torch.float32, hidden_size=30_000)["zero_optimization"][
        "reduce_bucket_size"] == DEEPSPEED_DEFAULT_BUCKET  # never above DeepSpeed's own default
    assert "reduce_bucket_size" not in deepspeed_config(zero3, 1, 8, torch.float32)["zero_optimization"]


# ---- the default engine of one float32 process, against the plain-torch update it must equal ------


@pytest.fixture(scope="module")
def invariance_inputs(tmp_path_factory):
    invariance = load_script("check_update_invariance")
    model_dir = invariance.build_model(tmp_path_factory.mktemp("engine") / "model")
    return invariance, model_dir, invariance.make_step_batch(model_dir)


@pytest.fixture
def world_of_one():
    from grpo_split.training import distributed as dist_utils

    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {key: os.environ.pop(key) for key in names if key in os.environ}
    dist_utils.init_distributed()
    yield
    for key in names:
        os.environ.pop(key, None)
    os.environ.update(saved)


def _default_run_config(invariance, model_dir, max_grad_norm: float):
    """The invariance check's GA-2 config (SGD: the update is the gradient), with no DeepSpeed JSON."""
    case = invariance.Case(2, False, 2, 1, "grpo", "token", 0.1, 1, "local")
    config = invariance.run_config(case, model_dir)
    training = dataclasses.replace(config.training, deepspeed=None, max_grad_norm=max_grad_norm)
    return case, dataclasses.replace(config, training=training)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_default_engine_of_one_process_updates_like_the_plain_torch_step(invariance_inputs, world_of_one,
                                                                        max_grad_norm):
    """Stage 0 steps our optimizer on the model's parameters; its update (GA 2, clipped or not) and the
    gradient norm it reports equal TorchEngine's, which tests/training/test_update.py checks against
    a float64 whole-batch update. Without the optimizer's clipping the clipped case moves the weights
    by far more than the tolerance; without its norm grad_norm is NaN."""
    from grpo_split.modeling import load_causal_lm
    from grpo_split.training.engine import TorchEngine, build_engine
    from grpo_split.training.update import train_on_batch

    invariance, model_dir, whole = invariance_inputs
    case, config = _default_run_config(invariance, model_dir, max_grad_norm)
    batch = invariance.case_inputs(case, whole)
    engine = build_engine(config, load_causal_lm(str(model_dir), torch.float32), 1, torch.float32)
    assert engine.zero_optimization_stage() == 0 and engine.gradient_clipping() == 0.0
    engine.train()
    ours = train_on_batch(engine, batch, config, 1)
    plain = TorchEngine(config, load_causal_lm(str(model_dir), torch.float32))
    plain.train()
    expected = train_on_batch(plain, batch, config, 1)
    for (name, got), (_, want) in zip(engine.module.policy.named_parameters(),
                                      plain.module.policy.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert ours["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    if max_grad_norm > 0:
        assert expected["grad_norm"] > 10 * max_grad_norm  # the clip really bites in this case


def test_default_engine_of_one_process_runs_no_all_reduce(invariance_inputs, world_of_one, monkeypatch):
    """On one rank the gradient all-reduce is the identity, and DeepSpeed's stage-0 all-reduce flattens
    the whole gradient into a copy to run it (1.8 GiB at Qwen2.5-0.5B's shape): it is switched off."""
    from grpo_split.modeling import load_causal_lm
    from grpo_split.training.engine import build_engine
    from grpo_split.training.update import train_on_batch

    invariance, model_dir, whole = invariance_inputs
    case, config = _default_run_config(invariance, model_dir, 1.0)
    engine = build_engine(config, load_causal_lm(str(model_dir), torch.float32), 1, torch.float32)

    def all_reduce(*args, **kwargs):
        raise AssertionError("a gradient all-reduce ran on a world of one")

    monkeypatch.setattr(engine, "allreduce_gradients", all_reduce)
    engine.train()
    train_on_batch(engine, invariance.case_inputs(case, whole), config, 1)
