"""Peak memory and step time of our trainer (with its reference server) against TRL's GRPOTrainer, on the
same work at a real model size.

    .venv/bin/python scripts/bench_memory.py                  # 2 steps each side, about 6 minutes on 2 idle cores
    .venv/bin/python scripts/bench_memory.py --steps 3 --json bench_results/bench_memory.json
    .venv/bin/python scripts/bench_memory.py --only ours       # ours alone (e.g. changing DeepSpeed settings)
    .venv/bin/python scripts/bench_memory.py --only ours -- --deepspeed configs/ds_zero2.json   # trainer flags
    .venv/bin/python scripts/bench_memory.py --only ours --trainer_env MALLOC_MMAP_THRESHOLD_=1048576

The model has Qwen2.5-0.5B's exact shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocabulary 151,936, tied embeddings) with random weights, float32, built once with
`save_pretrained` into --work_dir and reused. Nothing is downloaded: the tokenizer is the toy task's
(examples/toy/make_toy_model.py: trained locally, 74 tokens, a chat template), the prompts are the toy
task's. The model's vocabulary is far larger than the tokenizer's; the random model samples ids
beyond the tokenizer almost always, and `batch_decode` (which both trainers call on completions)
returns an empty string for those, without error, on both sides alike. The model rarely samples EOS,
so every completion runs to max_completion_length on both sides: the same tokens of work.

The work: 2 prompts x 4 completions of 64 tokens per step, gradient_accumulation_steps 2 (micro-batches
of 4 completions), beta 0.04 (TRL keeps a reference model in its process; ours asks the server),
loss_type grpo, AdamW, temperature 1, the same pseudo-random reward on both sides (`bench_reward`:
the reward's values do not change the cost, but advantages that are not all zero make the gradient
a real one), gradient checkpointing off on both (TRL's own default is on: --gradient_checkpointing
turns it on for both).

Measured, for each process: the peak resident set size, both from polling /proc every 0.1 s (the sum
over the process and its children) and from the kernel's high-water mark (`ru_maxrss` of the waited
child, which polling cannot miss); wall time; and per step: the step time, and for ours the phase
timings (`timing/*` in the run's metrics.jsonl, when the trainer logs them). Our trainer runs as one
process (`python grpo_ref_split.py --config ...`: a world of one) and saves its final checkpoint as
every run does; that save is part of its peak. Run one side at a time on a small machine: both are
big-memory processes. On 2 idle cores a step takes about 50 s on either side; a loaded machine
stretches steps (and the run) several times, and the step times with it, while the peaks stay put.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_BUILDER_VERSION = 1
MODEL_MARKER = "bench_model.json"
# Qwen2.5-0.5B's shape (its config.json), tied input and output embeddings.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
PROMPTS_PER_STEP, NUM_GENERATIONS, COMPLETION_LENGTH, GRADIENT_ACCUMULATION = 2, 4, 64, 2
BETA, LEARNING_RATE, SEED = 0.04, 1e-6, 0
POLL_SECONDS = 0.1
GIB = 1024**3


# ---------------------------------------------------------------- the reward both trainers call


_REWARD_RNG = random.Random(SEED)


def bench_reward(prompts, completions, **kwargs) -> list[float]:
    """A pseudo-random reward in [0, 1), the same sequence in every process that calls it: the
    reward's values do not change the cost of a step, and spread within each group gives every
    completion a non-zero advantage (the decoded texts are mostly empty, see the module docstring)."""
    return [_REWARD_RNG.random() for _ in completions]


# ---------------------------------------------------------------- the model and the data


def build_assets(work_dir: Path) -> tuple[Path, Path]:
    """(model directory, prompts JSONL) in `work_dir`, built once and reused (a marker is written last)."""
    import torch

    from examples.toy.make_toy_model import IM_END, PAD_TOKEN, build_tokenizer
    from examples.toy.toy_task import make_examples, write_jsonl

    model_dir, data_path = work_dir / "model", work_dir / "prompts.jsonl"
    expected = {"builder_version": MODEL_BUILDER_VERSION, "arch": QWEN25_05B, "seed": SEED}
    marker = model_dir / MODEL_MARKER
    if not (marker.is_file() and json.loads(marker.read_text()) == expected):
        from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        tokenizer = build_tokenizer(SEED)
        pad_id, eos_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)
        config = Qwen2Config(**QWEN25_05B, bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
        print(f"building a random model of Qwen2.5-0.5B's shape in {model_dir} (once) ...", flush=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        marker.write_text(json.dumps(expected))
    if not data_path.is_file():
        write_jsonl(data_path, make_examples(256, SEED))
    return model_dir, data_path


def check_decoding(model_dir: Path) -> str:
    """What the tokenizer makes of ids it does not have (the random model samples those): one line."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = QWEN25_05B["vocab_size"]
    beyond = [len(tokenizer), vocab // 2, vocab - 1]
    decoded = tokenizer.batch_decode([beyond], skip_special_tokens=True)[0]
    return (f"tokenizer: {len(tokenizer)} tokens, model vocabulary {vocab}; batch_decode({beyond}) = {decoded!r} "
            "(ids beyond the tokenizer decode to nothing, on both sides)")


# ---------------------------------------------------------------- resident memory of process trees


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, now."""
    children = _children_map()
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_bytes(current)
        stack.extend(children.get(current, []))
    return total


class RssSampler:
    """Polls the resident memory of named process trees in a thread: peak and a coarse timeline."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def track(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.peak.setdefault(name, 0)

    def _run(self) -> None:
        last_record = -1.0
        while not self._stop.is_set():
            now = time.monotonic() - self.started
            sample = {name: tree_rss(pid) for name, pid in list(self.pids.items())}
            for name, rss in sample.items():
                self.peak[name] = max(self.peak[name], rss)
            if now - last_record >= 1.0:
                self.timeline.append((round(now, 1), sample))
                last_record = now
            self._stop.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_child(proc: subprocess.Popen, timeout: float | None = None) -> tuple[int, int]:
    """(exit code, kernel's peak RSS in bytes of the child, including its waited-for descendants)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.2)


class LineLog:
    """A child's merged stdout/stderr, to a file and in memory with arrival times (tqdm's \\r lines split)."""

    def __init__(self, proc: subprocess.Popen, path: Path, started: float, echo: bool):
        self.lines: list[tuple[float, str]] = []
        self.path = path
        self._thread = threading.Thread(target=self._read, args=(proc, started, echo), daemon=True)
        self._thread.start()

    def _read(self, proc, started, echo) -> None:
        with open(self.path, "w") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                for line in re.split(r"[\r\n]+", raw):
                    if line.strip():
                        self.lines.append((round(time.monotonic() - started, 1), line))
                        if echo:
                            print(f"    | {line[:160]}", flush=True)

    def join(self) -> None:
        self._thread.join(timeout=10)

    def find(self, pattern: str) -> str | None:
        for _, line in self.lines:
            match = re.search(pattern, line)
            if match:
                return match.group(1)
        return None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    # bench_reward is imported by the trainer as "bench_memory:bench_reward".
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "scripts"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def start(cmd: list[str], log_path: Path, sampler: RssSampler, name: str, echo: bool,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, LineLog]:
    shown = " ".join(f"{key}={value}" for key, value in (env or {}).items())
    print(f"$ {shown + ' ' if shown else ''}{' '.join(cmd)}  (log: {log_path})", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    sampler.track(name, proc.pid)
    return proc, LineLog(proc, log_path, sampler.started, echo)


# ---------------------------------------------------------------- our trainer and server


def our_config(path: Path, model_dir: Path, data_path: Path, output_dir: Path, url: str, steps: int,
               gradient_checkpointing: bool) -> Path:
    import yaml

    config = {
        "model_name_or_path": str(model_dir), "dtype": "float32", "gradient_checkpointing": gradient_checkpointing,
        "dataset_name": str(data_path), "prompt_column": "prompt", "answer_column": "answer",
        "max_prompt_length": 64,
        "num_generations": NUM_GENERATIONS, "prompts_per_step": PROMPTS_PER_STEP,
        "max_completion_length": COMPLETION_LENGTH, "temperature": 1.0, "top_p": 1.0,
        "reward_funcs": ["bench_memory:bench_reward"],
        "beta": BETA, "loss_type": "grpo", "learning_rate": LEARNING_RATE, "max_steps": steps,
        "gradient_accumulation_steps": GRADIENT_ACCUMULATION, "seed": SEED, "logging_steps": 1,
        "save_steps": 10**9, "output_dir": str(output_dir), "report_to": "none", "ref_server_url": [url],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_ours(model_dir: Path, data_path: Path, run_dir: Path, steps: int, gradient_checkpointing: bool,
             extra: list[str], echo: bool, trainer_env: dict[str, str] | None = None) -> dict:
    sampler = RssSampler()
    server_cmd = [sys.executable, "ref_server.py", "--model_name_or_path", str(model_dir), "--port", "0",
                  "--dtype", "float32", "--device", "cpu"]
    server, server_log = start(server_cmd, run_dir / "ref_server.log", sampler, "server", echo)
    trainer = None
    try:
        deadline = time.monotonic() + 600
        while (url := server_log.find(r"ready at (http://\S+)")) is None:
            if server.poll() is not None:
                raise RuntimeError(f"the reference server exited with code {server.returncode}; see {server_log.path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reference server was not ready within 600 s; see {server_log.path}")
            time.sleep(0.2)
        output_dir = run_dir / "ours"
        config = our_config(run_dir / "ours.yaml", model_dir, data_path, output_dir, url, steps,
                            gradient_checkpointing)
        started = time.monotonic()
        trainer_cmd = [sys.executable, "grpo_ref_split.py", "--config", str(config), *extra]
        trainer, trainer_log = start(trainer_cmd, run_dir / "trainer.log", sampler, "trainer", echo, trainer_env)
        code, trainer_maxrss = wait_child(trainer)
        trainer_wall = time.monotonic() - started
        trainer_log.join()
        if code != 0:
            raise RuntimeError(f"the trainer exited with code {code}; see {trainer_log.path}")
    finally:
        if trainer is not None and trainer.returncode is None:
            trainer.kill()
            wait_child(trainer)
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        _, server_maxrss = wait_child(server, timeout=60)
        sampler.stop()
        server_log.join()

    from grpo_split.training.metrics import read_metrics

    metrics = read_metrics(output_dir / "metrics.jsonl")
    per_step = []
    for row in metrics:
        entry = {"step": row["step"], "step_time": row.get("step_time")}
        entry.update({key: value for key, value in row.items() if key.startswith("timing/")})
        per_step.append(entry)
    return {
        "trainer": {"peak_rss_polled": sampler.peak["trainer"], "peak_rss_kernel": trainer_maxrss,
                    "wall_seconds": trainer_wall},
        "server": {"peak_rss_polled": sampler.peak["server"], "peak_rss_kernel": server_maxrss},
        "steps": per_step,
        "timeline": [(t, s.get("trainer", 0), s.get("server", 0)) for t, s in sampler.timeline],
        "log": [line for line in trainer_log.lines if "it/s" not in line[1] and "s/it" not in line[1]][-40:],
    }


# ---------------------------------------------------------------- TRL's GRPOTrainer


def trl_worker(args) -> int:
    """In its own process: TRL's GRPOTrainer on the same work; writes per-step times to args.result."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]}
                                 for row in rows])

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *_, **__):
            self._start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self._start)

    config = GRPOConfig(
        output_dir=str(args.output_dir), use_cpu=True, bf16=False, fp16=False, seed=SEED,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS // GRADIENT_ACCUMULATION,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION, num_generations=NUM_GENERATIONS,
        max_completion_length=COMPLETION_LENGTH, temperature=1.0, top_p=1.0, beta=BETA, loss_type="grpo",
        learning_rate=LEARNING_RATE, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=args.gradient_checkpointing, model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0,
    )
    timer = StepTimes()
    trainer = GRPOTrainer(model=str(args.model), reward_funcs=bench_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    Path(args.result).write_text(json.dumps({"step_times": timer.times,
                                             "log_history": trainer.state.log_history}))
    return 0


def run_trl(model_dir: Path, data_path: Path, run_dir: Path, steps: int, gradient_checkpointing: bool,
            echo: bool) -> dict:
    sampler = RssSampler()
    result = run_dir / "trl_result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_trl_worker", "--model", str(model_dir),
           "--data", str(data_path), "--steps", str(steps), "--output_dir", str(run_dir / "trl"),
           "--result", str(result)]
    if gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    started = time.monotonic()
    proc, log = start(cmd, run_dir / "trl.log", sampler, "trl", echo)
    code, maxrss = wait_child(proc)
    wall = time.monotonic() - started
    sampler.stop()
    log.join()
    if code != 0:
        raise RuntimeError(f"the TRL run exited with code {code}; see {log.path}")
    data = json.loads(result.read_text())
    return {"trl": {"peak_rss_polled": sampler.peak["trl"], "peak_rss_kernel": maxrss, "wall_seconds": wall},
            "steps": [{"step": i + 1, "step_time": t} for i, t in enumerate(data["step_times"])],
            "timeline": [(t, s.get("trl", 0)) for t, s in sampler.timeline]}


# ---------------------------------------------------------------- the report


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def summary(results: dict) -> str:
    lines = [f"=== bench_memory: {results['setup']} ==="]
    if results.get("trainer_args") or results.get("trainer_env"):
        flags = " ".join(results.get("trainer_args", []))
        lines.append(f"our trainer with: {flags} {results.get('trainer_env') or ''}")
    if "ours" in results:
        ours = results["ours"]
        for name in ("trainer", "server"):
            part = ours[name]
            lines.append(f"ours {name + ':':9} peak RSS {gib(part['peak_rss_kernel'])} (kernel high-water), "
                         f"{gib(part['peak_rss_polled'])} (polled, with children)")
        lines.append(f"ours trainer wall: {ours['trainer']['wall_seconds']:.0f} s (load, steps, final checkpoint)")
        for step in ours["steps"]:
            phases = " ".join(f"{key.removeprefix('timing/')} {value:.1f}" for key, value in step.items()
                              if key.startswith("timing/"))
            lines.append(f"ours step {step['step']}: {step['step_time']:.1f} s" + (f"  ({phases})" if phases else ""))
    if "trl" in results:
        trl = results["trl"]
        part = trl["trl"]
        lines.append(f"TRL process:  peak RSS {gib(part['peak_rss_kernel'])} (kernel high-water), "
                     f"{gib(part['peak_rss_polled'])} (polled, with children); wall {part['wall_seconds']:.0f} s")
        for step in trl["steps"]:
            lines.append(f"TRL step {step['step']}: {step['step_time']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="training steps on each side")
    parser.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="on both sides (TRL's own default)")
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "bench_memory",
                        help="where the model is built once and reused")
    parser.add_argument("--json", type=Path, help="write the results (with RSS timelines) here")
    parser.add_argument("--keep", action="store_true", help="keep the runs' output directories and logs")
    parser.add_argument("--quiet", action="store_true", help="do not echo the children's output")
    parser.add_argument("--trainer_env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for our trainer's process only (repeatable)")
    parser.add_argument("--_trl_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("trainer_args", nargs="*", help="extra flags for our trainer, after --")
    args = parser.parse_args(argv)
    if args._trl_worker:
        return trl_worker(args)
    bad = [item for item in args.trainer_env if "=" not in item]
    if bad:
        parser.error(f"--trainer_env takes KEY=VALUE, got {bad}")
    trainer_env = dict(item.split("=", 1) for item in args.trainer_env)

    model_dir, data_path = build_assets(args.work_dir)
    decoding = check_decoding(model_dir)
    print(decoding, flush=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.work_dir))
    results: dict = {
        "setup": (f"random Qwen2.5-0.5B shape, float32, {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions "
                  f"of {COMPLETION_LENGTH} tokens, GA {GRADIENT_ACCUMULATION}, beta {BETA}, {args.steps} steps, "
                  f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {os.cpu_count()} CPUs"),
        "decoding": decoding,
        "trainer_args": args.trainer_args,
        "trainer_env": trainer_env,
    }
    try:
        if args.only in (None, "ours"):
            results["ours"] = run_ours(model_dir, data_path, run_dir, args.steps, args.gradient_checkpointing,
                                       args.trainer_args, not args.quiet, trainer_env)
        if args.only in (None, "trl"):
            results["trl"] = run_trl(model_dir, data_path, run_dir, args.steps, args.gradient_checkpointing,
                                     not args.quiet)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    text = summary(results)
    print(text, flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**results, "summary": text}, indent=1))
        print(f"results: {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
