"""Shared fixtures: a tiny random Qwen2 model saved in Hugging Face format, and a real
reference-server process on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 96


def build_tiny_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 causal LM with random weights (about 60k parameters), saved with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=0.2,  # peaked enough that log-probs differ clearly between tokens and positions
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from grpo_split.modeling import load_frozen_model

    return load_frozen_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)


class ServerProcess:
    """`python ref_server.py ...` on port 0; the URL is read from its ready line."""

    def __init__(self, model_dir: Path, *extra: str, env: dict | None = None, ready_timeout: float = 120.0):
        cmd = [sys.executable, str(REPO / "ref_server.py"), "--model_name_or_path", str(model_dir), "--port", "0",
               "--device", "cpu", "--dtype", "float32", *extra]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.url = self._wait_ready(ready_timeout)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _wait_ready(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                match = re.search(r"ready at (http://\S+)", line)
                if match:
                    found.append(match.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("ref_server did not become ready:\n" + "".join(self.stderr_lines[-40:]))
        return found[0]

    def stop(self) -> int:
        """SIGTERM, as an operator would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def ref_server(tiny_model_dir) -> Iterator[ServerProcess]:
    server = ServerProcess(tiny_model_dir, "--max_queue", "16", "--max_batch_tokens", "2048",
                           "--retry_after_seconds", "1")
    yield server
    assert server.stop() == 0, "".join(server.stderr_lines[-40:])


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is a folder of entry points, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """The toy model and tokenizer of the demo (examples/toy/make_toy_model.py, seed 0), built once per session."""
    from examples.toy.make_toy_model import build_toy_model

    return Path(build_toy_model(tmp_path_factory.mktemp("toy_model"), seed=0))


@pytest.fixture(scope="session")
def toy_dataset_path(tmp_path_factory) -> Path:
    """64 toy examples as JSONL (examples/toy/make_toy_data.py's format)."""
    from examples.toy.toy_task import make_examples, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("toy_data") / "toy.jsonl", make_examples(64, seed=0))


def length_reward(prompts, completions, **columns):
    """A test reward that always varies within a group: the completion's length in characters / 10."""
    return [len(c) / 10 for c in completions]


def toy_config(tmp_path: Path, model_dir: Path, dataset: Path, **overrides) -> list[str]:
    """A YAML config for a tiny run written to tmp_path; returns the argv that loads it."""
    values = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(dataset),
        "num_generations": 4,
        "prompts_per_step": 2,
        "max_completion_length": 8,
        "max_prompt_length": 64,
        "reward_funcs": ["conftest:length_reward", "examples.toy.toy_task:answer_format_reward"],
        "learning_rate": 1e-3,
        "max_steps": 2,
        "save_steps": 2,
        "beta": 0.0,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "ref_server_wait": 30.0,
    }
    values.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--config", str(path)]
