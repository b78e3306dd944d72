"""The main job: a real GRPO run on the toy task, reference server in the loop, on this machine's CPU (or GPUs).

    python examples/toy/run_demo.py            # what `make demo` runs
    python examples/toy/run_demo.py --num_gpus 2 --config configs/toy_cpu.yaml --output_dir outputs/toy

Steps: build the toy model and dataset (reused when already there), start `ref_server.py` in the
background on a free loopback port and wait for its /health, run
`deepspeed --num_gpus N grpo_ref_split.py --config configs/toy_cpu.yaml`, stop the server, plot
the metrics and print a summary. The exit code is non-zero when any part fails, or when the mean
reward of the last 10 steps is not at least `--min_rise` above the first 10 steps.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as `python examples/toy/run_demo.py` from a checkout that was never installed

from grpo_split.training.metrics import read_metrics  # noqa: E402

WINDOW = 10  # steps averaged at each end of the run for the learning check


def run(cmd: list[str], what: str, **kwargs) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, cwd=REPO, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {result.returncode}")


class BackgroundServer:
    """`ref_server.py` on port 0 (a free one); the URL comes from its ready line. Output goes to a log file."""

    def __init__(self, model_dir: Path, log_path: Path, timeout: float = 300.0):
        cmd = [sys.executable, str(REPO / "ref_server.py"), "--model_name_or_path", str(model_dir), "--port", "0",
               "--dtype", "float32"]  # the toy config trains in float32 too
        print(f"$ {' '.join(cmd)} > {log_path}", flush=True)
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = self._read_url(timeout)

    def _read_url(self, timeout: float) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                self.log.write(line)
                self.log.flush()
                match = re.search(r"ready at (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the reference server exited with code {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the reference server was not ready within {timeout:g} s; see {self.log_path}")
            time.sleep(0.1)
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def reward_rise(metrics: list[dict]) -> tuple[float, float]:
    """Mean reward of the first and of the last WINDOW logged steps."""
    rewards = [m["reward"] for m in metrics if isinstance(m.get("reward"), float) and math.isfinite(m["reward"])]
    if len(rewards) < 2 * WINDOW:
        raise RuntimeError(f"only {len(rewards)} steps with a reward were logged; the check needs {2 * WINDOW}")
    return sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_cpu.yaml")
    parser.add_argument("--output_dir", default="outputs/toy")
    parser.add_argument("--num_gpus", type=int, default=2, help="ranks for `deepspeed --num_gpus` (CPU ranks here)")
    parser.add_argument("--min_rise", type=float, default=0.3, help="required reward rise, last vs first 10 steps")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("train_args", nargs="*", help="extra trainer flags after --, e.g. -- --max_steps 40")
    args = parser.parse_args(argv)

    output_dir = REPO / args.output_dir
    model_dir, data_path = REPO / "outputs" / "toy_model", REPO / "outputs" / "toy_data.jsonl"
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run each time; the model and data are reused
    output_dir.mkdir(parents=True)
    run([sys.executable, "examples/toy/make_toy_model.py", str(model_dir)], "building the toy model")
    run([sys.executable, "examples/toy/make_toy_data.py", str(data_path)], "writing the toy dataset")

    server = BackgroundServer(model_dir, output_dir / "ref_server.log")
    print(f"reference server at {server.url} (log: {server.log_path})", flush=True)
    started = time.monotonic()
    try:
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [deepspeed, "--num_gpus", str(args.num_gpus), "grpo_ref_split.py", "--config", args.config,
               "--model_name_or_path", str(model_dir), "--dataset_name", str(data_path),
               "--output_dir", str(output_dir), "--ref_server_url", server.url, *args.train_args]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        run(cmd, "training")
    finally:
        server.stop()
    train_seconds = time.monotonic() - started

    run([sys.executable, "scripts/plot_metrics.py", str(output_dir)], "plotting")
    metrics = read_metrics(output_dir / "metrics.jsonl")
    first, last = reward_rise(metrics)
    kl = metrics[-1].get("kl", math.nan)
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    print("\n=== demo summary ===")
    print(f"steps:            {metrics[-1]['step']}")
    print(f"reward:           first {WINDOW} steps {first:.3f} -> last {WINDOW} steps {last:.3f} "
          f"(rise {last - first:+.3f}; target >= {args.min_rise:+.2f})")
    print(f"kl (last step):   {kl:.4f}")
    loop_seconds = sum(m.get("step_time", 0.0) for m in metrics)
    print(f"wall time:        {train_seconds:.0f} s for the deepspeed run ({loop_seconds:.0f} s in training steps)")
    print(f"checkpoint:       {checkpoints[-1] if checkpoints else 'none'}")
    print(f"metrics / plot:   {output_dir / 'metrics.jsonl'}  {output_dir / 'metrics.png'}")
    if last - first < args.min_rise:
        print(f"FAILED: the reward rose by {last - first:.3f}, less than {args.min_rise}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        sys.exit(1)
