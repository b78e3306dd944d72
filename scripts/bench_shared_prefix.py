"""Benchmark forwarding each group's prompt once (`grpo_split.modeling.prefix_plan`) against forwarding
it once per row, at a GSM8K-like shape: 8 prompts of about 130 tokens, G = 8 completions of about 150.

    python scripts/bench_shared_prefix.py                 # random Qwen2: H=512, 8 layers, V=4,096, float32 CPU
    python scripts/bench_shared_prefix.py --json out.json --repeats 3

For each of (a) `completion_logps` forward + backward (the policy update), (b) `frozen_logps` (old and
reference log-probs) and (c) `sample_completions` (generation, and its prefill alone), it prints the
tokens forwarded through the model (rows x positions of every forward, padding included: what the
model computes) and the wall time, shared and plain, measured one after the other on the same
batch. (a) and (b) also print the largest log-prob difference between the two, which is rounding.
The model is built here from transformers' Qwen2Config with random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from grpo_split.modeling import (  # noqa: E402
    UNSHARED,
    completion_logps,
    frozen_logps,
    lm_head_plan,
    prefix_plan,
    shared_prefix_cache,
)
from grpo_split.rollouts.sampling import SamplingSettings, sample_completions  # noqa: E402

PAD, EOS = 0, 1


def build_model(hidden: int, layers: int, vocab: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    lm_head_plan(model)  # both plans, as at load
    return model


def make_batch(prompts: int, group: int, prompt_length: int, completion_length: int, vocab: int, seed: int):
    """(B * G, P + C) ids and mask: prompts of 75-100% of P real tokens left-padded to P, each repeated
    G times, completions of 66-100% of C tokens right-padded; and the (B, P) prompts alone."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.full((prompts, prompt_length), PAD)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i in range(prompts):
        real = int(torch.randint(prompt_length * 3 // 4, prompt_length + 1, (), generator=gen))
        prompt_ids[i, prompt_length - real :] = torch.randint(2, vocab, (real,), generator=gen)
        prompt_mask[i, prompt_length - real :] = 1
    rows = prompts * group
    completion_ids = torch.randint(2, vocab, (rows, completion_length), generator=gen)
    lengths = torch.randint(completion_length * 2 // 3, completion_length + 1, (rows, 1), generator=gen)
    completion_mask = (torch.arange(completion_length) < lengths).long()  # (N, C)
    completion_ids = completion_ids * completion_mask + PAD * (1 - completion_mask)
    ids = torch.cat([prompt_ids.repeat_interleave(group, dim=0), completion_ids], dim=1)  # (N, P + C)
    mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), completion_mask], dim=1)
    return ids, mask, prompt_ids, prompt_mask


class TokenCounter:
    """Rows x positions of every forward through the model's input embedding, while active."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __enter__(self):
        self.handle = self.model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: self.shapes.append(tuple(args[0].shape)))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def tokens(self, shapes=None) -> int:
        return sum(rows * length for rows, length in (self.shapes if shapes is None else shapes))


def timed(calls: dict, repeats: int) -> dict:
    """{name: (best wall seconds over `repeats`, tokens one call forwards, the call's result)}; the calls
    take turns, so a slower or busier stretch of the (shared) machine does not fall on one of them only."""
    results = {name: (float("inf"), 0, None) for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            with TokenCounter(call.model) as counter:
                start = time.perf_counter()
                result = call()
                seconds = time.perf_counter() - start
            results[name] = (min(results[name][0], seconds), counter.tokens(), result)
    return results


class Call:
    def __init__(self, model, fn):
        self.model, self.fn = model, fn

    def __call__(self):
        return self.fn()


def bench_update(model, ids, mask, prompt_length, temperature, repeats):
    """(a) completion_logps forward + backward of a masked sum, as the policy update runs it."""
    completion_mask = mask[:, prompt_length:]

    def step(prefix):
        def run():
            model.zero_grad(set_to_none=True)
            out = completion_logps(model, ids, mask, prompt_length, temperature, prefix=prefix)
            ((out * completion_mask).sum() / completion_mask.sum()).backward()
            return out.detach()
        return Call(model, run)

    model.train().requires_grad_(True)
    try:
        return timed({"shared": step(None), "plain": step(UNSHARED)}, repeats)
    finally:
        model.eval().requires_grad_(False)
        model.zero_grad(set_to_none=True)


def bench_frozen(model, ids, mask, prompt_length, temperature, repeats):
    """(b) frozen_logps, the old and reference log-probs. The batch is one micro-batch of it, so the plain
    run is frozen_logps's own computation with `prefix=UNSHARED` (which frozen_logps does not take)."""
    def run(prefix):
        def call():
            if prefix is None:
                return frozen_logps(model, ids, mask, prompt_length, temperature)
            with torch.inference_mode():
                return completion_logps(model, ids, mask, prompt_length, temperature, prefix=prefix).float()
        return Call(model, call)

    return timed({"shared": run(None), "plain": run(UNSHARED)}, repeats)


def bench_generation(model, prompt_ids, prompt_mask, settings, repeats):
    """(c) sample_completions with the same seed each way, and the prefill alone (up to the first sampled token)."""
    def sample(prefix):
        def call():
            torch.manual_seed(0)
            return sample_completions(model, prompt_ids, prompt_mask, settings, [EOS], PAD, prefix=prefix)
        return Call(model, call)

    G = settings.num_generations
    ids, mask = prompt_ids.repeat_interleave(G, dim=0), prompt_mask.repeat_interleave(G, dim=0)  # (B * G, P)

    def prefill(prefix):
        @torch.no_grad()
        def call():
            shared = shared_prefix_cache(model, ids, mask, ids.shape[1] - 1, prefix)
            if shared is None:
                return model(input_ids=ids, attention_mask=mask, use_cache=True).logits[:, -1]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], use_cache=True,
                         **shared).logits[:, -1]
        return Call(model, call)

    return timed({"shared": sample(None), "plain": sample(UNSHARED), "shared prefill": prefill(None),
                  "plain prefill": prefill(UNSHARED)}, repeats)


def warm_up(model, args):
    """Every path once on a small batch: first calls (kernels, allocator, generate's set-up) cost extra."""
    ids, mask, prompt_ids, prompt_mask = make_batch(2, 2, 8, 4, args.vocab, args.seed + 1)
    bench_update(model, ids, mask, 8, args.temperature, 1)
    bench_frozen(model, ids, mask, 8, args.temperature, 1)
    bench_generation(model, prompt_ids, prompt_mask, SamplingSettings(2, 4, args.temperature, 1.0), 1)


def report(title, results, check=None) -> dict:
    shared, plain = results["shared"], results["plain"]
    line = (f"{title:<34} tokens {plain[1]:>7,} -> {shared[1]:>7,} ({shared[1] / plain[1]:.0%})   "
            f"wall {plain[0]:7.2f} s -> {shared[0]:7.2f} s ({plain[0] / shared[0]:.2f}x)")
    if check is not None:
        line += f"   {check}"
    print(line, flush=True)
    return {"tokens_plain": plain[1], "tokens_shared": shared[1], "seconds_plain": plain[0],
            "seconds_shared": shared[0]}


def logps_difference(results, completion_mask) -> str:
    attended = completion_mask.bool()
    difference = (results["shared"][2][attended] - results["plain"][2][attended]).abs().max().item()
    return f"max |shared - plain| log-prob {difference:.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    parser.add_argument("--prompt_length", type=int, default=130)
    parser.add_argument("--completion_length", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timings each")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on a 2-core machine shared with other processes, "
                             "two OpenMP threads ran the forward 10x slower than one (measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = build_model(args.hidden, args.layers, args.vocab, args.seed)
    ids, mask, prompt_ids, prompt_mask = make_batch(args.prompts, args.group, args.prompt_length,
                                                    args.completion_length, args.vocab, args.seed)
    P = args.prompt_length
    print(f"random Qwen2 H={args.hidden}, {args.layers} layers, V={args.vocab}, float32 on {torch.get_num_threads()} "
          f"CPU threads; {args.prompts} prompts x G={args.group}, P={P}, C={args.completion_length}, "
          f"{int(mask[:, :P].sum())} real prompt and {int(mask[:, P:].sum())} completion tokens", flush=True)
    print(f"prompt sharing: {prefix_plan(model).reason}", flush=True)
    print("plain -> shared:", flush=True)
    warm_up(model, args)

    figures = {}
    update = bench_update(model, ids, mask, P, args.temperature, args.repeats)
    figures["update"] = report("(a) completion_logps fwd + bwd", update, logps_difference(update, mask[:, P:]))
    frozen = bench_frozen(model, ids, mask, P, args.temperature, args.repeats)
    figures["frozen"] = report("(b) frozen_logps", frozen, logps_difference(frozen, mask[:, P:]))
    settings = SamplingSettings(num_generations=args.group, max_completion_length=args.completion_length,
                                temperature=args.temperature, top_p=1.0)
    generation = bench_generation(model, prompt_ids, prompt_mask, settings, args.repeats)
    same = torch.equal(generation["shared"][2], generation["plain"][2])
    figures["generation"] = report("(c) sample_completions", generation, f"same tokens from the same seed: {same}")
    prefill = {"shared": generation["shared prefill"], "plain": generation["plain prefill"]}
    figures["prefill"] = report("    its prefill (to the 1st token)", prefill)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=2))


if __name__ == "__main__":
    main()
