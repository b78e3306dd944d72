"""Benchmark the reference server: wire format speed, and reference log-prob throughput over HTTP.

(1) Wire format: encode + decode of one rollout batch (8 x 1,024 token ids, rewards, old and
    reference log-probs) with `grpo_split.contract.batch` against simple_GRPO's `torch.save` per tensor plus
    length-prefixed framing and `torch.load` (weights_only) on the way back.
(2) Throughput: tokens/s of reference log-probs through `POST /logps` of a real server process,
    with several concurrent clients, against calling the same model in-process
    (`grpo_split.modeling.frozen_logps`) on the same batches. The two are measured one after
    the other, never at the same time, so they do not share the CPU.

    python scripts/bench_ref_server.py        # random Qwen2 (H=256, 4 layers, V=151,936), 2 x 512 tokens a request
    python scripts/bench_ref_server.py --json out.json --requests 24 --clients 4
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from grpo_split.contract.batch import Batch, decode_batch, encode_batch  # noqa: E402
from grpo_split.contract.client import RefServerClient  # noqa: E402

QWEN25_VOCAB = 151_936


# ---- (1) wire format ------------------------------------------------------------------------


def seed_encode(tensors: list[torch.Tensor]) -> bytes:
    """simple_GRPO's framing (its ref_server.py): torch.save each tensor, then length-prefix and concatenate."""
    parts = []
    for t in tensors:
        buffer = io.BytesIO()
        torch.save(t, buffer)
        parts.append(buffer.getvalue())
    return b"".join(struct.pack("<Q", len(p)) + p for p in parts)


def seed_decode(data: bytes) -> list[torch.Tensor]:
    tensors, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        tensors.append(torch.load(io.BytesIO(data[offset : offset + length]), weights_only=True))
        offset += length
    return tensors


def rollout_batch(batch_size: int, prompt_length: int, completion_length: int, vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    length = prompt_length + completion_length
    return Batch(
        input_ids=torch.randint(0, vocab, (batch_size, length), generator=gen),
        prompt_length=prompt_length,
        attention_mask=torch.ones(batch_size, length, dtype=torch.int64),
        rewards=torch.rand(batch_size, generator=gen),
        old_logps=-torch.rand(batch_size, completion_length, generator=gen) * 5,
        ref_logps=-torch.rand(batch_size, completion_length, generator=gen) * 5,
        completion_mask=torch.ones(batch_size, completion_length, dtype=torch.int64),
        policy_version=3,
        num_generations=batch_size,
    )


def time_per_call(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_wire(repeats: int) -> dict:
    batch = rollout_batch(8, 256, 768, QWEN25_VOCAB)
    fields = [batch.input_ids, batch.attention_mask, batch.rewards, batch.old_logps, batch.ref_logps,
              batch.completion_mask, torch.tensor([batch.prompt_length])]
    ours_bytes = encode_batch(batch)
    seed_bytes = seed_encode(fields)
    roundtrip = decode_batch(ours_bytes, vocab_size=QWEN25_VOCAB)
    assert torch.equal(roundtrip.input_ids, batch.input_ids) and torch.equal(roundtrip.ref_logps, batch.ref_logps)
    ours = time_per_call(lambda: decode_batch(encode_batch(batch), vocab_size=QWEN25_VOCAB), repeats)
    seed = time_per_call(lambda: seed_decode(seed_encode(fields)), repeats)
    return {
        "batch": "8 x 1024 tokens: input_ids, attention_mask, rewards, old_logps, ref_logps, completion_mask",
        "wire_ms": ours * 1e3,
        "seed_torch_save_ms": seed * 1e3,
        "speedup": seed / ours,
        "wire_bytes": len(ours_bytes),
        "seed_bytes": len(seed_bytes),
    }


# ---- (2) HTTP throughput --------------------------------------------------------------------


def build_model(out_dir: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)


def request_batches(count: int, batch_size: int, prompt_length: int, completion_length: int, vocab: int):
    gen = torch.Generator().manual_seed(1)
    length = prompt_length + completion_length
    return [Batch(input_ids=torch.randint(0, vocab, (batch_size, length), generator=gen), prompt_length=prompt_length)
            for _ in range(count)]


def bench_in_process(model_dir: Path, batches: list[Batch], max_batch_tokens: int) -> float:
    from grpo_split.modeling import frozen_logps, load_frozen_model

    model = load_frozen_model(str(model_dir), torch.device("cpu"), torch.float32)
    frozen_logps(model, batches[0].input_ids, None, batches[0].prompt_length, max_batch_tokens=max_batch_tokens)
    start = time.perf_counter()
    for b in batches:
        frozen_logps(model, b.input_ids, None, b.prompt_length, max_batch_tokens=max_batch_tokens)
    elapsed = time.perf_counter() - start
    return sum(b.input_ids.numel() for b in batches) / elapsed


def bench_http(model_dir: Path, batches: list[Batch], clients: int, max_batch_tokens: int) -> float:
    cmd = [sys.executable, str(REPO / "ref_server.py"), "--model_name_or_path", str(model_dir), "--port", "0",
           "--device", "cpu", "--dtype", "float32", "--max_batch_tokens", str(max_batch_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in proc.stdout:
            if "ready at " in line:
                url = line.split("ready at ")[1].split()[0]
                break
        if url is None:
            raise RuntimeError(f"ref_server exited with {proc.wait()} before it was ready")
        with RefServerClient(url) as warm:
            warm.logps(batches[0])
        pending = list(batches)
        lock = threading.Lock()

        def client_loop():
            with RefServerClient(url) as c:
                while True:
                    with lock:
                        if not pending:
                            return
                        b = pending.pop()
                    c.logps(b)

        threads = [threading.Thread(target=client_loop) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        return sum(b.input_ids.numel() for b in batches) / elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=QWEN25_VOCAB)
    parser.add_argument("--requests", type=int, default=16, help="requests in the throughput test")
    parser.add_argument("--batch_size", type=int, default=2, help="sequences per request")
    parser.add_argument("--prompt_length", type=int, default=128)
    parser.add_argument("--completion_length", type=int, default=384)
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--max_batch_tokens", type=int, default=4096)
    parser.add_argument("--wire_repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    print(f"(1) wire format, {args.wire_repeats} encode+decode round trips", flush=True)
    wire = bench_wire(args.wire_repeats)
    print(f"    grpo-batch/1: {wire['wire_ms']:.2f} ms ({wire['wire_bytes'] / 1e6:.2f} MB)   "
          f"torch.save framing: {wire['seed_torch_save_ms']:.2f} ms ({wire['seed_bytes'] / 1e6:.2f} MB)   "
          f"speed-up {wire['speedup']:.1f}x (target >= 3x)", flush=True)

    print(f"(2) reference log-probs: random Qwen2 H={args.hidden}, {args.layers} layers, V={args.vocab}; "
          f"{args.requests} requests of {args.batch_size} x {args.prompt_length + args.completion_length} tokens",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_ref_server_") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, args.hidden, args.layers, args.vocab)
        batches = request_batches(args.requests, args.batch_size, args.prompt_length, args.completion_length,
                                  args.vocab)
        in_process = bench_in_process(model_dir, batches, args.max_batch_tokens)
        print(f"    in-process: {in_process:.0f} tokens/s", flush=True)
        http = bench_http(model_dir, batches, args.clients, args.max_batch_tokens)
        print(f"    HTTP /logps, {args.clients} clients: {http:.0f} tokens/s   ratio {http / in_process:.2f}x "
              "(target >= 0.9x)", flush=True)

    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "threads": torch.get_num_threads(), "wire": wire,
              "throughput": {"in_process_tokens_per_s": in_process, "http_tokens_per_s": http,
                             "ratio": http / in_process}}
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
