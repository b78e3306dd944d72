"""Rollouts (grpo_split.rollouts): sampling, what reward functions receive, the wire batch, metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from grpo_split.contract.batch import Batch, decode_batch, encode_batch
from grpo_split.rollouts.build import make_rollouts, reward_columns, rollouts_from_batch
from grpo_split.rollouts.metrics import rollout_metrics
from grpo_split.rollouts.rewards import load_reward_funcs
from grpo_split.rollouts.sampling import (
    SamplingSettings,
    eos_token_ids,
    left_pad,
    overridden_generation_defaults,
    sample_completions,
)


def test_left_pad_aligns_prompts_on_the_right():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rollout_metrics_over_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, float("nan"), 3.0])  # groups of 2: equal, spread, NaN + 3
    per_func = torch.stack([rewards, torch.zeros(6)], dim=1)
    lengths = torch.tensor([4, 8, 8, 2, 5, 8])
    truncated = torch.tensor([False, True, True, False, False, True])
    metrics = rollout_metrics(rewards, per_func, ["a", "b"], lengths, truncated, num_generations=2)
    assert metrics["reward"] == pytest.approx(7 / 5)  # the NaN is left out
    # No signal from the flat first group, nor from the third, where only one reward was scored.
    assert metrics["frac_reward_zero_std"] == pytest.approx(2 / 3)
    assert metrics["completions/mean_length"] == pytest.approx(35 / 6)
    assert metrics["completions/clipped_ratio"] == pytest.approx(0.5)
    assert metrics["rewards/b/mean"] == 0.0 and metrics["rewards/b/std"] == 0.0
    single = rollout_metrics(torch.tensor([1.0, float("nan")]), torch.zeros(2, 0), [], lengths[:2], truncated[:2], 2)
    assert single["reward"] == 1.0 and math.isnan(single["reward_std"])


def none_for_the_first(prompts, completions, **columns):
    return [None] + [1.0] * (len(completions) - 1)


def test_make_rollouts_builds_a_valid_wire_batch(toy_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    rows = [{"prompt": "copy the digit 3", "answer": "3"}, {"prompt": "7 is the digit to copy", "answer": "7"}]
    funcs = load_reward_funcs(["test_rollout:none_for_the_first", "examples.toy.toy_task:answer_format_reward"])
    torch.manual_seed(0)
    eos = eos_token_ids(tokenizer, model)
    rollouts = make_rollouts(
        model, tokenizer, rows, prompt_column="prompt", answer_column="answer", system_prompt="be brief",
        settings=SamplingSettings(num_generations=4, max_completion_length=6, temperature=1.0, top_p=1.0),
        reward_funcs=funcs, reward_weights=[1.0, 0.5], scale_rewards="group", mask_truncated=True,
        policy_version=3, eos_ids=eos, pad_id=tokenizer.pad_token_id,
    )
    batch = rollouts.batch
    P, C = batch.prompt_length, batch.completion_length
    assert batch.batch_size == 8 and C <= 6 and batch.num_generations == 4 and batch.policy_version == 3
    # Prompts are left-padded and repeated G times; rows of a group share their prompt.
    assert torch.equal(batch.input_ids[0, :P], batch.input_ids[3, :P])
    assert batch.attention_mask[:, P - 1].all()
    # The completion mask covers up to and including the first EOS; truncated rows are zeroed.
    completion = batch.input_ids[:, P:]
    for row in range(8):
        hits = torch.isin(completion[row], torch.tensor(eos)).nonzero()
        if len(hits):
            end = int(hits[0]) + 1
            assert batch.completion_mask[row, :end].all() and not batch.completion_mask[row, end:].any()
            assert int(rollouts.lengths[row]) == end
        else:
            assert rollouts.truncated[row] and not batch.completion_mask[row].any()
    # Row 0: the first function could not score it, the second gave a weighted score.
    assert math.isnan(rollouts.per_func[0, 0]) and rollouts.rewards[0] == pytest.approx(0.5 * rollouts.per_func[0, 1])
    # The wire batch is finite and survives encoding; with the old log-probs a worker adds, it is an upload.
    assert batch.old_logps is None
    uploaded = dataclasses.replace(batch, old_logps=torch.zeros(batch.completion_mask.shape))
    decoded = decode_batch(encode_batch(uploaded), vocab_size=len(tokenizer), require_rollout=True)
    assert torch.equal(decoded.input_ids, batch.input_ids) and torch.equal(decoded.advantages, batch.advantages)


# ----------------------------------------------------------------------------------- sampling = the loss's distribution

# What instruct models ship in generation_config.json, and more: every one of these would reshape
# the distribution completions are drawn from, or the stopping rule.
SHIPPED_DEFAULTS = {
    "do_sample": True, "temperature": 0.3, "top_p": 0.5, "top_k": 3, "min_p": 0.2, "repetition_penalty": 1.8,
    "no_repeat_ngram_size": 2, "min_new_tokens": 4, "typical_p": 0.9,
}


@pytest.fixture(scope="module")
def instruct_like_model_dir(toy_model_dir, tmp_path_factory):
    """The toy model with a generation_config.json full of sampling defaults, as instruct models have."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("instruct_like") / "model"
    shutil.copytree(toy_model_dir, out)
    config = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").exists() \
        else {}
    (out / "generation_config.json").write_text(json.dumps({**config, **SHIPPED_DEFAULTS}))
    return out


def test_sampling_draws_from_softmax_of_logits_over_temperature_whatever_the_model_ships(instruct_like_model_dir):
    """The log-probs `generate` reports for its sampled tokens (its processed scores) equal the
    log-probs the loss computes for them: the sampler and the loss use one distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_split.modeling import completion_logps
    from grpo_split.rollouts.sampling import encode_prompts
    from stable_ops import completion_mask

    tokenizer = AutoTokenizer.from_pretrained(instruct_like_model_dir)
    model = AutoModelForCausalLM.from_pretrained(instruct_like_model_dir).eval()
    assert model.generation_config.repetition_penalty == 1.8  # the shipped defaults are really loaded
    settings = SamplingSettings(num_generations=4, max_completion_length=8, temperature=1.3, top_p=1.0)
    assert overridden_generation_defaults(model, settings) == {
        key: value for key, value in SHIPPED_DEFAULTS.items() if key != "do_sample"}
    eos = eos_token_ids(tokenizer, model)
    prompt_ids, prompt_mask = left_pad(encode_prompts(tokenizer, ["copy the digit 3", "7 is it"], None),
                                       tokenizer.pad_token_id)
    torch.manual_seed(0)
    completions, sampler_logps = sample_completions(model, prompt_ids, prompt_mask, settings, eos,
                                                    tokenizer.pad_token_id, return_sampler_logps=True)
    attend = completion_mask(completions, eos).bool()  # (N, C): the sampled tokens, through the first EOS
    ids = torch.cat([prompt_ids.repeat_interleave(4, dim=0), completions], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(4, dim=0), attend.long()], dim=1)
    with torch.no_grad():
        loss_logps = completion_logps(model, ids, mask, prompt_ids.shape[1], temperature=1.3)
    torch.testing.assert_close(sampler_logps[attend], loss_logps[attend], atol=2e-5, rtol=0)
    assert model.generation_config.repetition_penalty == 1.8  # the model's own config is left as it was


class FirstForwards:
    """The (rows, tokens) of the model's first forwards (through its input embedding), while active."""

    def __init__(self, model, count=2):
        self.model, self.count, self.shapes = model, count, []

    def __enter__(self):
        def record(module, args):
            if len(self.shapes) < self.count:
                self.shapes.append(tuple(args[0].shape))

        self.handle = self.model.get_input_embeddings().register_forward_pre_hook(record)
        return self.shapes

    def __exit__(self, *exc):
        self.handle.remove()


def test_each_prompt_is_prefilled_once_and_sampled_as_before(toy_model_dir):
    """The prefill-once path forwards each distinct prompt once, then each row's last prompt token, and
    draws what the plain generate (every prompt repeated G times) draws from the same seed, from the
    same processed scores: the same tokens and sampler log-probs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_split.modeling import UNSHARED, prefix_plan
    from grpo_split.rollouts.sampling import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    assert prefix_plan(model).shared, prefix_plan(model).reason
    eos = eos_token_ids(tokenizer, model)
    # Three prompts of different real lengths, two of them equal: 2 distinct prompts, 12 rows.
    prompts = encode_prompts(tokenizer, ["copy the digit 3", "7 is it", "copy the digit 3"], None)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    P = prompt_ids.shape[1]
    settings = SamplingSettings(num_generations=4, max_completion_length=12, temperature=1.3, top_p=0.9)
    runs = {}
    for name, prefix in (("shared", None), ("plain", UNSHARED)):
        torch.manual_seed(0)
        with FirstForwards(model) as shapes:
            runs[name] = sample_completions(model, prompt_ids, prompt_mask, settings, eos, tokenizer.pad_token_id,
                                            return_sampler_logps=True, prefix=prefix)
        runs[name + " forwards"] = shapes
    assert runs["shared forwards"] == [(2, P - 1), (12, 1)]
    assert runs["plain forwards"] == [(12, P), (12, 1)]
    (shared, shared_logps), (plain, plain_logps) = runs["shared"], runs["plain"]
    assert torch.equal(shared, plain)
    drawn = torch.isfinite(plain_logps)
    assert drawn[:, 0].all() and torch.equal(drawn, torch.isfinite(shared_logps))
    torch.testing.assert_close(shared_logps[drawn], plain_logps[drawn], atol=1e-5, rtol=0)


def test_a_model_that_cannot_share_samples_through_the_plain_generate():
    """Gemma 2's sliding-window cache: the plan says why it cannot share, and sampling repeats each
    prompt G times as before, still drawing from the distribution the loss computes."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from grpo_split.modeling import completion_logps, prefix_plan
    from stable_ops import completion_mask

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, initializer_range=0.2, eos_token_id=1,
        pad_token_id=0, bos_token_id=2)).eval()
    plan = prefix_plan(model)
    assert not plan.shared and "DynamicSlidingWindowLayer" in plan.reason, plan.reason
    prompt_ids, prompt_mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    settings = SamplingSettings(num_generations=3, max_completion_length=6, temperature=0.8, top_p=1.0)
    torch.manual_seed(1)
    with FirstForwards(model, count=1) as shapes:
        completions, sampler_logps = sample_completions(model, prompt_ids, prompt_mask, settings, [1], 0,
                                                        return_sampler_logps=True)
    assert shapes == [(6, 4)]
    attend = completion_mask(completions, [1]).bool()
    ids = torch.cat([prompt_ids.repeat_interleave(3, dim=0), completions], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(3, dim=0), attend.long()], dim=1)
    with torch.no_grad():
        loss_logps = completion_logps(model, ids, mask, prompt_ids.shape[1], temperature=0.8)
    torch.testing.assert_close(sampler_logps[attend], loss_logps[attend], atol=2e-5, rtol=0)


def test_a_model_without_shipped_defaults_overrides_nothing(toy_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    assert overridden_generation_defaults(model, SamplingSettings(2, 4, 1.0, 1.0)) == {}


# ----------------------------------------------------------------------------------- what reward functions receive


def test_the_configured_answer_column_is_passed_as_answer():
    rows = [{"question": "q1", "solution": "3", "answer": "stale", "level": 1},
            {"question": "q2", "solution": "7", "answer": "stale", "level": 2}]
    columns = reward_columns(rows, "question", "solution", repeat=2)
    assert columns == {"answer": ["3", "3", "7", "7"], "level": [1, 1, 2, 2]}
    # None: nothing is passed as `answer`, not even the dataset's column of that name.
    assert reward_columns(rows, "question", None, repeat=1) == {"solution": ["3", "7"], "level": [1, 2]}
    assert reward_columns(rows, "question", "answer", repeat=1) == {"answer": ["stale", "stale"],
                                                                  "solution": ["3", "7"], "level": [1, 2]}


def test_accuracy_reward_scores_a_dataset_whose_gold_column_is_named_otherwise(toy_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    rows = [{"prompt": "copy the digit 3", "solution": "3"}, {"prompt": "copy the digit 7", "solution": "7"}]
    torch.manual_seed(0)
    rollouts = make_rollouts(
        model, tokenizer, rows, prompt_column="prompt", answer_column="solution", system_prompt=None,
        settings=SamplingSettings(num_generations=2, max_completion_length=6, temperature=1.0, top_p=1.0),
        reward_funcs=load_reward_funcs(["accuracy"]), reward_weights=None, scale_rewards="group",
        mask_truncated=False, policy_version=0, eos_ids=eos_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id,
    )
    assert rollouts.rewards.shape == (4,)
    # Every completion has a gold answer now, so accuracy scores all of them (0 or 1, never None).
    assert torch.isin(rollouts.rewards, torch.tensor([0.0, 1.0])).all()
    assert rollouts.batch.scored.tolist() == [1, 1, 1, 1]


# ----------------------------------------------------------------------------------- a batch from the wire


def test_a_wire_batch_reports_truncation_by_missing_eos_and_leaves_unscored_rewards_out():
    eos = 9
    completions = torch.tensor([
        [3, 4, eos, 0, 0],   # ended by EOS, the longest of the batch that ended
        [3, 4, 5, 6, eos],   # ended by EOS exactly at the length limit: not truncated
        [3, 4, 5, 6, 7],     # no EOS: truncated
        [3, eos, 0, 0, 0],
    ])
    attend = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    prompt = torch.ones(4, 2, dtype=torch.long)
    batch = Batch(input_ids=torch.cat([prompt, completions], 1), prompt_length=2,
                  attention_mask=torch.cat([prompt, attend], 1), rewards=torch.tensor([1.0, 0.0, 2.0, 0.0]),
                  scored=torch.tensor([1, 1, 1, 0]), num_generations=2)
    view = rollouts_from_batch(batch, [eos], num_reward_funcs=0)
    rewards, lengths, truncated = view.rewards, view.lengths, view.truncated
    assert truncated.tolist() == [False, False, True, False]
    assert lengths.tolist() == [3, 5, 5, 2]
    metrics = rollout_metrics(rewards, torch.zeros(4, 0), [], lengths, truncated, num_generations=2)
    assert metrics["reward"] == pytest.approx(1.0)  # (1 + 0 + 2) / 3: the unscored 0 is not a reward
    assert metrics["completions/clipped_ratio"] == pytest.approx(0.25)
