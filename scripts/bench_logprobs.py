"""Benchmark: forward + backward of per-token log-probs at the Qwen2.5 vocabulary.

Three ways to get the log-prob of every completion token from final hidden states and the LM head:
  seed             full (B, T, V) logits, then a row-by-row log_softmax + gather (the public simple_GRPO project's way)
  per_token_logps  full logits, then stable_ops.per_token_logps (chunked, hand-written backward)
  linear_logps     stable_ops.linear_logps (fused LM head: the logits are never materialized)

Each variant runs in its own process, so its peak RSS is its own. Reported per variant:
  time_s        median wall time of one forward + backward over the timed repeats (after one untimed run)
  transient_mb  peak RSS during one forward + backward, minus the RSS before it (inputs allocated),
                minus the bytes of the gradients of hidden and weight, which every variant must hold
Values and gradients are compared with the seed variant's.

    python scripts/bench_logprobs.py                      # B=8, T=512 (4,096 tokens), H=896, V=151,936
    python scripts/bench_logprobs.py --batch 2 --length 1024 --json results.json
"""

from __future__ import annotations

import argparse
import json
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
from stable_ops import linear_logps, per_token_logps  # noqa: E402

VARIANTS = ("seed", "per_token_logps", "linear_logps")
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


def run_variant(name, hidden, weight, labels):
    if name == "seed":
        return seed_logps(hidden, weight, labels)
    if name == "per_token_logps":
        return per_token_logps(hidden @ weight.t(), labels)
    return linear_logps(hidden, weight, labels)


def make_inputs(args):
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.batch, args.length, args.hidden, generator=gen)
    # Scaled so the logits have a standard deviation near 3, peaked like a trained LM's.
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * (3.0 / args.hidden**0.5)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen)
    upstream = torch.randn(args.batch, args.length, generator=gen)  # d loss / d logps
    return hidden.requires_grad_(), weight.requires_grad_(), labels, upstream


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


def forward_backward(name, hidden, weight, labels, upstream):
    hidden.grad = weight.grad = None
    logps = run_variant(name, hidden, weight, labels)
    (logps * upstream).sum().backward()
    return logps.detach()


def worker(args) -> dict:
    torch.manual_seed(args.seed)
    hidden, weight, labels, upstream = make_inputs(args)
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    baseline = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    logps = forward_backward(args.worker, hidden, weight, labels, upstream)
    first_time = time.perf_counter() - start
    transient = peak_rss_bytes() - baseline - grad_bytes
    save_file({"logps": logps, "grad_hidden": hidden.grad, "grad_weight": weight.grad}, args.out)

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward_backward(args.worker, hidden, weight, labels, upstream)
        times.append(time.perf_counter() - start)
    return {
        "variant": args.worker,
        "time_s": statistics.median(times) if times else first_time,
        "first_time_s": first_time,
        "transient_mb": transient / 1e6,
        "grad_mb": grad_bytes / 1e6,
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare(results_dir: Path) -> dict:
    reference = load_file(str(results_dir / "seed.safetensors"))
    agreement = {}
    for name in VARIANTS[1:]:
        other = load_file(str(results_dir / f"{name}.safetensors"))
        agreement[name] = {key: max_abs_diff(reference[key], other[key]) for key in reference}
        del other
    return agreement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences (default 8, one GRPO group)")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=QWEN25_05B_HIDDEN, help="hidden size (Qwen2.5-0.5B: 896)")
    parser.add_argument("--vocab", type=int, default=QWEN25_VOCAB, help="vocabulary size (Qwen2.5: 151,936)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats after the measured first run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    tokens = args.batch * args.length
    print(f"per-token log-probs, forward + backward: {tokens} tokens (B={args.batch}, T={args.length}), "
          f"H={args.hidden}, V={args.vocab}, float32, {torch.get_num_threads()} threads", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_logprobs_") as tmp:
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", name, "--out", f"{tmp}/{name}.safetensors",
                   "--batch", str(args.batch), "--length", str(args.length), "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--seed", str(args.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                print(f"variant {name} failed (exit {proc.returncode}); with too little memory, "
                      "lower --batch or --length", file=sys.stderr)
                return 1
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {name}: {results[name]['time_s']:.2f} s, {results[name]['transient_mb']:.0f} MB", flush=True)
        agreement = compare(Path(tmp))

    seed = results["seed"]
    print("\n| variant | time (s) | time vs seed | transient memory (MB) | memory vs seed | "
          "max abs diff vs seed: logps / grad hidden / grad weight |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        r = results[name]
        diff = agreement.get(name)
        diff_text = "-" if diff is None else " / ".join(
            f"{diff[k]:.1e}" for k in ("logps", "grad_hidden", "grad_weight"))
        r["time_vs_seed"] = r["time_s"] / seed["time_s"]
        r["memory_vs_seed"] = r["transient_mb"] / seed["transient_mb"]
        print(f"| {name} | {r['time_s']:.2f} | {r['time_vs_seed']:.2f}x | {r['transient_mb']:.0f} | "
              f"{100 * r['memory_vs_seed']:.1f}% | {diff_text} |")
    fused = results["linear_logps"]
    print(f"\ngradients held by every variant (hidden + weight): {seed['grad_mb']:.0f} MB")
    print(f"targets: linear_logps memory <= 15% of seed: {100 * fused['memory_vs_seed']:.1f}%; "
          f"time <= 1.0x seed: {fused['time_vs_seed']:.2f}x")
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
