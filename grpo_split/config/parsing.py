"""Configuration: typed dataclasses filled from a YAML file plus command-line overrides.

Both entry points describe their settings as dataclasses with a help string per field and call
`parse_config`, so `python ref_server.py --config server.yaml --port 8000` and
`deepspeed grpo_ref_split.py --config configs/toy_cpu.yaml --beta 0.0` behave alike:
command line > YAML file > dataclass default. An unknown key in the YAML file is an error that
names it, never silently ignored (a typo such as `num_generation: 8` would otherwise train with
the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping of field names to values."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise ConfigError(f"config file {path} must be a mapping of field names to values, got {type(values).__name__}")
    return values


def parse_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None) -> tuple:
    """Parse `[--config FILE.yaml] [--field value ...]` into one instance of each dataclass type.

    Field names must be unique across the dataclasses. Values from the YAML file replace the
    dataclass defaults; command-line flags replace both. Raises ConfigError for an unknown YAML
    key or a YAML value outside a field's choices; argparse exits with its usual message for a
    bad command-line flag. Each dataclass's own `__post_init__` checks run on construction.
    """
    # Imported here so that merely importing this package stays light (transformers is large).
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if args is None else args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)

    parser = HfArgumentParser(dataclass_types)
    parser.add_argument(
        "--config", type=Path, help="YAML file with any of these fields; command-line flags override its values"
    )
    if known.config is not None:
        values = load_yaml_mapping(known.config)
        _apply_yaml_defaults(parser, values, known.config)

    parsed = parser.parse_args_into_dataclasses(args=argv)
    return tuple(obj for obj in parsed if dataclasses.is_dataclass(obj))


def _apply_yaml_defaults(parser: argparse.ArgumentParser, values: dict[str, Any], path: Path) -> None:
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(actions))}"
        )
    for name, value in values.items():
        action = actions[name]
        # argparse checks choices only on the command line, never on defaults: check YAML values here.
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"config file {path}: {name} must be one of {list(action.choices)}, got {value!r}")
        # A field the YAML file provides is no longer required on the command line.
        action.required = False
    parser.set_defaults(**values)


def config_to_yaml(*configs: Any) -> str:
    """The resolved configuration as YAML, for the start-up log and for saving next to outputs."""
    merged: dict[str, Any] = {}
    for config in configs:
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            merged[field.name] = str(value) if isinstance(value, Path) else value
    return yaml.safe_dump(merged, sort_keys=False)
