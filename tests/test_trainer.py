"""The trainer, `grpo_ref_split.py`: configuration, data order, and real training steps on the toy model.

Training runs in-process as a world of one (DeepSpeed on the CPU with gloo); the generation-worker
test runs the real entry points as subprocesses. The multi-rank `deepspeed` launcher runs are in
tests/test_e2e.py.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml
from conftest import toy_config
from safetensors.torch import load_file

import grpo_ref_split as trainer
from grpo_split.config.parsing import ConfigError
from grpo_split.config.trainer import check_run_layout
from grpo_split.rollouts.data import load_prompt_dataset
from grpo_split.training.checkpoint import list_checkpoints
from grpo_split.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def toy_ref_server(toy_model_dir):
    from conftest import ServerProcess

    server = ServerProcess(toy_model_dir)
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines[-40:])


def broken_reward(prompts, completions, **columns):
    return [1 / 0 for _ in completions]


@pytest.fixture(autouse=True)
def fresh_process_group_env():
    """Each in-process run starts its own world of one on a fresh port, as a new process would."""
    saved = {key: os.environ.pop(key) for key in DIST_ENV if key in os.environ}
    yield
    for key in DIST_ENV:
        os.environ.pop(key, None)
    os.environ.update(saved)


def run_steps(argv: list[str], monkeypatch=None, record: list | None = None) -> int:
    """trainer.main(argv); with `record`, each step's (batch, weights before it, returned metrics) is appended."""
    if record is not None:
        original = trainer.train_on_batch

        def recording(engine, batch, config, world_size, reference=None):
            before = {k: v.detach().clone() for k, v in engine.module.policy.state_dict().items()}
            if reference is not None and batch.ref_logps is None:
                batch.ref_logps = reference.result()  # the record holds what the update trained with
            batch_copy = copy.deepcopy(batch)
            result = original(engine, batch, config, world_size, reference)
            record.append((batch_copy, before, result))
            return result

        monkeypatch.setattr(trainer, "train_on_batch", recording)
    return trainer.main(argv)


def final_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / f"checkpoint-{step}" / "model.safetensors"))


# ----------------------------------------------------------------------------------- configuration


def test_yaml_then_command_line_overrides(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, beta=0.04, loss_type="dapo")
    config = trainer.parse_run_config([*argv, "--beta", "0.1", "--ref_server_url", "http://a:1", "http://b:2"])
    assert config.loss.beta == 0.1 and config.loss.loss_type == "dapo"
    assert config.rollout.num_generations == 4
    assert config.server.ref_server_url == ["http://a:1", "http://b:2"]
    assert config.rollout.reward_funcs == ["conftest:length_reward", "examples.toy.toy_task:answer_format_reward"]


def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path)
    assert trainer.parse_run_config(["--local_rank=1", *argv]).rollout.num_generations == 4
    assert trainer.parse_run_config(["--local_rank", "0", *argv]).rollout.num_generations == 4


@pytest.mark.parametrize(
    "override, field",
    [
        ({"num_generations": 1}, "num_generations"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"reward_funcs": ["accuracy", "no_such_reward"]}, "reward_funcs"),
        ({"reward_funcs": ["no_such_module_xyz:f"]}, "reward_funcs"),
        ({"reward_weights": [1.0]}, "reward_weights"),
        ({"importance_sampling_level": "word"}, "importance_sampling_level"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"beta": -0.1}, "beta"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"max_steps": 0}, "max_steps"),
        ({"rollout_source": "server", "max_staleness": 0, "policy_sync_steps": 2}, "max_staleness"),
        ({"mode": "generate", "rollout_source": "server"}, "mode=generate"),
        ({"lr_scheduler_type": "exponential"}, "lr_scheduler_type"),
        ({"num_generatoins": 4}, "num_generatoins"),
    ],
)
def test_invalid_values_fail_at_start_up_naming_the_field(tmp_path, toy_model_dir, toy_dataset_path, override,
                                                          field, capsys):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, **override)
    with pytest.raises(ConfigError, match=field):
        trainer.parse_run_config(argv)
    assert trainer.main(argv) == 2
    assert field in capsys.readouterr().err


def test_layout_checks_need_the_world_size(tmp_path, toy_model_dir, toy_dataset_path):
    config = trainer.parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path, prompts_per_step=3))
    check_run_layout(config, world_size=1)
    with pytest.raises(ConfigError, match="prompts_per_step=3 must be a multiple of the number of ranks"):
        check_run_layout(config, world_size=2)
    config = trainer.parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path,
                                                 gradient_accumulation_steps=3))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 must divide"):
        check_run_layout(config, world_size=1)
    config = trainer.parse_run_config(toy_config(tmp_path, toy_model_dir, toy_dataset_path, dataset_name=None))
    with pytest.raises(ConfigError, match="dataset_name is required"):
        check_run_layout(config, world_size=1)


def test_missing_dataset_column_or_file_is_named(toy_dataset_path, tmp_path):
    with pytest.raises(ConfigError, match="prompt_column='question' is not a column"):
        load_prompt_dataset(str(toy_dataset_path), "train", "question", "answer")
    with pytest.raises(ConfigError, match="answer_column='solution' is not a column"):
        load_prompt_dataset(str(toy_dataset_path), "train", "prompt", "solution")
    with pytest.raises(ConfigError, match="no such file"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"), "train", "prompt", "answer")


# ----------------------------------------------------------------------------------- training steps


METRIC_KEYS = {
    "step", "loss", "reward", "reward_std", "rewards/length_reward/mean", "rewards/length_reward/std",
    "rewards/answer_format_reward/mean", "rewards/answer_format_reward/std", "frac_reward_zero_std",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
    "completions/clipped_ratio", "grad_norm", "learning_rate", "step_time", "tokens_per_second",
    "skipped_prompts", "nonfinite_steps", "padding_fraction",
    "timing/generate", "timing/rewards", "timing/reference", "timing/update", "timing/other",
    "tokens_per_second/generate", "tokens_per_second/update",
}


def test_two_steps_without_reference_model(tmp_path, toy_model_dir, toy_dataset_path, monkeypatch):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, beta=0.0,
                      ref_server_url=["http://127.0.0.1:9"])  # nothing listens: it must not be contacted
    record: list = []
    assert run_steps(argv, monkeypatch, record) == 0
    out = tmp_path / "out"
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for line in metrics:
        assert METRIC_KEYS <= set(line), METRIC_KEYS - set(line)
        assert "kl" not in line  # beta = 0: no reference log-probs anywhere
        for key in METRIC_KEYS:
            assert math.isfinite(line[key]), (key, line[key])
        # The phases cover the step: each took time (no reference here: 0), and together with
        # `other` they add up to the step's wall time.
        phases = [line[f"timing/{name}"] for name in ("generate", "rewards", "update")]
        assert all(seconds > 0 for seconds in phases) and line["timing/reference"] == 0.0
        assert sum(phases) + line["timing/other"] == pytest.approx(line["step_time"], rel=1e-6, abs=1e-6)
        assert 0.0 <= line["padding_fraction"] < 1.0
    assert metrics[0]["nonfinite_steps"] == 0 and metrics[0]["learning_rate"] == pytest.approx(1e-3)

    initial = load_file(str(toy_model_dir / "model.safetensors"))
    trained = final_weights(out, 2)
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert len(changed) == len(initial), "every parameter should move after two steps with nonzero advantages"
    assert all(batch.ref_logps is None for batch, _, _ in record)
    assert (out / "config.yaml").is_file() and yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")
    tokenizer = AutoTokenizer.from_pretrained(out / "checkpoint-2")
    ids = tokenizer("copy the digit 3", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def naive_completion_logps(model, batch) -> torch.Tensor:
    """Float64 log-probs of the completion tokens from the full logits: the textbook formula."""
    with torch.no_grad():
        model = copy.deepcopy(model).double()
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=positions).logits / batch.temperature
        P = batch.prompt_length
        logps = torch.log_softmax(logits[:, P - 1 : -1], dim=-1)
        return logps.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)


def test_two_steps_with_a_reference_server_and_the_loss_by_hand(tmp_path, toy_model_dir, toy_dataset_path,
                                                                 toy_ref_server, monkeypatch):
    beta = 0.2
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, beta=beta, ref_server_url=[toy_ref_server.url])
    record: list = []
    assert run_steps(argv, monkeypatch, record) == 0
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["kl"]) and m["kl"] >= 0 for m in metrics)
    assert metrics[1]["kl"] > 0  # after one update the policy differs from the reference
    # The reference tokens were counted, and only the wait the update did not hide is its time.
    assert all(m["tokens_per_second/reference"] > 0 and 0 <= m["timing/reference"] < m["step_time"] for m in metrics)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)
    for (batch, weights_before, result), logged in zip(record, metrics, strict=True):
        ref = naive_completion_logps(reference, batch)
        torch.testing.assert_close(batch.ref_logps.double(), ref, atol=1e-4, rtol=0)  # the server's answer
        policy.load_state_dict(weights_before)
        logps = naive_completion_logps(policy, batch)
        mask = batch.completion_mask.double()
        advantages = batch.advantages.double()[:, None]
        # GRPO with one pass per batch: ratio exp(logp - logp_old) = 1, so per token -A + beta * k3.
        k3 = torch.exp(ref - logps) - (ref - logps) - 1
        per_token = -advantages + beta * k3
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
        assert abs(result["loss"] - loss.item()) < 1e-5, (result["loss"], loss.item())
        assert abs(logged["loss"] - loss.item()) < 1e-5
        kl = (k3 * mask).sum() / mask.sum()
        assert abs(logged["kl"] - kl.item()) < 1e-5


def test_resume_continues_at_the_next_step_exactly_as_an_uninterrupted_run(tmp_path, toy_model_dir,
                                                                           toy_dataset_path, monkeypatch):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert trainer.main(toy_config(straight, toy_model_dir, toy_dataset_path, max_steps=3, save_steps=1)) == 0

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    assert trainer.main(toy_config(resumed, toy_model_dir, toy_dataset_path, max_steps=2, save_steps=2)) == 0
    record: list = []
    argv = toy_config(resumed, toy_model_dir, toy_dataset_path, max_steps=3, save_steps=1,
                      resume_from_checkpoint="latest")
    assert run_steps(argv, monkeypatch, record) == 0
    assert len(record) == 1, "the resumed run trains step 3 only"
    # The weights at the start of step 3 are the step-2 checkpoint's...
    step2 = final_weights(straight / "out", 2)
    for name, value in step2.items():
        torch.testing.assert_close(record[0][1][name], value, atol=0, rtol=0)
    # ... and step 3 lands on the same weights: same prompts, same samples (RNG), same Adam moments.
    a, b = final_weights(straight / "out", 3), final_weights(resumed / "out", 3)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    lines_a, lines_b = read_metrics(straight / "out" / "metrics.jsonl"), read_metrics(resumed / "out" / "metrics.jsonl")
    assert [m["step"] for m in lines_b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "completions/mean_length"):
        assert lines_a[2][key] == pytest.approx(lines_b[2][key], abs=1e-6), key


def test_resume_latest_without_checkpoint_starts_fresh_and_bad_path_is_an_error(tmp_path, toy_model_dir,
                                                                                 toy_dataset_path, capsys):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, max_steps=1, resume_from_checkpoint="latest")
    assert trainer.main(argv) == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [1]
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, resume_from_checkpoint=str(tmp_path / "nowhere"))
    assert trainer.main(argv) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_a_non_finite_loss_skips_the_update_and_training_goes_on(tmp_path, toy_model_dir, toy_dataset_path,
                                                                  monkeypatch, capsys):
    from grpo_split.training import update

    real_loss = update.micro_batch_loss
    calls = {"n": 0}

    def nan_on_first_step(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 1 else loss), metrics

    monkeypatch.setattr(update, "micro_batch_loss", nan_on_first_step)
    record: list = []
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, max_steps=3, save_steps=1, warmup_steps=3)
    assert run_steps(argv, monkeypatch, record) == 0
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["nonfinite_steps"] for m in metrics] == [1, 1, 1]
    # Warmup: update n (from 0) has the rate lr x (n + 1) / 4. The skipped first update used up its
    # slot; the ones after it get their own scheduled rates, not the one before the skip.
    assert [m["learning_rate"] for m in metrics] == pytest.approx([1e-3 / 4, 2e-3 / 4, 3e-3 / 4])
    assert "non-finite loss" in capsys.readouterr().err
    initial = load_file(str(toy_model_dir / "model.safetensors"))
    after_first = final_weights(tmp_path / "out", 1)
    for name in initial:  # the skipped update moved nothing
        torch.testing.assert_close(after_first[name], initial[name], atol=0, rtol=0)
    after_second = final_weights(tmp_path / "out", 2)
    assert any(not torch.equal(after_second[n], initial[n]) for n in initial)
    assert all(torch.isfinite(t).all() for t in after_second.values())


def test_reference_server_not_answering_is_a_connection_error(tmp_path, toy_model_dir, toy_dataset_path, capsys):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, beta=0.04,
                      ref_server_url=["http://127.0.0.1:9"], ref_server_wait=1.0)
    assert trainer.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: ConnectionError: no reference server ready at http://127.0.0.1:9" in err
    assert "python ref_server.py --model_name_or_path MODEL --port 9" in err


def test_a_raising_reward_function_stops_the_run_naming_it_and_the_prompt(tmp_path, toy_model_dir,
                                                                          toy_dataset_path, capsys):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, reward_funcs=["test_trainer:broken_reward"])
    assert trainer.main(argv) == 1
    err = capsys.readouterr().err
    assert "reward function 'broken_reward' raised ZeroDivisionError" in err and "prompt: '" in err
    assert "return [1 / 0 for _ in completions]" in err  # the traceback inside the user's function


# ----------------------------------------------------------------------------------- subprocesses


def trainer_command(argv: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "grpo_ref_split.py"), *argv]


def subprocess_env() -> dict[str, str]:
    # test_trainer:length_reward must be importable by the child too.
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.e2e
def test_generation_worker_feeds_a_trainer_through_the_server_queue(tmp_path, toy_model_dir, toy_dataset_path,
                                                                     toy_ref_server):
    common = dict(beta=0.04, ref_server_url=[toy_ref_server.url], max_steps=2, save_steps=2, max_staleness=1,
                  rollout_wait=120.0)
    (tmp_path / "worker").mkdir()
    worker_argv = toy_config(tmp_path / "worker", toy_model_dir, toy_dataset_path, **common, mode="generate",
                             output_dir=str(tmp_path / "out"))
    trainer_argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, **common, rollout_source="server")
    worker = subprocess.Popen(trainer_command(worker_argv), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        done = subprocess.run(trainer_command(trainer_argv), cwd=REPO, env=subprocess_env(), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        worker_out, _ = worker.communicate(timeout=120)  # it exits once training is done
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, worker_out[-3000:]
    assert "uploaded batch 1 (policy version 0" in worker_out
    assert "training finished; generation worker exiting" in worker_out
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["kl"]) and math.isfinite(m["loss"]) for m in metrics)
    # Per-function rewards travel with the worker's batch, so a worker-fed run logs them like a local one.
    for line in metrics:
        for name in ("length_reward", "answer_format_reward"):
            assert math.isfinite(line[f"rewards/{name}/mean"]), (name, line)
    assert (tmp_path / "out" / "policy-2" / "model.safetensors").is_file()  # what workers reload
    stats = requests.get(f"{toy_ref_server.url}/stats", timeout=30).json()
    assert stats["acknowledged"] >= 2, stats  # the trainer acknowledged what it trained on


@pytest.mark.e2e
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, max_steps=1000, save_steps=1000)
    proc = subprocess.Popen(trainer_command(argv), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "out" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (metrics_file.is_file() and metrics_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "trainer did not log a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    steps = [step for step, _ in list_checkpoints(tmp_path / "out")]
    assert len(steps) == 1 and steps[0] < 1000, steps
    assert f"stopped at step {steps[0]} on request" in output
    assert read_metrics(metrics_file)[-1]["step"] == steps[0]
