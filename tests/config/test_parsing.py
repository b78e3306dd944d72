"""parse_config: YAML file + command-line overrides into typed dataclasses."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from grpo_split.config.parsing import ConfigError, config_to_yaml, parse_config


@dataclass
class ModelArgs:
    model_name_or_path: str = field(metadata={"help": "model directory or hub name"})
    dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={"help": "weights dtype"})


@dataclass
class TrainArgs:
    learning_rate: float = field(default=1e-5, metadata={"help": "optimizer learning rate"})
    num_generations: int = field(default=8, metadata={"help": "completions per prompt"})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"], metadata={"help": "reward functions"})
    bf16: bool = field(default=False, metadata={"help": "train in bfloat16"})

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares completions), got {self.num_generations}")


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_command_line_over_yaml_over_defaults(tmp_path):
    # "1e-6" is a string to YAML 1.1; it must still arrive as a float.
    path = write(tmp_path, "model_name_or_path: /models/qwen\nlearning_rate: 1e-6\nnum_generations: 4\n"
                           "reward_funcs: [accuracy, format]\nbf16: true\n")
    model, train = parse_config([ModelArgs, TrainArgs], ["--config", path, "--num_generations", "6"])
    assert model.model_name_or_path == "/models/qwen" and model.dtype == "auto"
    assert train.learning_rate == 1e-6 and isinstance(train.learning_rate, float)
    assert train.num_generations == 6  # the command line wins
    assert train.reward_funcs == ["accuracy", "format"] and train.bf16 is True


def test_command_line_only(tmp_path):
    model, train = parse_config([ModelArgs, TrainArgs], ["--model_name_or_path", "m", "--dtype", "bfloat16"])
    assert (model.model_name_or_path, model.dtype, train.num_generations) == ("m", "bfloat16", 8)


def test_unknown_yaml_key_is_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nnum_generation: 4\n")
    with pytest.raises(ConfigError, match="unknown field\\(s\\) num_generation"):
        parse_config([ModelArgs, TrainArgs], ["--config", path])


def test_yaml_value_outside_choices_is_named(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\ndtype: float64\n")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        parse_config([ModelArgs, TrainArgs], ["--config", path])


def test_invalid_value_fails_in_post_init_with_the_field_name(tmp_path):
    path = write(tmp_path, "model_name_or_path: m\nnum_generations: 1\n")
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        parse_config([ModelArgs, TrainArgs], ["--config", path])


def test_missing_required_field_and_bad_files(tmp_path):
    with pytest.raises(SystemExit):
        parse_config([ModelArgs, TrainArgs], [])
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config([ModelArgs, TrainArgs], ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config([ModelArgs, TrainArgs], ["--config", write(tmp_path, "- a\n- b\n")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config([ModelArgs, TrainArgs], ["--config", write(tmp_path, "a: [1,\n")])


def test_config_to_yaml_round_trips(tmp_path):
    model, train = parse_config([ModelArgs, TrainArgs], ["--model_name_or_path", "m"])
    path = write(tmp_path, config_to_yaml(model, train))
    again = parse_config([ModelArgs, TrainArgs], ["--config", path])
    assert again == (model, train)
