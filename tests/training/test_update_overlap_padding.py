"""The update's cheapness without changing it: the reference request overlaps the first forward,
and micro-batches drop the columns that are padding in all their rows (grouped by length)."""

from __future__ import annotations

import threading

import torch
from conftest import load_script

from grpo_split.modeling import completion_logps, load_causal_lm
from grpo_split.training.engine import TorchEngine
from grpo_split.training.reference import PendingReference
from grpo_split.training.update import micro_batch_rows, padding_fraction, train_on_batch, trim_padding

invariance = load_script("check_update_invariance")


def step_inputs(tmp_path):
    model_dir = invariance.build_model(tmp_path / "model")
    return model_dir, invariance.make_step_batch(model_dir)


def test_trimmed_rows_give_the_untrimmed_log_probs(tmp_path):
    model_dir, batch = step_inputs(tmp_path)
    model = load_causal_lm(str(model_dir), torch.float64)
    rows = torch.tensor([0, 1, 2, 3])  # one group: its prompt is shorter than the longest, so left pad is cut
    ids, mask, prompt_length, kept = trim_padding(batch, rows)
    assert ids.shape[1] < batch.input_ids.shape[1] and prompt_length < batch.prompt_length
    whole = completion_logps(model, batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_length)
    trimmed = completion_logps(model, ids, mask, prompt_length)
    real = batch.attention_mask[rows, batch.prompt_length :].bool()
    assert torch.allclose(trimmed, whole[:, :kept], atol=1e-10)
    assert not real[:, kept:].any()  # nothing real was cut


def test_micro_batches_keep_groups_whole_and_sorted_by_length_except_for_bnpo(tmp_path):
    _, batch = step_inputs(tmp_path)
    G, P = batch.num_generations, batch.prompt_length
    # Alternate long and short groups: completions of every token, and of one token.
    for group in range(0, batch.batch_size // G, 2):
        rows = slice(group * G, (group + 1) * G)
        batch.attention_mask[rows, P + 1 :] = 0
        batch.completion_mask[rows, 1:] = 0
    parts = micro_batch_rows(batch, 2, "grpo")
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(batch.batch_size))
    groups = rows.view(-1, G)
    assert (groups // G == groups[:, :1] // G).all()  # every group stays whole and in order
    longest = batch.attention_mask.sum(1)[rows].view(-1, G).amax(1)
    assert (longest[1:] >= longest[:-1]).all()
    assert padding_fraction(batch, parts) < padding_fraction(batch, micro_batch_rows(batch, 2, "bnpo"))
    assert torch.equal(torch.cat(micro_batch_rows(batch, 2, "bnpo")), torch.arange(batch.batch_size))


class SlowReferenceClient:
    """A reference server that answers only once the policy's first forward has run (or fails after 20 s)."""

    def __init__(self, ref_logps: torch.Tensor, first_forward: threading.Event):
        self.ref_logps, self.first_forward = ref_logps, first_forward

    def logps(self, batch):
        if not self.first_forward.wait(timeout=20):
            raise TimeoutError("the update waited for the reference before any forward ran")
        return self.ref_logps


def test_the_reference_request_is_answered_while_the_first_forward_runs(tmp_path):
    model_dir, batch = step_inputs(tmp_path)
    case = invariance.Case(2, False, 2, 1, "grpo", "token", 0.1, 1, "local")
    config = invariance.run_config(case, model_dir)
    engine = TorchEngine(config, load_causal_lm(str(model_dir), torch.float32))
    first_forward = threading.Event()
    # Set when the transformer's first forward has run: the reference must only be waited for after it.
    engine.module.policy.base_model.register_forward_hook(lambda *_: first_forward.set())
    ref_logps, batch.ref_logps, batch.old_logps = batch.ref_logps, None, None
    reference = PendingReference(SlowReferenceClient(ref_logps, first_forward), batch)
    result = train_on_batch(engine, batch, config, world_size=1, reference=reference)
    assert torch.equal(batch.ref_logps, ref_logps) and result["kl"] > 0
