"""The update step (grpo_split.training.update) on `TorchEngine`: the same checks as the DeepSpeed
invariance tests, without DeepSpeed or a process group, in milliseconds per case."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_script

from grpo_split.modeling import load_causal_lm
from grpo_split.training.engine import TorchEngine
from grpo_split.training.update import train_on_batch

invariance = load_script("check_update_invariance")
Case = invariance.Case

# Every loss type and both importance-sampling levels, with and without accumulation, old
# log-probs from a worker or computed by the step, KL on and off.
CASES = [
    Case(2, False, 1, 1, "grpo", "token", 0.1, 1, "server"),
    Case(2, False, 2, 1, "grpo", "token", 0.0, 2, "local"),
    Case(2, False, 4, 1, "bnpo", "token", 0.1, 1, "server"),
    Case(2, False, 2, 1, "bnpo", "sequence", 0.0, 2, "server"),
    Case(2, False, 2, 1, "dr_grpo", "token", 0.1, 2, "local"),
    Case(2, False, 4, 1, "dapo", "token", 0.0, 1, "server"),
    Case(2, False, 2, 1, "dapo", "sequence", 0.1, 2, "local"),
]


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory):
    model_dir = invariance.build_model(tmp_path_factory.mktemp("update") / "model")
    return model_dir, invariance.make_step_batch(model_dir)


def torch_engine(case, model_dir, **overrides):
    config = invariance.run_config(case, model_dir)
    for name, value in overrides.items():
        setattr(config.training, name, value)
    return config, TorchEngine(config, load_causal_lm(str(model_dir), torch.float32))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name.removeprefix("zero2-").removesuffix(""))
def test_one_update_equals_the_whole_batch_update(case, step_inputs):
    model_dir, whole = step_inputs
    config, engine = torch_engine(case, model_dir)
    result = train_on_batch(engine, invariance.case_inputs(case, whole), config, world_size=1)
    ours = {name: p.detach() for name, p in engine.module.policy.named_parameters()}
    error = invariance.compare(case, model_dir, ours, invariance.reference_update(case, model_dir, whole))
    assert error <= invariance.TOLERANCE, f"{case.name}: relative error {error:.2e}"
    assert result["nonfinite_updates"] == 0 and math.isfinite(result["loss"]) and math.isfinite(result["grad_norm"])
    assert result["learning_rate"] == invariance.LEARNING_RATE


def test_a_non_finite_micro_batch_skips_the_update_and_keeps_the_schedule(step_inputs):
    """NaN advantages in the second micro-batch: no parameter moves, the schedule still advances (the
    next update gets its own warmup rate), and the step reports it."""
    model_dir, whole = step_inputs
    case = Case(2, False, 2, 1, "grpo", "token", 0.0, 1, "server")
    config, engine = torch_engine(case, model_dir, warmup_steps=3)
    before = {name: p.detach().clone() for name, p in engine.module.policy.named_parameters()}
    poisoned = invariance.case_inputs(case, whole)
    poisoned.advantages = poisoned.advantages.clone()
    poisoned.advantages[-1] = math.nan
    result = train_on_batch(engine, poisoned, config, world_size=1)
    assert result["nonfinite_updates"] == 1
    assert result["learning_rate"] == pytest.approx(invariance.LEARNING_RATE / 4)  # warmup's first rate
    for name, param in engine.module.policy.named_parameters():
        assert torch.equal(param, before[name]), name
    result = train_on_batch(engine, invariance.case_inputs(case, whole), config, world_size=1)
    assert result["nonfinite_updates"] == 0
    assert result["learning_rate"] == pytest.approx(invariance.LEARNING_RATE * 2 / 4)  # its own slot
