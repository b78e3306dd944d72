"""Training metrics: one JSON line per logged step in `output_dir/metrics.jsonl`, optionally TensorBoard too.

The JSONL file is the record of a run: plain text, appended and flushed line by line, so a crash loses at most
the line being written, and `scripts/plot_metrics.py` or any JSON tool can read it. TensorBoard is an optional
extra view of the same numbers (`report_to="tensorboard"`, needs `pip install tensorboard`).

Each line is `{"step": <int>, "<name>": <value>, ...}`. Numbers (Python, NumPy scalars, one-element tensors) are
written as floats. Non-finite floats are written as the JSON strings "NaN", "Infinity" and "-Infinity":
bare `NaN` (what `json.dumps` emits by default) is not JSON and strict parsers (jq, JavaScript, Go) reject the
whole line, while `null` would lose the difference between NaN and +/-inf, which is the difference between
"undefined" (e.g. the std of one sample) and "diverged". `read_metrics` turns the three strings back into floats.

Create the logger on one process only (global rank 0): two writers appending to one file interleave lines.

    with MetricsLogger("outputs/run", report_to="tensorboard", resume_step=checkpoint_step) as metrics:
        metrics.log(step, {"loss": loss, "reward": reward_mean, "kl": kl})
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any

from grpo_split.rollouts.build import Rollouts
from grpo_split.rollouts.metrics import rollout_metrics
from grpo_split.training import distributed as dist_utils
from grpo_split.training.checkpoint import write_text_atomic
from grpo_split.training.timing import PHASES, PhaseTimer, timing_metrics

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "runs"
REPORT_TO_CHOICES = ("none", "tensorboard")

# JSON spellings of the non-finite floats (the same words JavaScript and Python's json use for them).
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_json_value(name: str, value: Any) -> Any:
    """A metric value as written to JSON: numbers become floats (non-finite ones the strings above);
    str, bool and None are kept as they are; anything else is a TypeError naming the metric."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Real):
        number = float(value)
    elif hasattr(value, "__float__"):
        # 0-dim / one-element tensors and arrays. For a CUDA tensor float() is a device sync; the caller
        # logs every `logging_steps`, not every micro-step, so the sync is rare.
        if hasattr(value, "detach"):
            value = value.detach()  # a loss straight from backward: the graph is not needed to read it
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            shape = getattr(value, "shape", None)
            raise TypeError(
                f"metric {name!r} must be a scalar, got {type(value).__name__} with shape {shape}; "
                "log a reduced value such as .mean()"
            ) from exc
    else:
        raise TypeError(f"metric {name!r} must be a number, str, bool or None, got {type(value).__name__}")
    if math.isfinite(number):
        return number
    return _NONFINITE_TO_JSON[repr(number)]


def _from_json_value(value: Any) -> Any:
    if isinstance(value, str) and value in _JSON_TO_NONFINITE:
        return _JSON_TO_NONFINITE[value]
    return value


def _to_record(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if "step" in metrics:
        raise ValueError("metrics must not contain the key 'step'; it is passed as the step argument")
    record: dict[str, Any] = {"step": int(step)}
    for name, value in metrics.items():
        record[str(name)] = _to_json_value(str(name), value)
    return record


def _dumps(record: dict[str, Any]) -> str:
    # allow_nan=False: a guarantee, since _to_json_value already replaced every non-finite float.
    return json.dumps(record, allow_nan=False) + "\n"


def _parse_line(text: str, lineno: int, path: Path) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg}): {text[:80]!r}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{path}: line {lineno} is not a JSON object: {text[:80]!r}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{path}: line {lineno} has no integer 'step': {text[:80]!r}")
    return {key: _from_json_value(value) for key, value in record.items()}


def _read_records(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """(raw line, parsed record) for every complete line, plus the text of a truncated last line, if any.

    A line is truncated when it is the last one, has no newline and does not parse: the process died while
    writing it. Every other line that does not parse is an error, with its 1-based line number."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines(keepends=True)
    records: list[tuple[str, dict[str, Any]]] = []
    truncated = None
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_last_unterminated = lineno == len(lines) and not raw.endswith("\n")
        try:
            record = _parse_line(raw, lineno, path)
        except ValueError:
            if is_last_unterminated:
                truncated = raw
                break
            raise
        records.append((raw, record))
    return records, truncated


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file (or the one in a directory) into one dict per line, in file order.

    "NaN", "Infinity" and "-Infinity" come back as floats. A truncated last line (a crash mid-write) is
    skipped with a warning; any other malformed line raises ValueError naming its line number."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records, truncated = _read_records(path)
    if truncated is not None:
        warnings.warn(
            f"{path}: skipping truncated last line {len(records) + 1} (the writer stopped mid-line): "
            f"{truncated[:80]!r}",
            stacklevel=2,
        )
    return [record for _, record in records]


def _open_tensorboard(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "report_to='tensorboard' needs the tensorboard package: pip install tensorboard "
            "(or use report_to='none'; metrics.jsonl is written either way)"
        ) from exc
    # purge_step hides events at or after it that a crashed run wrote past the checkpoint, as the JSONL
    # truncation does for metrics.jsonl.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class MetricsLogger:
    """Writes one JSON line per logged step to output_dir/metrics.jsonl, and to TensorBoard when asked.

    `report_to`: "none" (JSONL only) or "tensorboard" (also output_dir/runs; non-numeric values are skipped
    there but kept in the JSON). `resume_step`: when resuming from the checkpoint saved at this step, lines
    with a larger step (logged by the crashed run after that checkpoint) are removed first, so the file has no
    duplicate steps; lines with step <= resume_step are kept. A truncated last line left by a crash is always
    removed (with a warning), since appending after it would corrupt the next line. Usable as a context manager.
    """

    def __init__(self, output_dir: str | Path, report_to: str = "none", resume_step: int | None = None):
        if report_to not in REPORT_TO_CHOICES:
            raise ValueError(f"report_to must be one of {', '.join(map(repr, REPORT_TO_CHOICES))}, got {report_to!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if self.path.exists():
            self._repair(resume_step)
        self._writer = None
        if report_to == "tensorboard":
            purge_step = None if resume_step is None else resume_step + 1
            self._writer = _open_tensorboard(self.output_dir / TENSORBOARD_DIR, purge_step)
        # Append, and log() flushes every line to the OS: a crash of this process loses nothing already logged
        # (no fsync per line: it would cost a disk round trip per step, and power loss is not what we guard against).
        self._file = open(self.path, "a", encoding="utf-8")

    def _repair(self, resume_step: int | None) -> None:
        records, truncated = _read_records(self.path)
        if truncated is not None:
            warnings.warn(f"{self.path}: removing truncated last line {truncated[:80]!r}", stacklevel=3)
        kept = records
        if resume_step is not None:
            kept = [(raw, record) for raw, record in records if record["step"] <= resume_step]
            if len(kept) < len(records):
                dropped = [record["step"] for _, record in records if record["step"] > resume_step]
                warnings.warn(
                    f"{self.path}: resuming at step {resume_step}, removing {len(dropped)} lines logged after it "
                    f"(steps {min(dropped)}..{max(dropped)})",
                    stacklevel=3,
                )
        elif records:
            # Not a resume, yet the file has steps: a second run into the same output_dir. Appending keeps both
            # (the caller chose the directory); say so, since the steps will repeat.
            steps = [record["step"] for _, record in records]
            warnings.warn(
                f"{self.path} already has {len(records)} lines (steps {min(steps)}..{max(steps)}); appending. "
                "Pass resume_step when resuming from a checkpoint, or use a fresh output_dir.",
                stacklevel=3,
            )
        # A complete last record whose newline was lost also needs a rewrite: the next line would join it.
        unterminated = bool(records) and not records[-1][0].endswith("\n")
        if truncated is not None or len(kept) < len(records) or unterminated:
            write_text_atomic(self.path, "".join(raw if raw.endswith("\n") else raw + "\n" for raw, _ in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append `{"step": step, **metrics}` as one line (flushed now); numbers also go to TensorBoard."""
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        record = _to_record(step, metrics)
        self._file.write(_dumps(record))
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name == "step" or isinstance(value, bool) or value is None:
                    continue
                if isinstance(value, str):
                    if value not in _JSON_TO_NONFINITE:
                        continue
                    value = _JSON_TO_NONFINITE[value]
                self._writer.add_scalar(name, value, global_step=int(step))

    def close(self) -> None:
        """Flush and close the file (and the TensorBoard writer); calling it again does nothing."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def step_metrics(rollouts: Rollouts, reward_names: list[str], losses: dict, step_time: float,
                 counters: dict[str, float], num_generations: int, timer: PhaseTimer | None = None
                 ) -> dict[str, float]:
    """Metrics of the whole step: rollout statistics over all ranks' rows, loss metrics weighted over ranks
    as over micro-batches (see training.update.train_on_batch), the running `counters`, and with a
    `timer` the phase timings (this rank's seconds, all ranks' tokens; see training.timing)."""
    rows = (rollouts.rewards.float(), rollouts.per_func.float(), rollouts.lengths.float(), rollouts.truncated.float())
    rewards, per_func, lengths, truncated = (dist_utils.gather_rows(t) for t in rows)
    metrics = rollout_metrics(rewards, per_func, reward_names, lengths, truncated.bool(), num_generations)
    weights = losses.pop("weights", {})
    keys = sorted(losses)
    weighted = [losses[k] * weights.get(k, 1.0) for k in keys] + [weights.get(k, 1.0) for k in keys]
    tokens = float(rollouts.batch.attention_mask.sum())
    phase_tokens = [timer.tokens.get(name, 0.0) if timer else 0.0 for name in PHASES]
    totals = dist_utils.all_reduce_sum(weighted + phase_tokens + [tokens])  # one collective for all sums
    for i, key in enumerate(keys):
        weight = totals[len(keys) + i]
        metrics[key] = totals[i] / weight if weight > 0 else 0.0
    metrics["step_time"] = step_time
    metrics["tokens_per_second"] = totals[-1] / step_time
    if timer is not None:
        global_tokens = dict(zip(PHASES, totals[2 * len(keys) : 2 * len(keys) + len(PHASES)], strict=True))
        metrics.update(timing_metrics(timer.seconds, global_tokens, step_time))
    metrics.update({key: float(value) for key, value in counters.items()})
    return metrics
