"""MetricsLogger / read_metrics (JSONL round trip, crash safety, resume) and scripts/plot_metrics.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_split.training.metrics import METRICS_FILE, MetricsLogger, read_metrics

REPO = Path(__file__).resolve().parents[2]
PLOT_SCRIPT = REPO / "scripts" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json(line: str) -> dict:
    """json.loads that rejects the non-standard NaN / Infinity / -Infinity literals, as jq or JavaScript do."""

    def reject(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def write_lines(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def plot_metrics():
    spec = importlib.util.spec_from_file_location("plot_metrics", PLOT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_round_trip_floats_tensors_numpy_and_nonfinite(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.25, "reward": torch.tensor(0.5), "kl": np.float32(0.125), "count": np.int64(3)})
        logger.log(2, {"loss": torch.tensor(1.0, requires_grad=True) * 2, "reward_std": float("nan"),
                       "kl": math.inf, "grad_norm": -math.inf, "note": "warmup", "clipped": None})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2
    parsed = [strict_json(line) for line in lines]  # every line is standard JSON
    assert parsed[0] == {"step": 1, "loss": 0.25, "reward": 0.5, "kl": 0.125, "count": 3.0}
    assert all(isinstance(v, float) for k, v in parsed[0].items() if k != "step")
    assert parsed[1]["reward_std"] == "NaN" and parsed[1]["kl"] == "Infinity" and parsed[1]["grad_norm"] == "-Infinity"

    rows = read_metrics(tmp_path / METRICS_FILE)
    assert rows[0] == parsed[0]
    assert rows[1]["step"] == 2 and rows[1]["loss"] == 2.0
    assert math.isnan(rows[1]["reward_std"])
    assert rows[1]["kl"] == math.inf and rows[1]["grad_norm"] == -math.inf
    assert rows[1]["note"] == "warmup" and rows[1]["clipped"] is None
    assert read_metrics(tmp_path) == rows  # a directory means its metrics.jsonl


def test_bad_values_are_rejected_with_the_metric_name(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="'per_token'.*scalar"):
            logger.log(1, {"per_token": torch.zeros(4)})
        with pytest.raises(TypeError, match="'hist'"):
            logger.log(1, {"hist": [1, 2]})
        with pytest.raises(ValueError, match="'step'"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="step must be an int"):
            logger.log(1.5, {"loss": 1.0})
    assert (tmp_path / METRICS_FILE).read_text() == ""  # nothing half-written by a rejected call
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(2, {"loss": 1.0})


def test_each_line_is_flushed_before_close(tmp_path):
    logger = MetricsLogger(tmp_path)
    try:
        for step in range(1, 4):
            logger.log(step, {"loss": float(step)})
            on_disk = (tmp_path / METRICS_FILE).read_text().splitlines()
            assert [strict_json(line)["step"] for line in on_disk] == list(range(1, step + 1))
    finally:
        logger.close()
    logger.close()  # idempotent


def test_appends_to_existing_file_with_a_warning(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 1.0})
    with pytest.warns(UserWarning, match="already has 1 lines"):
        logger = MetricsLogger(tmp_path)
    with logger:
        logger.log(2, {"loss": 2.0})
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_resume_removes_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 7):
            logger.log(step, {"loss": float(step)})
    mode = (tmp_path / METRICS_FILE).stat().st_mode & 0o777
    # The crashed run checkpointed at step 4 and logged 5 and 6 before dying; the resumed run re-logs them.
    with pytest.warns(UserWarning, match=r"removing 2 lines.*steps 5\.\.6"):
        logger = MetricsLogger(tmp_path, resume_step=4)
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4]  # rewritten before any new log
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic rewrite left no temp file
    assert (tmp_path / METRICS_FILE).stat().st_mode & 0o777 == mode  # the rewrite kept the permissions
    with logger:
        logger.log(5, {"loss": 50.0})
        logger.log(6, {"loss": 60.0})
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in rows] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0]


def test_resume_with_nothing_to_remove_keeps_the_file_unchanged(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": float("nan")})
    before = (tmp_path / METRICS_FILE).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming exactly at the last logged step is silent
        MetricsLogger(tmp_path, resume_step=2).close()
    assert (tmp_path / METRICS_FILE).read_bytes() == before


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / METRICS_FILE
    write_lines(path, '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="truncated last line 3"):
        rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2]


def test_logger_removes_truncated_last_line_before_appending(tmp_path):
    path = tmp_path / METRICS_FILE
    write_lines(path, '{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="removing truncated last line"):
        logger = MetricsLogger(tmp_path, resume_step=1)
    with logger:
        logger.log(2, {"loss": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repaired file reads back cleanly
        rows = read_metrics(path)
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / METRICS_FILE
    write_lines(path, '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}')
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    with MetricsLogger(tmp_path, resume_step=2) as logger:
        logger.log(3, {"loss": 3.0})  # must not be glued onto line 2
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("middle", "message"),
    [('{"step": 2, "lo', "line 2 is not valid JSON"), ("[1, 2]", "line 2 is not a JSON object"),
     ('{"loss": 2.0}', "line 2 has no integer 'step'")],
)
def test_bad_middle_line_raises_with_its_line_number(tmp_path, middle, message):
    path = tmp_path / METRICS_FILE
    write_lines(path, '{"step": 1, "loss": 1.0}\n' + middle + '\n{"step": 3, "loss": 3.0}\n')
    with pytest.raises(ValueError, match=message):
        read_metrics(path)
    with pytest.raises(ValueError, match=message):  # the logger refuses to append to a corrupt file too
        MetricsLogger(tmp_path)


def test_bad_last_line_with_newline_is_an_error_not_a_truncation(tmp_path):
    path = tmp_path / METRICS_FILE
    write_lines(path, '{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


@pytest.mark.parametrize("report_to", ["wandb", "all", "", "TensorBoard"])
def test_bad_report_to(tmp_path, report_to):
    with pytest.raises(ValueError, match=r"report_to must be one of 'none', 'tensorboard'"):
        MetricsLogger(tmp_path / "run", report_to=report_to)
    assert not (tmp_path / "run").exists()  # validated before anything is created


def test_tensorboard_writes_scalar_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, report_to="tensorboard") as logger:
        logger.log(1, {"loss": 0.5, "reward": torch.tensor(1.0), "note": "skipped in tensorboard"})
        logger.log(2, {"loss": 0.25, "reward": 2.0, "note": "x"})
    event_files = list((tmp_path / "runs").glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 0
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "reward"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert read_metrics(tmp_path)[0]["note"] == "skipped in tensorboard"  # non-numeric values stay in the JSON


def test_tensorboard_missing_says_how_to_install(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as it does when the tensorboard package is absent.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, report_to="tensorboard")


def training_rows(steps: int = 30, with_kl: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, steps + 1):
        row = {"loss": float(rng.normal()), "reward": step / steps + float(rng.normal(scale=0.1)),
               "reward_std": 0.2, "completions/mean_length": 40.0 + step}
        if with_kl:
            row["kl"] = 0.01 * step
        rows.append((step, row))
    return rows


def log_rows(output_dir: Path, rows) -> None:
    with MetricsLogger(output_dir) as logger:
        for step, row in rows:
            logger.log(step, row)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # four drawn panels, not an empty canvas


def test_plot_writes_png(tmp_path, plot_metrics, capsys):
    log_rows(tmp_path, training_rows())
    assert plot_metrics.main([str(tmp_path)]) == 0
    assert_png(tmp_path / "metrics.png")
    assert capsys.readouterr().out.strip() == str(tmp_path / "metrics.png")


@pytest.mark.parametrize("kl", ["missing", "all NaN"])
def test_plot_without_kl_and_with_custom_out(tmp_path, plot_metrics, capsys, kl):
    rows = training_rows(steps=5, with_kl=False)  # beta=0: the trainer logs no kl
    if kl == "all NaN":
        for _, row in rows:
            row["kl"] = float("nan")
    rows[2][1]["loss"] = float("nan")
    log_rows(tmp_path, rows)
    out = tmp_path / "plots" / "run.png"
    assert plot_metrics.main([str(tmp_path), "--out", str(out)]) == 0
    assert_png(out)
    assert not (tmp_path / "metrics.png").exists()
    assert capsys.readouterr().out.strip() == str(out)


def test_plot_helpers(plot_metrics):
    rows = [{"step": 1, "kl": math.nan}, {"step": 2, "kl": math.nan}, {"step": 3, "loss": 1.0}]
    assert plot_metrics.series(rows, "kl")[0] == [1, 2]
    assert not plot_metrics.has_data(plot_metrics.series(rows, "kl")[1])  # all-NaN panel -> "no data"
    assert plot_metrics.series(rows, "loss") == ([3], [1.0])
    averaged = plot_metrics.moving_average([1.0, 3.0, math.nan, 5.0], window=2)
    assert averaged == [1.0, 2.0, 3.0, 5.0]


def test_plot_missing_dir_missing_file_and_empty_file(tmp_path, plot_metrics, capsys):
    assert plot_metrics.main([str(tmp_path / "nope")]) == 2
    assert "run training first" in capsys.readouterr().err

    assert plot_metrics.main([str(tmp_path)]) == 2  # directory without metrics.jsonl
    err = capsys.readouterr().err
    assert METRICS_FILE in err and "output_dir" in err

    (tmp_path / METRICS_FILE).write_text("")
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "no logged steps" in capsys.readouterr().err
    assert not (tmp_path / "metrics.png").exists()


def test_plot_corrupt_file_exits_2_with_the_line_number(tmp_path, plot_metrics, capsys):
    write_lines(tmp_path / METRICS_FILE, '{"step": 1, "loss": 1.0}\nnot json\n{"step": 3}\n')
    assert plot_metrics.main([str(tmp_path)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_plot_script_runs_as_a_script_from_the_repo_root(tmp_path):
    log_rows(tmp_path / "run", training_rows(steps=4))
    done = subprocess.run([sys.executable, "scripts/plot_metrics.py", str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "run" / "metrics.png")
    assert_png(tmp_path / "run" / "metrics.png")

    missing = subprocess.run([sys.executable, "scripts/plot_metrics.py", str(tmp_path / "missing")], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "run training first" in missing.stderr


def test_importing_the_plot_script_does_not_import_matplotlib():
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('plot_metrics', {str(PLOT_SCRIPT)!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_plot_stacks_the_phase_timings_and_says_no_data_without_them(plot_metrics):
    from matplotlib.figure import Figure

    phases = {"timing/generate": 5.0, "timing/rewards": 0.1, "timing/reference": 0.3, "timing/update": 5.8,
              "timing/other": 0.2}
    rows = [{"step": step, **phases} for step in (1, 2, 3)] + [{"step": 4, "reward": 1.0}]
    ax = Figure().subplots()
    plot_metrics.plot_timing(ax, rows)
    assert len(ax.collections) == 5  # one band per phase
    top = ax.collections[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(sum(phases.values()))  # stacked: the top edge is the step's seconds
    empty = Figure().subplots()
    plot_metrics.plot_timing(empty, [{"step": 1, "reward": 1.0}])
    assert not empty.collections and "no data" in empty.texts[0].get_text()
