"""completion_logps and the LM-head plan on tiny real architectures, against the models' own forward.

Every reference here is the naive one, written out in this file: each row alone and unpadded
through the model's own `forward`, `log_softmax(logits[P-1:-1] / T)` in float64 at the completion
tokens. None of it goes through `grpo_split.modeling` or `stable_ops`, so an index slip or a
wrong head transform in either shows up as a difference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB
from helpers import assert_close_normwise

from grpo_split.modeling import (
    LMHeadPlan,
    completion_logps,
    frozen_logps,
    lm_head_plan,
    load_frozen_model,
)

TEMPERATURE = 0.7
PAD = 0
# Rows of the test batch: (prompt length, completion length). Prompts are left-padded to the
# longest (row 1 by two tokens), completions right-padded (row 2 by two, masked out).
ROWS = [(5, 4), (3, 4), (5, 2)]
# float32 model: the fused head and the padded batch change only rounding.
ATOL = 2e-5
SMALL = {"vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2}


# ---- tiny models, saved and loaded back through from_pretrained ------------------------------------


def save_tiny(model_class, config, out_dir, seed=0):
    torch.manual_seed(seed)
    model_class(config).save_pretrained(out_dir)
    return out_dir


def build_granite(out_dir):
    from transformers import GraniteConfig, GraniteForCausalLM

    return save_tiny(GraniteForCausalLM, GraniteConfig(**SMALL, logits_scaling=8.0, tie_word_embeddings=False), out_dir)


def build_gemma2(out_dir, softcap=5.0):
    """Soft-capped at 5: the random model's logits reach about 4, so the cap bites at natural scale."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SMALL, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=softcap)
    return save_tiny(Gemma2ForCausalLM, config, out_dir)  # tied embeddings, Gemma's default


def build_gpt2(out_dir):
    """Absolute position embeddings: a left-padded row is right only if positions come from the mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=1)
    return save_tiny(GPT2LMHeadModel, config, out_dir)


def build_qwen2_announcing_a_cap(out_dir):
    """A config that announces a soft-cap its model's forward (Qwen2) never applies."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SMALL, tie_word_embeddings=False)
    config.final_logit_softcapping = 5.0
    return save_tiny(Qwen2ForCausalLM, config, out_dir)


def transformed_logits_class(transform):
    """A Qwen2 whose forward applies `transform` to its logits, which its config does not announce."""
    from transformers import Qwen2ForCausalLM

    class TransformedLogitsQwen2(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = transform(out.logits)
            return out

    return TransformedLogitsQwen2


UNANNOUNCED = {
    "tripled": lambda logits: logits * 3.0,
    "capped": lambda logits: 30.0 * torch.tanh(logits / 30.0),
}


def load(kind: str, path, dtype=torch.float32, trainable=False):
    """Load a saved tiny model as `kind`; patched kinds are changed before the plan is ever computed."""
    from transformers import AutoModelForCausalLM

    if not trainable and kind not in (*UNANNOUNCED, "biased"):
        return load_frozen_model(str(path), torch.device("cpu"), dtype)  # computes the plan at load
    model_class = transformed_logits_class(UNANNOUNCED[kind]) if kind in UNANNOUNCED else AutoModelForCausalLM
    model = model_class.from_pretrained(str(path), dtype=dtype).eval()
    if kind == "biased":
        head = model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=dtype)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(5)))
        model.lm_head = biased
    model.requires_grad_(trainable)
    return model


# What each kind's plan must be: (fused, logit_scale, softcap), or a phrase of the fallback's reason.
EXPECTED_PLANS = {
    "qwen2": (True, 1.0, None),
    "granite": (True, 0.125, None),
    "gemma2": (True, 1.0, 5.0),
    "gpt2": (True, 1.0, None),
    "qwen2_announcing_a_cap": (True, 1.0, None),
    "tripled": "no transform linear_logps can express",
    "biased": "has a bias",
}


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {
        "qwen2": tiny_model_dir, "tripled": tiny_model_dir, "biased": tiny_model_dir,
        "granite": build_granite(root / "granite"),
        "gemma2": build_gemma2(root / "gemma2"),
        "gpt2": build_gpt2(root / "gpt2"),
        "qwen2_announcing_a_cap": build_qwen2_announcing_a_cap(root / "qwen2_cap"),
    }


@pytest.fixture(scope="module")
def frozen(model_dirs):
    """One frozen float32 model per kind, loaded once."""
    return {kind: load(kind, path) for kind, path in model_dirs.items()}


# ---- the batch and the naive reference ---------------------------------------------------------------


def make_rows(seed=0, rows=ROWS):
    gen = torch.Generator().manual_seed(seed)
    # Ids from 2 up: PAD (0) never appears as a real token, so padding cannot pass for one.
    return [(torch.randint(2, TINY_VOCAB, (p,), generator=gen), torch.randint(2, TINY_VOCAB, (c,), generator=gen))
            for p, c in rows]


def pad_rows(rows):
    """Left-pad prompts and right-pad completions: (B, P + C) ids and mask, and P."""
    prompt_len = max(len(p) for p, _ in rows)
    completion_len = max(len(c) for _, c in rows)
    ids = torch.full((len(rows), prompt_len + completion_len), PAD)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, prompt_len - len(p) : prompt_len + len(c)] = torch.cat([p, c])
        mask[i, prompt_len - len(p) : prompt_len + len(c)] = 1
    return ids, mask, prompt_len


def naive_logps64(model, prompt, completion, temperature=TEMPERATURE):
    """(C,) float64: the row alone, unpadded, through the model's own forward."""
    ids = torch.cat([prompt, completion])[None]  # (1, P + C)
    logits = model(input_ids=ids).logits[0].double()  # (P + C, V)
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)  # (C, V)
    return logps.gather(-1, completion[:, None]).squeeze(-1)


def assert_rows_match(out, model, rows, atol=ATOL):
    assert out.shape == (len(rows), max(len(c) for _, c in rows))
    with torch.no_grad():
        for i, (prompt, completion) in enumerate(rows):
            torch.testing.assert_close(out[i, : len(completion)].double(), naive_logps64(model, prompt, completion),
                                       atol=atol, rtol=0)


# ---- the plan ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EXPECTED_PLANS))
def test_plan_picks_the_transform_the_forward_applies(frozen, kind):
    plan = lm_head_plan(frozen[kind])
    expected = EXPECTED_PLANS[kind]
    if isinstance(expected, str):
        assert not plan.fused and expected in plan.reason, plan.reason
        assert plan.reason.startswith("full logits")
    else:
        assert (plan.fused, plan.logit_scale, plan.softcap) == expected, plan.reason


@pytest.mark.parametrize("kind", list(EXPECTED_PLANS))
def test_completion_logps_equal_the_models_own_logits(frozen, kind):
    """Left- and right-padded rows at temperature 0.7, each equal to its row alone through forward()."""
    model, rows = frozen[kind], make_rows(seed=1)
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad():
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    assert out.dtype == torch.float32
    assert_rows_match(out, model, rows)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
def test_positions_come_from_the_mask(frozen, fused):
    """GPT-2's absolute positions: the left-padded row equals itself alone, unpadded, on both head paths."""
    model = frozen["gpt2"]
    rows = make_rows(seed=2, rows=[(6, 3), (2, 3)])
    ids, mask, prompt_len = pad_rows(rows)
    head = lm_head_plan(model) if fused else LMHeadPlan(fused=False)
    with torch.no_grad():
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, head=head)
        prompt, completion = rows[1]
        alone = completion_logps(model, torch.cat([prompt, completion])[None], None, len(prompt), TEMPERATURE,
                                 head=head)
    torch.testing.assert_close(out[1], alone[0], atol=ATOL, rtol=0)
    assert_rows_match(out, model, rows)
    # Positions matter for this model: the same tokens shifted by the padding give other log-probs.
    with torch.no_grad():
        shifted = model(input_ids=ids[1:], attention_mask=mask[1:]).logits  # default positions 0..T-1
    naive_shifted = torch.log_softmax(shifted[0, prompt_len - 1 : -1].double() / TEMPERATURE, -1)
    naive_shifted = naive_shifted.gather(-1, completion[:, None]).squeeze(-1)
    assert (naive_shifted - alone[0].double()).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["qwen2", "granite", "gemma2", "tripled"])
def test_gradients_equal_the_naive_forwards(model_dirs, kind):
    """Gradients reach every parameter and equal those of the naive per-row forward (fused and logits paths)."""
    model = load(kind, model_dirs[kind], trainable=True)
    reference = load(kind, model_dirs[kind], trainable=True)
    rows = make_rows(seed=3)
    ids, mask, prompt_len = pad_rows(rows)
    weights = torch.randn(len(rows), max(len(c) for _, c in rows), generator=torch.Generator().manual_seed(4))

    out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    completion_mask = mask[:, prompt_len:]
    (out * weights * completion_mask).sum().backward()
    naive_loss = sum((naive_logps64(reference, p, c) * weights[i, : len(c)].double()).sum()
                     for i, (p, c) in enumerate(rows))
    naive_loss.backward()

    params = dict(model.named_parameters())
    for name, ref_param in reference.named_parameters():
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert_close_normwise(grad, ref_param.grad, 1e-4)
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0  # tied or not, the head's weight learns


def test_explicit_logits_plan_on_a_plain_model(frozen):
    """`head=` is obeyed: the logits path on a model whose plan is fused gives the same log-probs."""
    model, rows = frozen["granite"], make_rows(seed=5)
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad():
        out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE, head=LMHeadPlan(fused=False))
    assert_rows_match(out, model, rows)


def test_the_plan_is_computed_at_load_and_cached(model_dirs):
    model = load("granite", model_dirs["granite"])
    forwards = []
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: forwards.append(1))
    plan = lm_head_plan(model)
    assert lm_head_plan(model) is plan and forwards == []  # load_frozen_model already ran the check
    rows = make_rows(seed=6)
    ids, mask, prompt_len = pad_rows(rows)
    frozen_logps(model, ids, mask, prompt_len, TEMPERATURE)
    assert len(forwards) == 1 and lm_head_plan(model) is plan


def test_the_check_leaves_training_mode_as_it_was(model_dirs):
    model = load("gemma2", model_dirs["gemma2"], trainable=True).train()
    model.model.layers[0].eval()  # a mixed state, restored module by module
    plan = lm_head_plan(model)
    assert plan.fused and plan.softcap == 5.0
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


def test_bfloat16_soft_cap_is_told_apart_by_the_amplified_probe(model_dirs, tmp_path):
    """At the natural scale of a random model (logits about 5), a cap of 30 barely changes the logits:
    in bfloat16 the plain head is within rounding of the model there. Only the amplified probe tells
    them apart, so a cap the config does not announce must still end in the logits fallback."""
    unannounced = load("capped", model_dirs["qwen2"], dtype=torch.bfloat16)
    rows = make_rows(seed=7)
    ids, mask, prompt_len = pad_rows(rows)
    with torch.no_grad():
        plain = completion_logps(unannounced, ids, mask, prompt_len, TEMPERATURE, head=LMHeadPlan(fused=True))
    assert_rows_match(plain, unannounced, rows, atol=0.1)  # what the natural-scale check alone would see
    plan = lm_head_plan(unannounced)
    assert not plan.fused and "no transform linear_logps can express" in plan.reason, plan.reason
    with torch.no_grad():
        out = completion_logps(unannounced, ids, mask, prompt_len, TEMPERATURE)
    assert_rows_match(out, unannounced, rows, atol=1e-3)

    # Announced by the config (Gemma 2), the same cap is verified and fused.
    gemma = load("gemma2", build_gemma2(tmp_path / "gemma2_cap30", softcap=30.0), dtype=torch.bfloat16)
    plan = lm_head_plan(gemma)
    assert plan.fused and (plan.logit_scale, plan.softcap) == (1.0, 30.0), plan.reason
    with torch.no_grad():
        out = completion_logps(gemma, ids, mask, prompt_len, TEMPERATURE)
    assert_rows_match(out, gemma, rows, atol=0.03)  # the plain head is off by 0.08 here


@pytest.mark.parametrize("kind", ["granite", "gemma2"])
def test_fused_head_runs_as_the_heads_own_forward_under_zero3(frozen, kind):
    """A ZeRO-3 partitioned weight (marked by `ds_id`) is only gathered inside the head's forward hooks:
    the transformed fused computation must run there, and the head's forward must be restored after."""
    model, rows = frozen[kind], make_rows(seed=8)
    head = model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    head.weight.ds_id = 0
    try:
        ids, mask, prompt_len = pad_rows(rows)
        with torch.no_grad():
            out = completion_logps(model, ids, mask, prompt_len, TEMPERATURE)
    finally:
        del head.weight.ds_id
        handle.remove()
    assert calls == [(len(rows), max(len(c) for _, c in rows))]  # the head's forward returned the (B, C) log-probs
    assert "forward" not in vars(head)
    assert_rows_match(out, model, rows)


def test_rejects_a_prompt_length_outside_the_sequence(frozen):
    ids = torch.randint(2, TINY_VOCAB, (2, 6))
    for bad in (0, 6, 7):
        with pytest.raises(ValueError, match="prompt_length must be in \\[1, 5\\]"):
            completion_logps(frozen["qwen2"], ids, None, bad)
