"""Each group's prompt forwarded once (`prefix_plan`, `completion_hidden`, `shared_prefix_cache`), on tiny
real architectures: values and gradients (every parameter) equal to those of the plain forward, where
every row forwards its own prompt, and to the naive per-row forward of tests/test_modeling.py.

The batch mixes what GRPO batches hold: groups of rows sharing a prompt (left-padded to different real
lengths, one of them padding all but its last token), a row whose prompt nobody shares, completions
right-padded to different lengths. Which forwards ran is read from the input embedding's calls.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_VOCAB
from helpers import assert_close_normwise
from test_modeling import (
    SMALL,
    TEMPERATURE,
    assert_rows_match,
    build_gemma2,
    build_gpt2,
    build_granite,
    load,
    pad_rows,
    save_tiny,
)

from grpo_split.modeling import (
    UNSHARED,
    LMHeadPlan,
    completion_hidden,
    completion_logps,
    frozen_logps,
    lm_head_plan,
    prefix_plan,
)

# float32: sharing the prompt changes only rounding (measured: 0 to 4e-7 on these models).
ATOL = 1e-5
GRAD_TOL = 1e-5
# (group, prompt length, completion length) per row: group "a" shares a 3-token prompt, "b" a full
# 6-token one, "z" a 1-token prompt (its shared prefix is all padding), "d" is alone.
GROUPED = [("a", 3, 4), ("a", 3, 2), ("a", 3, 4), ("b", 6, 3), ("b", 6, 4), ("z", 1, 4), ("z", 1, 1), ("d", 5, 4)]
DISTINCT_PREFIXES = 4
SHARING = ["qwen2", "llama", "granite", "gpt2"]
KINDS = [*SHARING, "gemma2"]


def build_llama(out_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny(LlamaForCausalLM, LlamaConfig(**SMALL, tie_word_embeddings=False), out_dir)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_prefix")
    return {"qwen2": tiny_model_dir, "llama": build_llama(root / "llama"), "granite": build_granite(root / "granite"),
            "gpt2": build_gpt2(root / "gpt2"), "gemma2": build_gemma2(root / "gemma2")}


@pytest.fixture(scope="module")
def frozen(model_dirs):
    return {kind: load(kind, path) for kind, path in model_dirs.items()}


def grouped_rows(seed=0, layout=GROUPED):
    """[(prompt, completion)] with the rows of a group holding the same prompt tensor."""
    gen = torch.Generator().manual_seed(seed)
    prompts, rows = {}, []
    for group, prompt_len, completion_len in layout:
        if group not in prompts:
            prompts[group] = torch.randint(2, TINY_VOCAB, (prompt_len,), generator=gen)
        rows.append((prompts[group], torch.randint(2, TINY_VOCAB, (completion_len,), generator=gen)))
    return rows


class ForwardShapes:
    """The (rows, tokens) of every forward through the model's input embedding, while active."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __enter__(self):
        embedding = self.model.get_input_embeddings()
        self.handle = embedding.register_forward_pre_hook(lambda module, args: self.shapes.append(tuple(args[0].shape)))
        return self.shapes

    def __exit__(self, *exc):
        self.handle.remove()


def expected_forwards(kind, ids, prompt_len, distinct=DISTINCT_PREFIXES):
    """Shared: the distinct prompts' first P - 1 tokens, then every row's last prompt token and completion
    but the last (the states that predict the completion). Plain: every row whole."""
    rows, length = ids.shape
    if kind in SHARING:
        return [(distinct, prompt_len - 1), (rows, length - prompt_len)]
    return [(rows, length)]


def load_trainable(kind, path):
    """A trainable model with both plans checked right after loading, as `load_causal_lm` does."""
    model = load(kind, path, trainable=True)
    lm_head_plan(model)
    return model


def head_for(model, path):
    return lm_head_plan(model) if path == "fused" else LMHeadPlan(fused=False)


# ---- the plan -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_plan_shares_where_the_cache_allows(frozen, kind):
    plan = prefix_plan(frozen[kind])
    if kind in SHARING:
        assert plan.shared and "matches the plain forward" in plan.reason, plan.reason
    else:  # Gemma 2 alternates sliding-window layers, whose cache keeps only part of a long prompt
        assert not plan.shared and "DynamicSlidingWindowLayer" in plan.reason, plan.reason
        assert plan.reason.startswith("every row forwards its own prompt")


def test_the_plan_is_checked_at_load_and_cached(frozen):
    model = frozen["llama"]  # loaded with load_frozen_model
    with ForwardShapes(model) as shapes:
        plan = prefix_plan(model)
        assert prefix_plan(model) is plan
    assert shapes == []


def shifting_positions(model):
    """The model's base forward, patched to count positions one too far whenever it continues a cache."""
    original = model.model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if cache is not None and cache.get_seq_length() > 0:
            position_ids = position_ids + 1
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        **kwargs)

    model.model.forward = forward
    return model


def ignoring_cache(model):
    """The model's base forward, patched to drop the cache it is given (as a checkpointed layer does)."""
    original = model.model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    model.model.forward = forward
    return model


@pytest.mark.parametrize("patch", [shifting_positions, ignoring_cache])
def test_the_probe_rejects_a_cache_continued_wrong(model_dirs, patch):
    """A model whose continuation from a cache is off by one position, or that loses the cache: the probe's
    shared forward differs from the plain one (or fails), and every row forwards its own prompt."""
    from transformers import AutoModelForCausalLM

    model = patch(AutoModelForCausalLM.from_pretrained(str(model_dirs["qwen2"])).eval())
    lm_head_plan(model)  # as at load: both plans checked before the forwards counted below
    plan = prefix_plan(model)
    assert not plan.shared and plan.reason.startswith("every row forwards its own prompt"), plan.reason
    rows = grouped_rows(seed=1)
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad(), ForwardShapes(model) as shapes:
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    assert shapes == [tuple(ids.shape)]
    assert_rows_match(out, model, rows)


# ---- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_log_probs_equal_the_plain_forward(frozen, kind, path):
    model, rows = frozen[kind], grouped_rows(seed=2)
    ids, mask, prompt_len = pad_rows(rows)
    head = head_for(model, path)
    with torch.no_grad():
        with ForwardShapes(model) as shapes:
            shared = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, head=head)
        plain = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, head=head, prefix=UNSHARED)
    assert shapes == expected_forwards(kind, ids, prompt_len)
    completion_mask = mask[:, prompt_len:].bool()
    torch.testing.assert_close(shared[completion_mask], plain[completion_mask], atol=ATOL, rtol=0)
    assert_rows_match(shared, model, rows)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_completion_hidden_are_the_states_predicting_the_completion(frozen, kind):
    model, rows = frozen[kind], grouped_rows(seed=3)
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad():
        hidden = completion_hidden(model, ids, mask, prompt_len)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        full = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    assert hidden.shape == (len(rows), ids.shape[1] - prompt_len, model.config.hidden_size)
    attended = mask[:, prompt_len:].bool()  # (B, C): states whose next token is real
    torch.testing.assert_close(hidden[attended], full[:, prompt_len - 1 : -1][attended], atol=ATOL, rtol=0)


def test_rows_that_all_differ_take_the_plain_forward(frozen):
    model = frozen["qwen2"]
    rows = grouped_rows(seed=4, layout=[("a", 3, 4), ("b", 6, 2), ("c", 1, 3)])
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad(), ForwardShapes(model) as shapes:
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    assert shapes == [tuple(ids.shape)]
    assert_rows_match(out, model, rows)


def test_frozen_logps_share_within_micro_batches_that_split_groups(frozen):
    """Micro-batches of 3 rows cut groups a, b and z; each shares what it holds."""
    model, rows = frozen["granite"], grouped_rows(seed=5)
    ids, mask, prompt_len = pad_rows(rows)
    with ForwardShapes(model) as shapes:
        out = frozen_logps(model, ids, mask, prompt_len, TEMPERATURE, max_batch_tokens=3 * ids.shape[1])
    C = ids.shape[1] - prompt_len
    # rows 0-2: group a; rows 3-5: b, b, z; rows 6-7: z, d (distinct: the plain forward)
    assert shapes == [(1, prompt_len - 1), (3, C), (2, prompt_len - 1), (3, C), (2, ids.shape[1])]
    with torch.no_grad():
        plain = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, prefix=UNSHARED)
    completion_mask = mask[:, prompt_len:].bool()
    torch.testing.assert_close(out[completion_mask], plain[completion_mask], atol=ATOL, rtol=0)


# ---- gradients ------------------------------------------------------------------------------------------------


def gradients(model, micro_batches, weights, head, prefix=None) -> dict[str, torch.Tensor]:
    """{name: gradient} of sum(logps * weights * completion mask) over the micro-batches, each its own forward."""
    model.zero_grad(set_to_none=True)
    for ids, mask, prompt_len, rows in micro_batches:
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, head=head, prefix=prefix)
        (out * weights[rows] * mask[:, prompt_len:]).sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def assert_same_gradients(shared, plain):
    assert shared.keys() == plain.keys()
    for name, grad in plain.items():
        assert torch.isfinite(shared[name]).all() and grad.abs().sum() > 0, name
        assert_close_normwise(shared[name], grad, GRAD_TOL)


@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_gradients_equal_the_plain_forward(model_dirs, kind, path):
    """Every parameter's gradient, prompt layers included: the rows' gradients sum into their shared prompt."""
    model = load_trainable(kind, model_dirs[kind])
    rows = grouped_rows(seed=6)
    ids, mask, prompt_len = pad_rows(rows)
    weights = torch.randn(ids.shape[0], ids.shape[1] - prompt_len, generator=torch.Generator().manual_seed(7))
    batch = [(ids, mask, prompt_len, slice(None))]
    head = head_for(model, path)
    with ForwardShapes(model) as shapes:
        shared = gradients(model, batch, weights, head)
    assert shapes == expected_forwards(kind, ids, prompt_len)
    assert_same_gradients(shared, gradients(model, batch, weights, head, prefix=UNSHARED))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_a_group_split_across_micro_batches(model_dirs, kind):
    """Micro-batches [0, 2) and [2, 8) cut group a: values and accumulated gradients are the whole batch's."""
    model = load_trainable(kind, model_dirs[kind])
    rows = grouped_rows(seed=8)
    ids, mask, prompt_len = pad_rows(rows)
    weights = torch.randn(ids.shape[0], ids.shape[1] - prompt_len, generator=torch.Generator().manual_seed(9))
    head = lm_head_plan(model)
    micro = [(ids[r], mask[r], prompt_len, r) for r in (slice(0, 2), slice(2, None))]
    with ForwardShapes(model) as shapes:
        shared = gradients(model, micro, weights, head)
    C = ids.shape[1] - prompt_len
    assert shapes == [(1, prompt_len - 1), (2, C), (4, prompt_len - 1), (6, C)]
    whole = [(ids, mask, prompt_len, slice(None))]
    assert_same_gradients(shared, gradients(model, whole, weights, head, prefix=UNSHARED))
    with torch.no_grad():
        parts = torch.cat([completion_logps(model, i, m, p, TEMPERATURE) for i, m, p, _ in micro])
    assert_rows_match(parts, model, rows)


def test_gradient_checkpointing_in_training_takes_the_plain_forward(model_dirs, caplog):
    """transformers' checkpointed layers drop the cache they are given: training forwards must not share,
    and say so once; forwards without gradients (old log-probs, generation) still share."""
    model = load_trainable("qwen2", model_dirs["qwen2"])
    model.gradient_checkpointing_enable()
    model.train()
    rows = grouped_rows(seed=10)
    ids, mask, prompt_len = pad_rows(rows)
    weights = torch.randn(ids.shape[0], ids.shape[1] - prompt_len, generator=torch.Generator().manual_seed(11))
    batch = [(ids, mask, prompt_len, slice(None))]
    head = lm_head_plan(model)
    with caplog.at_level(logging.WARNING, logger="grpo_split.modeling"), ForwardShapes(model) as shapes:
        checkpointed = gradients(model, batch, weights, head)
        gradients(model, batch, weights, head)
    assert shapes == [tuple(ids.shape)] * 2
    assert sum("gradient checkpointing" in record.getMessage() for record in caplog.records) == 1
    model.gradient_checkpointing_disable()
    assert_same_gradients(checkpointed, gradients(model, batch, weights, head, prefix=UNSHARED))
    model.eval()
    with torch.no_grad(), ForwardShapes(model) as shapes:
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    assert shapes == expected_forwards("qwen2", ids, prompt_len)
    assert_rows_match(out, model, rows)
