"""Plot a run's metrics.jsonl: reward (with a ±reward_std band and a moving average), kl, completion length, loss,
and where each step's time goes (seconds per phase, stacked).

    python scripts/plot_metrics.py outputs/toy                  # writes outputs/toy/metrics.png
    python scripts/plot_metrics.py outputs/toy --out toy.png --window 20

A panel whose metric is missing or all NaN says "no data" (with beta=0 the trainer logs no kl).
Exit status 2 when there is nothing to plot (no directory, no metrics.jsonl, no lines, a malformed file).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Run as `python scripts/plot_metrics.py`, sys.path[0] is scripts/, not the repo root; the other scripts do the
# same, so they also work from a checkout that was never `pip install -e`-ed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_split.training.metrics import METRICS_FILE, read_metrics  # noqa: E402

PANELS = (
    ("reward", "reward"),
    ("kl", "KL to reference"),
    ("completions/mean_length", "mean completion length (tokens)"),
    ("loss", "loss"),
    ("timing", "seconds per step"),
)
# The step's phases, stacked bottom to top in the order a step runs them (see grpo_split/training/timing.py).
TIMING_KEYS = ("timing/generate", "timing/rewards", "timing/reference", "timing/update", "timing/other")
NO_DATA_HINT = "run training first (it writes OUTPUT_DIR/metrics.jsonl), and pass that run's output_dir"


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a numeric `key`; NaN values are kept (matplotlib leaves gaps)."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values, ignoring NaN (NaN only where the whole window is NaN)."""
    out = []
    for end in range(1, len(values) + 1):
        finite = [v for v in values[max(0, end - window) : end] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def has_data(values: list[float]) -> bool:
    """True when at least one value can be drawn (not NaN, not infinite)."""
    return any(math.isfinite(v) for v in values)


def plot(rows: list[dict], out: Path, title: str, window: int) -> None:
    """Draw the four panels for `rows` (as returned by read_metrics) into a PNG at `out`."""
    # Figure + the Agg canvas directly, not pyplot: no display needed and no global figure state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 12), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    axes[-1].set_visible(False)
    for index, (ax, (key, label)) in enumerate(zip(axes, PANELS, strict=False)):
        ax.set_title(key)
        if index >= len(PANELS) - 2:  # shared x axis: label it once, under the bottom panels
            ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "timing":
            plot_timing(ax, rows)
            continue
        steps, values = series(rows, key)
        if not has_data(values):
            why = "not logged" if not steps else "only NaN/inf values"
            ax.text(0.5, 0.5, f"no data\n({key!r}: {why})", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
            continue
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1, label=key)
        if key == "reward":
            std_rows = [row for row in rows if key in row and "reward_std" in row]
            band_steps, means = series(std_rows, key)
            _, stds = series(std_rows, "reward_std")
            if has_data(stds) and len(stds) == len(means):
                ax.fill_between(band_steps, [m - s for m, s in zip(means, stds, strict=True)],
                                [m + s for m, s in zip(means, stds, strict=True)], alpha=0.2, label="± reward_std")
            if len(values) > 1:
                ax.plot(steps, moving_average(values, window), linewidth=2, label=f"moving average ({window} steps)")
            ax.legend(loc="best")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def plot_timing(ax, rows: list[dict]) -> None:
    """Stacked seconds per phase of the steps that logged all of them (runs from before the phase
    timings logged none: "no data")."""
    timed = [row for row in rows if all(isinstance(row.get(key), (int, float)) for key in TIMING_KEYS)]
    if not timed:
        ax.text(0.5, 0.5, "no data\n(no timing/* metrics logged)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        return
    steps = [row["step"] for row in timed]
    ax.stackplot(steps, *[[float(row[key]) for row in timed] for key in TIMING_KEYS],
                 labels=[key.removeprefix("timing/") for key in TIMING_KEYS], alpha=0.8)
    ax.legend(loc="upper left", fontsize="small")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, read OUTPUT_DIR/metrics.jsonl, write the PNG and print its path; 2 when nothing to plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the training run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: OUTPUT_DIR/metrics.png)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window for reward, in logged steps")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")

    path = args.output_dir / METRICS_FILE
    if not args.output_dir.is_dir():
        print(f"error: no directory {args.output_dir}; {NO_DATA_HINT}", file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"error: no {path}; {NO_DATA_HINT}", file=sys.stderr)
        return 2
    try:
        rows = read_metrics(path)
    except ValueError as exc:
        print(f"error: cannot read metrics: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {path} has no logged steps yet; {NO_DATA_HINT}", file=sys.stderr)
        return 2

    out = args.out if args.out is not None else args.output_dir / "metrics.png"
    title = f"{args.output_dir.resolve().name}: {len(rows)} logged steps, last step {rows[-1]['step']}"
    plot(rows, out, title, args.window)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
