"""Every shipped YAML config parses into the dataclasses of its entry point."""

from pathlib import Path

from grpo_common.config import parse_config
from ref_server import ServerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
