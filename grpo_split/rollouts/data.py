"""Prompt datasets: loading (hub name or local file) and a resumable, seeded prompt order."""

from __future__ import annotations

from pathlib import Path

import torch

from grpo_split.config.parsing import ConfigError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_prompt_dataset(name: str, split: str, prompt_column: str, answer_column: str | None,
                        config_name: str | None = None):
    """A `datasets.Dataset` of prompts; ConfigError naming the field when a column or the dataset is missing.

    `name` is a local .json/.jsonl/.csv/.parquet file (loaded with the matching `datasets` builder) or
    a hub dataset name.
    """
    import datasets  # heavy import, kept out of module import time

    path = Path(name)
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise ConfigError(f"dataset_name={name!r}: no such file")
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        try:
            dataset = datasets.load_dataset(name, config_name, split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as exc:
            raise ConfigError(
                f"dataset_name={name!r} (config {config_name!r}, split {split!r}) could not be loaded: {exc}. "
                "Pass a hub dataset name this "
                "machine can download, or a local .json/.jsonl/.csv/.parquet file"
            ) from exc
    for field_name, column in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if column is not None and column not in dataset.column_names:
            raise ConfigError(f"{field_name}={column!r} is not a column of {name}; its columns are "
                              f"{dataset.column_names}")
    if len(dataset) == 0:
        raise ConfigError(f"dataset_name={name!r} has no rows")
    return dataset


class PromptOrder:
    """Dataset row indices in a seeded order, reshuffled each epoch; its state resumes a run exactly.

    The order depends only on (seed, epoch), so every rank computes the same permutation and takes
    its own slice of each step's prompts without any communication.
    """

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError(f"PromptOrder needs at least one row, got {num_rows}")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._permutation = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        """The next `count` indices, continuing into a fresh shuffle when an epoch runs out."""
        indices: list[int] = []
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch += 1
                self.position = 0
                self._permutation = self._shuffle(self.epoch)
            take = min(count - len(indices), self.num_rows - self.position)
            indices.extend(self._permutation[self.position : self.position + take])
            self.position += take
        return indices

    def state_dict(self) -> dict:
        return {"num_rows": self.num_rows, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"cannot resume the prompt order: the checkpoint was made with {state['num_rows']} rows and seed "
                f"{state['seed']}, this run has {self.num_rows} rows and seed {self.seed} "
                "(resume needs the same dataset and seed)"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._permutation = self._shuffle(self.epoch)
