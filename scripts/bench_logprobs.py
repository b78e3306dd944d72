"""Benchmark: forward + backward of the GRPO loss from final hidden states at the Qwen2.5 vocabulary.

Four ways to get the GRPO loss of every completion token from final hidden states and the LM head.
Every variant does the same work: the per-token log-probs, then the GRPO loss (loss_type grpo,
beta 0.04, old and reference log-probs given, every token unmasked), then backward.
  seed                full (B, T, V) logits, then a row-by-row log_softmax + gather (the public simple_GRPO
                      project's way), then stable_ops.policy_loss
  per_token_logps     full logits, then stable_ops.per_token_logps (chunked, hand-written backward), then policy_loss
  linear_logps        stable_ops.linear_logps (fused LM head: the logits are never materialized; 4 LM-head
                      matmuls), then policy_loss
  linear_policy_loss  stable_ops.linear_policy_loss (fused LM head and loss: both gradients in the forward
                      pass, 3 LM-head matmuls)

Each variant runs in its own process, so its peak RSS is its own. Reported per variant:
  time_s        median wall time of one forward + backward over the timed repeats (after one untimed run);
                with --rounds, the median of the rounds' medians
  time_vs_seed  time_s / the seed's; with --rounds, the median over rounds of the ratio to the same round's seed
  cpu_s         the same for the process's CPU time (all threads): less sensitive than wall time to other
                processes taking the cores, so a second view of the cost on a shared machine
  transient_mb  peak RSS during one forward + backward, minus the RSS before it (inputs allocated),
                minus the bytes of the gradients of hidden and weight, which every variant must hold
The loss and the gradients are compared with the seed variant's.

    python scripts/bench_logprobs.py                      # B=8, T=512 (4,096 tokens), H=896, V=151,936
    python scripts/bench_logprobs.py --batch 2 --length 1024 --json results.json
    python scripts/bench_logprobs.py --batch 1 --length 1024 --repeats 1 --rounds 3   # paired ratios on a busy machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stable_ops import linear_logps, linear_policy_loss, per_token_logps, policy_loss  # noqa: E402

VARIANTS = ("seed", "per_token_logps", "linear_logps", "linear_policy_loss")
QWEN25_VOCAB = 151_936
QWEN25_05B_HIDDEN = 896


def seed_logps(hidden, weight, labels):
    """simple_GRPO's approach (its grpo_ref_split.py): materialize the logits, then log_softmax + gather row by row."""
    logits = hidden @ weight.t()  # (B, T, V)
    rows = []
    for logits_row, labels_row in zip(logits, labels, strict=True):
        log_probs = logits_row.log_softmax(dim=-1)  # (T, V)
        rows.append(torch.gather(log_probs, dim=1, index=labels_row.unsqueeze(1)).squeeze(1))
    return torch.stack(rows)  # (B, T)


# The loss every variant computes: TRL's default GRPO loss with a KL penalty, old log-probs given.
LOSS_OPTIONS = {"beta": 0.04, "loss_type": "grpo"}


def run_variant(name, hidden, weight, labels, loss_inputs, chunk_size=None):
    """(loss, metrics) of one variant; `loss_inputs` = (old_logps, ref_logps, advantages, mask)."""
    if name == "linear_policy_loss":
        return linear_policy_loss(hidden, weight, labels, *loss_inputs, **LOSS_OPTIONS, chunk_size=chunk_size)
    if name == "seed":
        logps = seed_logps(hidden, weight, labels)
    elif name == "per_token_logps":
        logps = per_token_logps(hidden @ weight.t(), labels)
    else:
        logps = linear_logps(hidden, weight, labels)
    return policy_loss(logps, *loss_inputs, **LOSS_OPTIONS)


def make_inputs(args):
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.batch, args.length, args.hidden, generator=gen)
    # Scaled so the logits have a standard deviation near 3, peaked like a trained LM's.
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * (3.0 / args.hidden**0.5)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def make_loss_inputs(args, hidden, weight, labels):
    """Old and reference log-probs near the policy's own (ratios near 1, some clipped), advantages, full mask."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.inference_mode():
        logps = linear_logps(hidden, weight, labels)  # (B, T)
    old_logps = logps + 0.1 * torch.randn(logps.shape, generator=gen)
    ref_logps = logps + 0.1 * torch.randn(logps.shape, generator=gen)
    advantages = torch.randn(args.batch, generator=gen)
    mask = torch.ones(args.batch, args.length)
    return {"old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages, "mask": mask}


def loss_input_tuple(tensors: dict) -> tuple:
    return tuple(tensors[key] for key in ("old_logps", "ref_logps", "advantages", "mask"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status: peak RSS needs Linux")


def forward_backward(name, hidden, weight, labels, loss_inputs, chunk_size=None):
    hidden.grad = weight.grad = None
    loss, metrics = run_variant(name, hidden, weight, labels, loss_inputs, chunk_size)
    loss.backward()
    return {"loss": loss.detach(), **{f"metric/{key}": value for key, value in metrics.items()}}


def worker(args) -> dict:
    torch.manual_seed(args.seed)
    hidden, weight, labels = make_inputs(args)
    loss_inputs = loss_input_tuple(load_file(args.loss_inputs))
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    values = forward_backward(args.worker, hidden, weight, labels, loss_inputs, args.chunk_size)
    first_time = time.perf_counter() - start
    transient = peak_rss_bytes() - baseline - grad_bytes
    save_file({**values, "grad_hidden": hidden.grad, "grad_weight": weight.grad}, args.out)

    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        forward_backward(args.worker, hidden, weight, labels, loss_inputs, args.chunk_size)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": args.worker,
        "time_s": statistics.median(times) if times else first_time,
        "first_time_s": first_time,
        "times_s": times,
        "cpu_s": statistics.median(cpu_times) if cpu_times else math.nan,
        "transient_mb": transient / 1e6,
        "grad_mb": grad_bytes / 1e6,
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare(results_dir: Path, names) -> dict:
    reference = load_file(str(results_dir / "seed.safetensors"))
    agreement = {}
    for name in names:
        other = load_file(str(results_dir / f"{name}.safetensors"))
        agreement[name] = {key: max_abs_diff(reference[key], other[key]) for key in reference}
        del other
    return agreement


def summarize(results: dict) -> None:
    """Per variant: medians over rounds, and the median over rounds of its ratio to that round's seed run."""
    seed_rounds = results["seed"]["rounds"]
    for r in results.values():
        rounds = r["rounds"]
        r["time_s"] = statistics.median(run["time_s"] for run in rounds)
        r["transient_mb"] = statistics.median(run["transient_mb"] for run in rounds)
        r["grad_mb"] = rounds[0]["grad_mb"]
        r["cpu_s"] = statistics.median(run["cpu_s"] for run in rounds)
        r["cpu_vs_seed"] = statistics.median(
            run["cpu_s"] / seed_run["cpu_s"] for run, seed_run in zip(rounds, seed_rounds, strict=True))
        r["time_vs_seed"] = statistics.median(
            run["time_s"] / seed_run["time_s"] for run, seed_run in zip(rounds, seed_rounds, strict=True))
        r["memory_vs_seed"] = statistics.median(
            run["transient_mb"] / seed_run["transient_mb"] for run, seed_run in zip(rounds, seed_rounds, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8, one GRPO group)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=QWEN25_05B_HIDDEN, help="hidden size (Qwen2.5-0.5B: 896)")
    parser.add_argument("--vocab", type=int, default=QWEN25_VOCAB, help="vocabulary size (Qwen2.5: 151,936)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after the measured first run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run all variants this many times, interleaved, and compare each variant with the seed "
                             "run of the same round: on a shared machine the load drifts between variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, help="linear_policy_loss's tokens per tile (default: automatic)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--loss-inputs", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run (default: all; seed is always run, as the reference)")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    tokens = args.batch * args.length
    variants = ["seed"] + [name for name in VARIANTS[1:] if name in args.variants]
    print(f"GRPO loss from hidden states, forward + backward: {tokens} tokens (B={args.batch}, T={args.length}), "
          f"H={args.hidden}, V={args.vocab}, float32, {torch.get_num_threads()} threads", flush=True)
    results = {name: {"rounds": []} for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench_logprobs_") as tmp:
        loss_inputs = f"{tmp}/loss_inputs.safetensors"
        save_file(make_loss_inputs(args, *make_inputs(args)), loss_inputs)
        for round_index in range(args.rounds):
            for name in variants:
                cmd = [sys.executable, __file__, "--worker", name, "--out", f"{tmp}/{name}.safetensors",
                       "--loss-inputs", loss_inputs,
                       "--batch", str(args.batch), "--length", str(args.length), "--hidden", str(args.hidden),
                       "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--seed", str(args.seed)]
                if args.chunk_size is not None:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    print(f"variant {name} failed (exit {proc.returncode}); with too little memory, "
                          "lower --batch or --length", file=sys.stderr)
                    return 1
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                results[name]["rounds"].append(run)
                print(f"  round {round_index + 1}, {name}: {run['time_s']:.2f} s, {run['transient_mb']:.0f} MB",
                      flush=True)
        summarize(results)
        agreement = compare(Path(tmp), variants[1:])

    seed = results["seed"]
    print("\n| variant | time (s) | time vs seed | CPU time (s) | CPU time vs seed | transient memory (MB) | "
          "memory vs seed | max abs diff vs seed: loss / metrics / grad hidden / grad weight |")
    print("|---|---|---|---|---|---|---|---|")
    for name in variants:
        r = results[name]
        diff = agreement.get(name)
        diff_text = "-" if diff is None else " / ".join(
            f"{value:.1e}" for value in (diff["loss"], max(v for k, v in diff.items() if k.startswith("metric/")),
                                         diff["grad_hidden"], diff["grad_weight"]))
        print(f"| {name} | {r['time_s']:.2f} | {r['time_vs_seed']:.2f}x | {r['cpu_s']:.2f} | {r['cpu_vs_seed']:.2f}x | "
              f"{r['transient_mb']:.0f} | "
              f"{100 * r['memory_vs_seed']:.1f}% | {diff_text} |")
    print(f"\ngradients held by every variant (hidden + weight): {seed['grad_mb']:.0f} MB")
    targets = {"linear_logps": (15, 1.0), "linear_policy_loss": (10, 0.9)}  # memory % and time ratio vs seed
    for name, (memory_pct, time_ratio) in targets.items():
        if name in results:
            r = results[name]
            print(f"targets: {name} memory <= {memory_pct}% of seed: {100 * r['memory_vs_seed']:.1f}%; "
                  f"time <= {time_ratio}x seed: {r['time_vs_seed']:.2f}x (CPU time {r['cpu_vs_seed']:.2f}x)")
    report = {"config": vars(args) | {"json": None, "tokens": tokens, "threads": torch.get_num_threads()},
              "results": results, "max_abs_diff_vs_seed": agreement}
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
