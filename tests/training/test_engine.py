"""The DeepSpeed engine's configuration and the learning-rate schedule (grpo_split.training.engine)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, toy_config

from grpo_split.config.parsing import ConfigError
from grpo_split.config.trainer import parse_run_config
from grpo_split.training.engine import deepspeed_config, lr_lambda


def test_deepspeed_config_takes_batch_layout_and_precision_from_ours(tmp_path, toy_model_dir, toy_dataset_path):
    argv = toy_config(tmp_path, toy_model_dir, toy_dataset_path, gradient_accumulation_steps=2,
                      deepspeed=str(REPO / "configs" / "ds_zero2_offload.json"), max_grad_norm=0.5,
                      weight_decay=0.01)
    config = parse_run_config(argv)
    ds = deepspeed_config(config, world_size=2, rows_per_rank=8, dtype=torch.bfloat16)
    layout = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert layout == (4, 2, 16)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    zero3 = deepspeed_config(
        parse_run_config([*argv, "--deepspeed", str(REPO / "configs" / "ds_zero3.json")]), 1, 8,
        torch.float32)
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert not zero3["bf16"]["enabled"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="deepspeed="):
        deepspeed_config(parse_run_config([*argv, "--deepspeed", str(bad)]), 1, 8, torch.float32)


def test_learning_rate_schedules():
    warm = lr_lambda("constant", warmup_steps=3, total_updates=10)
    assert [warm(n) for n in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda("linear", warmup_steps=0, total_updates=10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(10) == 0.0
    cosine = lr_lambda("cosine", warmup_steps=0, total_updates=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and abs(cosine(10)) < 1e-12
