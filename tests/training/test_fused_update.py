"""The update's loss runs fused into the LM head (`modeling.completion_loss` -> `stable_ops.linear_policy_loss`)
and gives what the unfused `policy_loss(completion_logps(...))` gives: value, metrics and every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script

import grpo_split.modeling as modeling
from grpo_split.modeling import completion_logps, completion_loss, load_causal_lm
from grpo_split.training.engine import TorchEngine
from grpo_split.training.update import train_on_batch
from stable_ops import policy_loss

invariance = load_script("check_update_invariance")


@pytest.fixture(scope="module")
def step_inputs(tmp_path_factory):
    model_dir = invariance.build_model(tmp_path_factory.mktemp("fused") / "model")
    return model_dir, invariance.make_step_batch(model_dir)


@pytest.mark.parametrize("loss_type, level, beta", [("grpo", "token", 0.1), ("dapo", "sequence", 0.0),
                                                     ("dr_grpo", "token", 0.04)])
def test_fused_loss_equals_policy_loss_of_the_log_probs(step_inputs, loss_type, level, beta):
    model_dir, batch = step_inputs
    settings = {"beta": beta, "epsilon_low": 0.2, "epsilon_high": 0.28, "loss_type": loss_type,
                "max_completion_length": batch.completion_mask.shape[1], "importance_sampling_level": level,
                "num_items": 37.0}
    results = []
    for fused in (True, False):
        model = load_causal_lm(str(model_dir), torch.float64)
        args = (model, batch.input_ids, batch.attention_mask, batch.prompt_length, batch.temperature)
        if fused:
            loss, metrics = completion_loss(*args, old_logps=batch.old_logps.double(),
                                            ref_logps=lambda: batch.ref_logps.double(),
                                            advantages=batch.advantages.double(),
                                            mask=batch.completion_mask, loss_settings=settings)
        else:
            loss, metrics = policy_loss(completion_logps(*args), batch.old_logps.double(), batch.ref_logps.double(),
                                        batch.advantages.double(), batch.completion_mask, **settings)
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused_metrics, fused_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(fused_loss, loss, rtol=1e-9, atol=1e-12)
    assert fused_metrics.keys() == metrics.keys()
    for key in metrics:
        torch.testing.assert_close(fused_metrics[key].double(), metrics[key].double(), rtol=1e-9, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)


def test_every_micro_batch_of_the_update_runs_the_fused_loss(step_inputs, monkeypatch):
    model_dir, batch = step_inputs
    calls = []
    real = modeling.linear_policy_loss

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "linear_policy_loss", counting)
    case = invariance.Case(2, False, 2, 1, "grpo", "token", 0.1, 2, "local")
    config = invariance.run_config(case, model_dir)
    engine = TorchEngine(config, load_causal_lm(str(model_dir), torch.float32))
    train_on_batch(engine, invariance.case_inputs(case, batch), config, world_size=1)
    assert len(calls) == case.ga * case.num_iterations  # 2 micro-batches x 2 passes, all fused
