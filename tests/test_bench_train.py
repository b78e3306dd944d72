"""scripts/bench_train.py: its pure parts (FLOP accounting on known numbers, the two sides' settings, the
EOS clock of the gsm8k model), and one smoke run of the whole script, ours only, at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
bench = load_script("bench_train")


def test_arch_counts_match_the_built_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    preset = bench.Preset("t", 128, 2, 8, "toy", micro_batch=64, vocab_size=512)
    arch = bench.Arch.of(preset)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=preset.intermediate_size, num_hidden_layers=2,
        num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_kv_heads, tie_word_embeddings=False))
    matmuls = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert arch.layer_matmul_params == matmuls
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    assert arch.head_params == model.lm_head.weight.numel()
    # The gsm8k/medium shape: 8 x (q 512x512 + k, v 512x128 + o 512x512 + MLP 3 x 512x2816).
    assert bench.Arch.of(bench.PRESETS["gsm8k"]).layer_matmul_params == 8 * (2 * 512 * 512 + 2 * 512 * 128
                                                                             + 3 * 512 * 2816)


def test_flops_on_known_numbers():
    arch = bench.Arch(hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, intermediate_size=128,
                      vocab_size=100)
    # per layer: q, k, v, o 64x64 each + 3 x 64x128 = 16384 + 24576 = 40960; two layers 81920
    assert arch.layer_matmul_params == 81920
    # 2 rows, prompts of 3 tokens, completions of 4: prefill 2 x 3 tokens, then 3 one-token steps per row;
    # logits at 4 positions per row; attention pairs per row 3*4/2 + (3 x 3 + 4 x 3 / 2) = 6 + 15.
    gen = bench.generate_work(2, 3, 4)
    assert (gen.body_tokens, gen.head_positions, gen.attention_pairs, gen.passes) == (12, 8, 42, 1)
    assert gen.flops(arch) == 2 * 81920 * 12 + 2 * 6400 * 8 + 4 * 2 * 64 * 42
    # Prompt sharing: the first 2 prompt tokens once for the one distinct prompt, then each row's last one.
    shared = bench.generate_work(2, 3, 4, prefill_rows=1)
    assert (shared.body_tokens, shared.attention_pairs) == (1 * 2 + 2 + 2 * 3, 1 * 3 + 2 * 3 + 2 * 15)
    # A forward + backward of 2 sequences of 7 tokens, logits on 4 positions each: 3 x the forward.
    update = bench.sequence_work(2, 7, 8, 3)
    assert update.flops(arch) == 3 * (2 * 81920 * 14 + 2 * 6400 * 8 + 4 * 2 * 64 * 2 * 28)
    # Without padding, what generate computes is exactly the useful work.
    useful = bench.useful_work([3, 3], [4, 4])
    assert useful["generate"] == gen
    assert useful["update"] == bench.sequence_work(2, 7, 8, 3)
    flops = bench.phase_flops(arch, useful)
    assert flops["step"] == pytest.approx(sum(flops[p] for p in ("generate", "reference", "update")))


def test_step_work_of_each_side():
    preset = bench.PRESETS["gsm8k"]
    prompts = [170, 180, 190, 200, 170, 180, 190, 200]
    # TRL: its lengths per row; its head scores every position on a CPU (and completion tokens only on GPUs).
    completions = [100 + i for i in range(64)]
    step = {"prompt_lengths": [p for p in prompts for _ in range(8)], "completion_lengths": completions}
    computed, useful = bench.trl_step_work(step, head_all_positions=True)
    assert computed["reference"].head_positions == 64 * (200 + 163 - 1)
    assert bench.trl_step_work(step, head_all_positions=False)[0]["reference"].head_positions == sum(completions)
    assert useful["reference"].body_tokens == 8 * sum(prompts) + sum(completions)
    # Ours: micro-batches of one group (gsm8k) are trimmed to the group's prompt and longest completion; the
    # positions computed come back from padding_fraction, and the completion columns are the rest.
    longest = [150, 160, 170, 180, 190, 200, 210, 220]  # per group
    real = 8 * sum(prompts) + 64 * 120.0
    computed_positions = sum(8 * (p + c) for p, c in zip(prompts, longest, strict=True))
    ours_step = {"completions/max_length": 220, "completions/mean_length": 120.0,
                 "padding_fraction": 1 - real / computed_positions}
    work, _ = bench.ours_step_work(preset, ours_step, prompts, prompt_sharing=False)
    assert work["update"].body_tokens == pytest.approx(computed_positions)
    assert work["update"].head_positions == pytest.approx(8 * sum(longest))
    assert work["reference"].head_positions == 64 * 220
    assert work["generate"] == bench.generate_work(64, 200, 220)
    # Prompt sharing: each micro-batch (one group) forwards its prompt's first P - 1 tokens once; generation
    # prefills each of the 8 prompts once; the server forwards each group's prompt once per chunk of rows.
    shared, _ = bench.ours_step_work(preset, ours_step, prompts, prompt_sharing=True)
    assert shared["generate"] == bench.generate_work(64, 200, 220, prefill_rows=8)
    assert shared["update"].body_tokens == pytest.approx(sum(prompts) - 8 + 8 * sum(longest))
    assert shared["update"].head_positions == pytest.approx(8 * sum(longest))
    assert bench.reference_distinct_prompts(64, 420) == 9  # chunks of 39 rows: groups 0-4, then 4-7
    assert bench.reference_distinct_prompts(64, 100) == 8
    assert shared["reference"] == bench.shared_prompt_work(64, 9, 200, 220, 1)


@pytest.mark.parametrize("name", sorted(bench.PRESETS))
def test_our_yaml_and_trl_settings_agree(name, tmp_path):
    """Every mapped setting is the same on both sides, and our YAML parses to those values."""
    from grpo_split.config.trainer import parse_run_config

    preset = bench.PRESETS[name]
    ours = bench.ours_config(preset, model_dir=tmp_path / "model", data_path=tmp_path / "d.jsonl",
                             output_dir=tmp_path / "out", steps=4, ref_server_url="http://127.0.0.1:1")
    trl = bench.trl_config_kwargs(preset, output_dir=tmp_path / "trl", steps=4)
    assert bench.check_same_work(ours, trl) == []
    path = tmp_path / "ours.yaml"
    path.write_text(yaml.safe_dump(ours))
    parsed = parse_run_config(["--config", str(path)])
    fields = {f: getattr(section, f) for section in parsed.all() for f in vars(section)}
    for ours_key, _ in bench.SAME_SETTINGS:
        assert fields[ours_key] == ours[ours_key], ours_key
    assert fields["prompts_per_step"] * fields["num_generations"] == 64
    assert fields["reward_funcs"] == list(bench.REWARD_FUNCS)
    assert fields["dtype"] == "float32" and fields["deepspeed"] is None
    assert fields["system_prompt"] == bench.system_prompt(preset)
    # A difference is reported, naming the setting.
    assert any("loss_type" in p for p in bench.check_same_work({**ours, "loss_type": "dapo"}, trl))
    halved = {**trl, "per_device_train_batch_size": trl["per_device_train_batch_size"] // 2}
    assert any("completions per update" in p for p in bench.check_same_work(ours, halved))


@pytest.mark.parametrize("name", sorted(bench.PRESETS))
def test_trl_config_gives_one_generation_of_64_and_one_update_per_step(name, tmp_path):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    preset = bench.PRESETS[name]
    config = GRPOConfig(**bench.trl_config_kwargs(preset, output_dir=tmp_path / "trl", steps=4))
    ga = config.gradient_accumulation_steps
    assert config.generation_batch_size == 64  # completions per generation
    assert config.generation_batch_size // config.num_generations == bench.PROMPTS_PER_STEP
    assert config.per_device_train_batch_size * ga * config.world_size == 64  # completions per update
    # TRL generates every steps_per_generation x num_iterations micro-steps, and an optimizer step is `ga` of them.
    assert config.steps_per_generation * config.num_iterations == ga
    assert not config.gradient_checkpointing and not config.bf16 and config.use_cpu
    ours = bench.ours_config(preset, model_dir=tmp_path, data_path=tmp_path / "d.jsonl", output_dir=tmp_path,
                             steps=4, ref_server_url="http://127.0.0.1:1")
    assert bench.check_same_work(ours, config) == []


def test_both_sides_tokenize_the_same_prompts_and_score_the_same(tmp_path):
    from grpo_split.rollouts.rewards import BUILTIN_REWARDS
    from grpo_split.rollouts.sampling import encode_prompts

    preset = bench.Preset("g", 64, 1, 8, "gsm8k", micro_batch=8, vocab_size=2048)
    tokenizer = bench.build_tokenizer(preset.vocab_size)
    assert len(tokenizer) == 2048
    rows, trl_rows = bench.make_rows(preset), bench.trl_rows(preset)
    ours = encode_prompts(tokenizer, [r["prompt"] for r in rows], bench.system_prompt(preset))
    theirs = tokenizer.apply_chat_template(conversation=[r["prompt"] for r in trl_rows], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    assert ours == theirs
    assert 90 <= len(bench.GSM8K_SYSTEM_PROMPT.split()) <= 110
    completions = ["<think>so</think><answer>" + rows[0]["answer"] + "</answer>", "no idea"]
    for func in bench.trl_reward_funcs():
        expected = BUILTIN_REWARDS[func.__name__]([rows[0]["prompt"]] * 2, completions, answer=[rows[0]["answer"]] * 2)
        got = func(prompts=[trl_rows[0]["prompt"]] * 2, completions=[[{"role": "assistant", "content": c}]
                                                                     for c in completions],
                   completion_ids=[[1], [2]], answer=[rows[0]["answer"]] * 2, trainer_state=None)
        assert got == expected
    assert [f.__name__ for f in bench.trl_reward_funcs()] == list(bench.REWARD_FUNCS)


def test_length_clock_raises_the_eos_logit_with_position():
    """The gsm8k model's EOS logit, less the log-sum-exp of the other tokens, follows kappa x (1 - n0 / n)
    at n tokens so far (three <|im_start|> markers), whatever the tokens are, and an optimizer step cannot
    move it far (Adam moves every weight by about the learning rate, whatever its gradient)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                                         max_position_embeddings=1024)).eval()
    marker, eos = 1, 2
    bench.add_length_clock(model, marker_id=marker, eos_id=eos, kappa=7.0, n0=540.0)
    ids = torch.randint(3, 512, (2, 600), generator=torch.Generator().manual_seed(1))
    ids[:, [0, 50, 120]] = marker

    def margins():  # (2, 450) after the third marker
        logits = model(input_ids=ids).logits  # (2, 600, V)
        others = torch.cat([logits[..., :eos], logits[..., eos + 1:]], dim=-1).logsumexp(-1)
        return (logits[..., eos] - others)[:, 150:]

    margin = margins()
    n = torch.arange(151, 601, dtype=torch.float32)
    target = 7.0 * (1 - 540.0 / n)
    assert (margin.detach() - target).abs().max() < 0.5
    assert margin[:, -1].min() > margin[:, 0].max() + 10  # from about -18 at n = 151 to about +1 at n = 600
    # The worst case of one Adam step at learning rate 1e-6: every weight moved by 1e-6 the way that raises
    # the margin most.
    margin.sum().backward()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-6 * param.grad.sign())
        moved = margins()
    assert (moved - margin.detach()).abs().max() < 0.5


def test_detect_prompt_sharing():
    assert bench.detect_prompt_sharing("LM head: fused\n", planned=True)
    assert not bench.detect_prompt_sharing("LM head: fused\n", planned=False)
    assert not bench.detect_prompt_sharing("Prompt sharing: every row forwards its own prompt: no cache\n", True)
    assert not bench.detect_prompt_sharing("Prompt sharing: off for training forwards, every row forwards its own "
                                           "prompt: gradient checkpointing\n", True)


@pytest.mark.e2e
def test_smoke_run_ours_only(tmp_path):
    """The whole script at a tiny size without TRL: it builds the model, runs our trainer with a reference
    server, and prints and writes the phase and FLOP tables."""
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--preset", "tiny", "--steps", "2", "--skip-trl",
         "--json", str(out), "--work-dir", str(tmp_path / "work"), "--peak-seconds", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "seconds per step by phase" in result.stdout and "model FLOPs per step" in result.stdout
    payload = json.loads(out.read_text())
    ours = payload["analysis"]["ours"]
    assert "trl" not in payload["analysis"]
    assert len(payload["ours"]["steps"]) == 2 and payload["trl"] is None
    assert ours["phase_seconds"]["step"] > 0
    assert ours["flops"]["step"] > 0 and ours["flops_per_second"]["step"] > 0
    assert payload["ours"]["steps"][1]["cpu_seconds"] > 0  # the trainer's and server's CPU during step 2
    assert all(p > 0 for p in payload["peak_flops_per_second"])
    again = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train.py"), "--report-from", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "model FLOPs per step" in again.stdout, again.stderr[-3000:]
