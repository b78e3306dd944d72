"""The toy world: the tiny Qwen2 + tokenizer builder, the toy dataset and the toy format reward."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from examples.toy import toy_task
from grpo_split.rollouts.rewards import load_reward_funcs

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@pytest.fixture(scope="module")
def builder():
    from examples.toy import make_toy_model

    return make_toy_model


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_model_dir), AutoModelForCausalLM.from_pretrained(toy_model_dir)


def file_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


# ---- the builder ------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_other_weights(tmp_path, builder, toy_model_dir):
    again = builder.build_toy_model(tmp_path / "again", seed=0)
    expected = file_digests(toy_model_dir)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", builder.MARKER} <= set(expected)
    assert file_digests(again) == expected

    other = builder.build_toy_model(tmp_path / "other", seed=1)
    assert file_digests(other)["model.safetensors"] != expected["model.safetensors"]


def test_a_built_model_is_reused_until_forced_changed_or_asked_for_another_seed(tmp_path, builder, capsys):
    out = tmp_path / "model"
    weights = out / "model.safetensors"
    assert builder.main([str(out)]) == 0
    assert "built toy model (seed 0" in capsys.readouterr().out
    built_at = weights.stat().st_mtime_ns

    assert builder.main([str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == built_at and builder.is_built(out, 0)

    assert builder.main([str(out), "--force"]) == 0
    assert "built toy model" in capsys.readouterr().out

    config = out / "tokenizer_config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")  # a file edited after the build is not the built model
    assert not builder.is_built(out, 0)
    builder.main([str(out)])
    assert "built toy model" in capsys.readouterr().out
    assert config.read_bytes() == original

    (out / builder.MARKER).unlink()  # an interrupted build leaves no marker
    assert not builder.is_built(out, 0)

    assert builder.main([str(out), "--seed", "1"]) == 0
    assert "built toy model (seed 1" in capsys.readouterr().out
    assert builder.is_built(out, 1) and not builder.is_built(out, 0)


def test_loads_through_the_auto_classes_with_qwen2_special_tokens_and_tied_embeddings(toy, toy_model_dir):
    tokenizer, model = toy
    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD)
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == PAD
    assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == pad and eos != pad
    assert IM_START in tokenizer.all_special_tokens
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (eos, pad, pad)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (eos, pad)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    num_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert num_params < 10_000_000
    assert json.loads((toy_model_dir / "config.json").read_text())["model_type"] == "qwen2"


def test_reloaded_tokenizer_tokenizes_like_the_trained_one_and_round_trips_toy_text(toy, toy_model_dir):
    # transformers rebuilds a qwen2 tokenizer's pipeline around the saved vocabulary, so the saved
    # tokenizer.json pipeline must be exactly Qwen2's for the two to agree.
    from tokenizers import Tokenizer

    tokenizer, _ = toy
    trained = Tokenizer.from_file(str(toy_model_dir / "tokenizer.json"))
    texts = [chat_prompt(tokenizer, ex["prompt"]) for seed in range(4) for ex in toy_task.make_examples(20, seed)]
    texts += ["<answer>7</answer>", " <think>\n3</think> <answer> 12 </answer>\n", "copy the digit 0 please"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids == trained.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == text
    for tag in toy_task.TAGS:
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1, tag
    for digit in toy_task.DIGITS:
        assert len(tokenizer(digit, add_special_tokens=False).input_ids) == 1, digit


def test_chat_template_is_qwen2_style(toy):
    tokenizer, _ = toy
    messages = [{"role": "system", "content": "copy"}, {"role": "user", "content": "copy the digit 7"},
                {"role": "assistant", "content": "<answer>7</answer>"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\ncopy<|im_end|>\n<|im_start|>user\ncopy the digit 7<|im_end|>\n"
        "<|im_start|>assistant\n<answer>7</answer><|im_end|>\n"
    )
    assert chat_prompt(tokenizer, "copy 3 please") == (
        "<|im_start|>user\ncopy 3 please<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generate_samples_tokens_and_stops_at_im_end(toy):
    tokenizer, model = toy
    tokenizer.padding_side = "left"
    prompts = [chat_prompt(tokenizer, ex["prompt"]) for ex in toy_task.make_examples(4, seed=0)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, top_k=0, temperature=1.0, max_new_tokens=24,
                         num_return_sequences=16)
    completions = out[:, batch.input_ids.shape[1]:]  # (64, <= 24)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    has_eos = (completions == eos).any(dim=1)
    assert has_eos.any() and not has_eos.all()  # the random model sometimes stops
    for row in completions[has_eos]:
        first = int((row == eos).nonzero()[0])
        assert (row[first + 1:] == pad).all(), "generation went on after <|im_end|>"
    assert completions.shape[1] == 24  # rows that never stopped ran to the limit
    assert (completions != pad).any(dim=1).all()  # every row sampled something


# ---- the task and its rewards ------------------------------------------------------------------------


def test_examples_are_deterministic_and_each_answer_is_the_prompts_digit():
    examples = toy_task.make_examples(300, seed=0)
    assert examples == toy_task.make_examples(300, seed=0)
    assert examples != toy_task.make_examples(300, seed=1)
    assert examples[:50] == toy_task.make_examples(50, seed=0)
    for example in examples:
        assert set(example) == {"prompt", "answer"}
        assert example["answer"] in toy_task.DIGITS
        assert [c for c in example["prompt"] if c.isdigit()] == [example["answer"]]
    assert {ex["answer"] for ex in examples} == set(toy_task.DIGITS)
    with pytest.raises(ValueError, match="num"):
        toy_task.make_examples(-1)


def test_make_toy_data_writes_the_same_bytes_and_datasets_loads_the_columns(tmp_path, capsys):
    import datasets

    from examples.toy import make_toy_data as script
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert script.main([str(first), "--num", "50", "--seed", "3"]) == 0
    assert script.main([str(second), "--num", "50", "--seed", "3"]) == 0
    assert "wrote 50 toy examples" in capsys.readouterr().out
    assert first.read_bytes() == second.read_bytes()

    dataset = datasets.load_dataset("json", data_files=str(first), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(dataset.column_names) == ["answer", "prompt"]
    assert dataset.features["prompt"].dtype == "string" and dataset.features["answer"].dtype == "string"
    assert dataset.to_list() == toy_task.make_examples(50, seed=3)


@pytest.mark.parametrize(
    ("completion", "score"),
    [
        ("<answer>7</answer>", 1.0),
        (" <answer> 7 </answer>\n", 1.0),  # whitespace around is fine
        ("<answer>3</answer>", 1.0),  # the wrong digit: correctness is the accuracy reward's job
        ("<answer>7</answer> copy", 0.75),  # text after the closing tag
        ("the <answer>7</answer>", 0.75),  # text before the opening tag
        ("<answer>7", 0.5),  # never closed
        ("digit <answer>7", 0.25),
        ("</answer><answer>7", 0.25),  # a closing tag only before the opening one
        ("7", 0.0),
        ("copy the digit 7 please", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_scores_hand_written_completions(completion, score):
    assert toy_task.answer_format_reward(["copy 7 please"], [completion], answer=["7"]) == [score]


def test_format_reward_reads_conversational_completions_and_rejects_bad_input():
    reward = toy_task.answer_format_reward
    assert reward(["p"], [[{"role": "assistant", "content": "<answer>7</answer>"}]]) == [1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(["p", "q"], ["<answer>7</answer>"])
    with pytest.raises(TypeError, match="completion must be"):
        reward(["p"], [7])


def test_both_toy_rewards_load_by_name_and_score_right_wrong_malformed_and_empty_completions():
    funcs = dict(load_reward_funcs(["accuracy", "examples.toy.toy_task:answer_format_reward"]))
    completions = ["<answer>7</answer>", "<answer>3</answer>", "7 copy <answer>", ""]
    prompts, answers = ["copy 7 please"] * 4, ["7"] * 4
    assert funcs["accuracy"](prompts, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    assert funcs["answer_format_reward"](prompts, completions, answer=answers) == [1.0, 1.0, 0.25, 0.0]


def test_the_random_toy_model_earns_varied_reward_within_the_toy_completion_budget(toy):
    # GRPO learns only from groups whose rewards differ, so the untrained model must earn some.
    tokenizer, model = toy
    config = yaml.safe_load((REPO / "configs" / "toy_cpu.yaml").read_text())
    budget = config["max_completion_length"]
    ideal = tokenizer("<answer>7</answer>" + IM_END, add_special_tokens=False).input_ids
    assert len(ideal) == 4 <= budget

    tokenizer.padding_side = "left"
    examples = toy_task.make_examples(8, seed=0)
    batch = tokenizer([chat_prompt(tokenizer, ex["prompt"]) for ex in examples], return_tensors="pt",
                      padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, top_k=0, max_new_tokens=budget, num_return_sequences=8)
    completions = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    prompts = [ex["prompt"] for ex in examples for _ in range(8)]
    scores = toy_task.answer_format_reward(prompts, completions)
    assert 0.0 < sum(scores) / len(scores) < 0.5
    assert len(set(scores)) >= 2
