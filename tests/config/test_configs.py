"""Every shipped YAML config parses into the dataclasses of its entry point."""

from pathlib import Path

from grpo_split.config.parsing import parse_config
from grpo_split.config.server import ServerConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_ref_server_config_parses():
    (config,) = parse_config([ServerConfig], ["--config", str(CONFIGS / "ref_server.yaml"), "--port", "8000"])
    assert config.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert (config.device, config.dtype, config.port, config.max_batch_tokens) == ("cuda:0", "bfloat16", 8000, 32768)


def test_server_config_rejects_out_of_range_values(monkeypatch):
    import pytest

    monkeypatch.delenv("REF_SERVER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="max_queue=0 is out of range"):
        ServerConfig(model_name_or_path="m", max_queue=0)
    with pytest.raises(ValueError, match="lease_seconds"):
        ServerConfig(model_name_or_path="m", lease_seconds=-1)
    monkeypatch.setenv("REF_SERVER_TOKEN", "from-env")
    assert ServerConfig(model_name_or_path="m").auth_token == "from-env"


def test_trainer_recipes_parse_and_fit_their_rank_counts():
    import json

    import grpo_ref_split as trainer
    from grpo_split.config.trainer import check_run_layout

    toy = trainer.parse_run_config(["--config", str(CONFIGS / "toy_cpu.yaml")])
    assert toy.loss.beta > 0 and toy.model.dtype == "float32" and toy.training.deepspeed == "configs/ds_zero2.json"
    check_run_layout(toy, world_size=2)  # the demo's two CPU ranks
    gsm8k = trainer.parse_run_config(["--config", str(CONFIGS / "gsm8k_qwen2.5.yaml")])
    assert (gsm8k.rollout.num_generations, gsm8k.loss.beta, gsm8k.loss.epsilon, gsm8k.training.learning_rate,
            gsm8k.model.dtype) == (8, 0.04, 0.2, 1e-6, "bfloat16")
    assert "<think>" in gsm8k.data.system_prompt and "<answer>" in gsm8k.data.system_prompt
    check_run_layout(gsm8k, world_size=7)  # GPU 0 serves the reference model, GPUs 1-7 train
    for name in ("ds_zero2.json", "ds_zero3.json", "ds_zero2_offload.json"):
        assert "zero_optimization" in json.loads((CONFIGS / name).read_text())
