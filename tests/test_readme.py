"""The README documents every configuration field of both entry points (it drifts otherwise)."""

import dataclasses
from pathlib import Path

from grpo_split.config.server import ServerConfig
from grpo_split.config.trainer import CONFIG_TYPES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_trainer_field_is_in_the_readme_table():
    missing = [f.name for cls in CONFIG_TYPES for f in dataclasses.fields(cls) if f"| `{f.name}` |" not in README]
    assert not missing, f"add these trainer fields to the README's configuration table: {missing}"


def test_every_server_flag_is_in_the_readme_table():
    missing = [f.name for f in dataclasses.fields(ServerConfig) if f"| `--{f.name}` |" not in README]
    assert not missing, f"add these server flags to the README's flag table: {missing}"
