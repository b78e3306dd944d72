"""One step equals one whole batch: the trainer's parameter update, at any configuration, against
the update computed from the same rollouts as one batch in a single float64 process.

    python scripts/check_update_invariance.py                 # a covering set of the matrix
    python scripts/check_update_invariance.py --subset ci     # the representative subset CI runs
    python scripts/check_update_invariance.py --list          # print the cases and exit

The matrix: ZeRO stage (2, 3) x optimizer offload (off, on) x gradient accumulation (1, 2, 4) x
ranks (1, 2; DeepSpeed's CPU accelerator with gloo) x loss_type (grpo, bnpo, dr_grpo, dapo) x
importance_sampling_level (token, sequence) x beta (0, 0.1) x num_iterations (1, 2) x rollout
source (local, worker-fed through the server queue's contract). The covering set holds every
pair of values of any two settings at least once (greedy pairwise selection, deterministic).

How a case runs: `deepspeed --num_gpus R` starts this script on R ranks; each rank builds the
engine exactly as the trainer does (`grpo_ref_split.build_engine`), takes its share of one fixed
whole-step batch the way the trainer's rollout source gives it (local: its consecutive groups;
worker-fed: rank 0 leases the whole batch through `ServerRollouts` and every rank gets its share
over the wire format), and runs `train_on_batch`. The optimizer is plain SGD without clipping, so
the update is exactly -learning_rate x the step's gradient (Adam's first step is about
-lr x sign(gradient), which would hide a gradient scaled by any factor). The reference loads the
same weights in float64, computes per-token log-probs from the model's full logits, the loss of
the whole batch (bnpo: TRL's per-micro-batch normalization, averaged over the micro-batches of
every rank), and applies the same SGD step(s).

Tolerance: max |update - reference| <= TOLERANCE x max |reference|. The trainer runs in float32:
its log-probs, loss and gradient carry float32 rounding (about 1e-7 relative per operation,
accumulated over the forward and backward of a 2-layer model) and its weights are rounded to
float32 after the step; measured errors are at most 1.6e-5 on every case. Any of the bugs this
catches (a micro-batch's gradient lost or unscaled, the wrong advantages, temperature or old
log-probs) changes the update by far more than 1e-2.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the trainer is a top-level script, not a package module

TOLERANCE = 1e-4
LEARNING_RATE = 0.5  # large, so the update stands far above float32 rounding of the weights
PROMPTS, GENERATIONS, MAX_PROMPT, MAX_COMPLETION = 4, 4, 6, 7
TEMPERATURE = 0.7  # not 1: a log-prob computed at the wrong temperature must show

FACTORS = {
    "zero": (2, 3),
    "offload": (False, True),
    "ga": (1, 2, 4),
    "ranks": (1, 2),
    "loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"),
    "level": ("token", "sequence"),
    "beta": (0.0, 0.1),
    "num_iterations": (1, 2),
    "source": ("local", "server"),
}


@dataclass(frozen=True)
class Case:
    zero: int
    offload: bool  # optimizer state and step on the CPU (ZeRO-Offload)
    ga: int
    ranks: int
    loss_type: str
    level: str
    beta: float
    num_iterations: int
    source: str

    @property
    def name(self) -> str:
        offload = "-offload" if self.offload else ""
        return (f"zero{self.zero}{offload}-ga{self.ga}-ranks{self.ranks}-{self.loss_type}-{self.level}-"
                f"beta{self.beta:g}-iter{self.num_iterations}-{self.source}")


# A representative subset for CI: ZeRO-3 with GA 2 on 2 ranks (where the update was once the last
# micro-batch's alone) with the trainer's own old log-probs (a no-grad pass through the engine
# first), the worker-fed path, optimizer offload on both stages, and every loss type once.
CI_SUBSET = (
    Case(3, False, 2, 2, "grpo", "token", 0.1, 2, "local"),
    Case(3, True, 4, 2, "bnpo", "sequence", 0.0, 2, "server"),
    Case(2, False, 2, 2, "dapo", "token", 0.1, 2, "server"),
    Case(2, True, 1, 2, "dr_grpo", "token", 0.0, 1, "local"),
)


def pairwise_cases() -> list[Case]:
    """A small set of cases that holds every pair of values of any two factors (greedy, deterministic)."""
    pairs_of_factors = list(itertools.combinations(FACTORS, 2))

    def pairs(candidate: dict) -> set:
        return {((a, candidate[a]), (b, candidate[b])) for a, b in pairs_of_factors}

    uncovered = {((a, va), (b, vb)) for a, b in pairs_of_factors for va in FACTORS[a] for vb in FACTORS[b]}
    candidates = [dict(zip(FACTORS, values, strict=True)) for values in itertools.product(*FACTORS.values())]
    chosen: list[Case] = []
    while uncovered:
        best = max(candidates, key=lambda candidate: len(pairs(candidate) & uncovered))
        uncovered -= pairs(best)
        chosen.append(Case(**best))
    return chosen


# ----------------------------------------------------------------------------------- the inputs


def build_model(out_dir: Path) -> Path:
    """A tiny Qwen2 with tied embeddings (the fused head then trains the embedding matrix too)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def naive_logps(model, batch) -> torch.Tensor:
    """(B, C) completion log-probs from the model's full logits in its own dtype (float64 here)."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    P = batch.prompt_length
    logps = torch.log_softmax(logits[:, P - 1 : -1] / batch.temperature, dim=-1)
    return logps.gather(-1, batch.input_ids[:, P:, None]).squeeze(-1)


def make_step_batch(model_dir: Path, seed: int = 0):
    """One whole step of rollouts: PROMPTS groups of GENERATIONS, prompts of varied length (left
    padded), completions of varied length (right padded), rewards with spread, old log-probs (a
    worker's, a little off the policy's) and reference log-probs (off the policy's)."""
    from transformers import AutoModelForCausalLM

    from grpo_split.contract.batch import Batch
    from stable_ops import group_advantages

    g = torch.Generator().manual_seed(seed)
    rows = PROMPTS * GENERATIONS
    ids = torch.zeros(rows, MAX_PROMPT + MAX_COMPLETION, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for p in range(PROMPTS):
        length = 3 + p % (MAX_PROMPT - 2)
        prompt = torch.randint(1, 64, (length,), generator=g)
        for j in range(GENERATIONS):
            r = p * GENERATIONS + j
            ids[r, MAX_PROMPT - length : MAX_PROMPT] = prompt
            mask[r, MAX_PROMPT - length : MAX_PROMPT] = 1
            n = 1 + int(torch.randint(0, MAX_COMPLETION, (1,), generator=g))
            ids[r, MAX_PROMPT : MAX_PROMPT + n] = torch.randint(1, 64, (n,), generator=g)
            mask[r, MAX_PROMPT : MAX_PROMPT + n] = 1
    rewards = torch.rand(rows, generator=g) * 2
    batch = Batch(input_ids=ids, prompt_length=MAX_PROMPT, attention_mask=mask, rewards=rewards,
                  advantages=group_advantages(rewards, GENERATIONS), completion_mask=mask[:, MAX_PROMPT:].clone(),
                  policy_version=0, num_generations=GENERATIONS, temperature=TEMPERATURE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        logps = naive_logps(model, batch).float()
    completion = batch.completion_mask.bool()
    # Off by up to +-0.3 nats: some ratios leave the clip range [0.8, 1.2], some stay inside.
    batch.old_logps = torch.where(completion, logps + 0.3 * (2 * torch.rand(logps.shape, generator=g) - 1), 0.0)
    batch.ref_logps = torch.where(completion, logps + 0.5 * torch.randn(logps.shape, generator=g), 0.0)
    return batch


def deepspeed_json(case: Case, directory: Path) -> Path:
    """The repository's ZeRO config of the case's stage, with the optimizer offloaded to the CPU if asked."""
    config = json.loads((REPO / "configs" / f"ds_zero{case.zero}.json").read_text())
    if case.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    path = directory / f"ds_zero{case.zero}{'_offload' if case.offload else ''}.json"
    path.write_text(json.dumps(config))
    return path


def run_config(case: Case, model_dir: Path):
    from grpo_split.config.trainer import (
        DataConfig,
        LossConfig,
        ModelConfig,
        RolloutConfig,
        RunConfig,
        ServerLinkConfig,
        TrainingConfig,
    )

    return RunConfig(
        model=ModelConfig(model_name_or_path=str(model_dir), dtype="float32"),
        data=DataConfig(),
        rollout=RolloutConfig(num_generations=GENERATIONS, prompts_per_step=PROMPTS,
                              max_completion_length=MAX_COMPLETION, temperature=TEMPERATURE),
        loss=LossConfig(beta=case.beta, loss_type=case.loss_type, num_iterations=case.num_iterations,
                        importance_sampling_level=case.level),
        training=TrainingConfig(learning_rate=LEARNING_RATE, optim="sgd", max_grad_norm=0.0, max_steps=1,
                                gradient_accumulation_steps=case.ga,
                                deepspeed=str(deepspeed_json(case, model_dir.parent))),
        server=ServerLinkConfig(rollout_source=case.source, max_staleness=1),
    )


def case_inputs(case: Case, whole):
    """The whole-step batch as this case's rollout source delivers it: local rollouts carry no old
    log-probs (on-policy; the trainer computes them itself when num_iterations > 1), worker batches do."""
    batch = dataclasses.replace(whole)
    if case.source == "local":
        batch.old_logps = None
    if case.beta == 0:
        batch.ref_logps = None
    return batch


# ----------------------------------------------------------------------------------- the trainer's side


class _QueueOfOne:
    """Stands in for the server client on rank 0: the queue holds this one whole-step batch."""

    def __init__(self, payload: bytes):
        self.payload: bytes | None = payload
        self.acked: list[str] = []
        self.dead_letters: list[str] = []  # the reasons

    def get(self, lease_seconds: float):
        from grpo_split.contract.batch import decode_batch

        if self.payload is None:
            return None
        batch = decode_batch(self.payload)
        batch.batch_id, batch.lease = "b1", "lease-1"
        return batch

    def ack(self, batch_id: str, lease: str) -> None:
        self.acked.append(batch_id)

    def dead_letter(self, batch_id: str, lease: str, reason: str) -> None:
        self.dead_letters.append(reason)
        self.payload = None


def trainer_update(case: Case, model_dir: Path, whole, rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    """Run one trainer step of `case` on this rank; the full weights after it on rank 0 (None elsewhere)."""
    from grpo_split.contract.batch import encode_batch
    from grpo_split.modeling import load_causal_lm
    from grpo_split.rollouts.sources import ServerRollouts, rank_share
    from grpo_split.training.checkpoint import policy_state_dict
    from grpo_split.training.engine import build_engine
    from grpo_split.training.update import train_on_batch

    config = run_config(case, model_dir)
    torch.manual_seed(0)
    model = load_causal_lm(str(model_dir), torch.float32)
    engine = build_engine(config, model, world_size, torch.float32)
    engine.train()
    batch = case_inputs(case, whole)
    if case.source == "server":
        queue = _QueueOfOne(encode_batch(batch)) if rank == 0 else None
        share = ServerRollouts(config, queue, rank, world_size, eos_ids=[0]).next_batch(policy_version=0)
    else:
        share = rank_share(batch, rank, world_size)
    train_on_batch(engine, share, config, world_size)
    state = policy_state_dict(engine)
    if state is None:
        state = engine.module.policy.state_dict()
    return {k: v.detach().clone().float() for k, v in state.items()} if rank == 0 else None


# ----------------------------------------------------------------------------------- the reference


def reference_update(case: Case, model_dir: Path, whole) -> dict[str, torch.Tensor]:
    """The same step as one whole batch in float64: weights after `num_iterations` SGD updates."""
    from transformers import AutoModelForCausalLM

    from stable_ops import policy_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    batch = case_inputs(case, whole)
    mask = batch.completion_mask.double()
    ref = None if batch.ref_logps is None else batch.ref_logps.double()
    old = None if batch.old_logps is None else batch.old_logps.double()
    if old is None and case.num_iterations > 1:
        with torch.no_grad():
            old = naive_logps(model, batch)  # the sampling policy's, frozen for every pass
    micro_batches = case.ranks * case.ga
    for _ in range(case.num_iterations):
        model.zero_grad()
        logps = naive_logps(model, batch)

        def loss_of(rows: slice, logps=logps) -> torch.Tensor:
            return policy_loss(logps[rows], None if old is None else old[rows], None if ref is None else ref[rows],
                               batch.advantages[rows].double(), mask[rows], beta=case.beta,
                               loss_type=case.loss_type, max_completion_length=MAX_COMPLETION,
                               importance_sampling_level=case.level)[0]

        if case.loss_type == "bnpo":  # TRL's definition: normalized per micro-batch, micro-batches averaged
            size = batch.batch_size // micro_batches
            loss = sum(loss_of(slice(i * size, (i + 1) * size)) for i in range(micro_batches)) / micro_batches
        else:
            loss = loss_of(slice(None))
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= LEARNING_RATE * param.grad
    return {name: p.detach() for name, p in model.named_parameters()}


def compare(case: Case, model_dir: Path, ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max |our update - reference update| / max |reference update| over every parameter."""
    from safetensors.torch import load_file

    initial = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    errors, scale = 0.0, 0.0
    for name, after in reference.items():
        start = initial[name] if name in initial else initial["model.embed_tokens.weight"]  # tied head
        expected = after - start
        actual = ours[name].double() - start
        errors = max(errors, (actual - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
    return errors / scale


# ----------------------------------------------------------------------------------- driver


def rank_worker(workdir: Path) -> None:
    """Entry point under the deepspeed launcher: every case of this world size, weights to workdir."""
    from safetensors.torch import save_file

    from grpo_split.contract.batch import decode_batch
    from grpo_split.training import distributed as dist_utils

    rank, world_size, _ = dist_utils.init_distributed()
    spec = json.loads((workdir / "cases.json").read_text())
    whole = decode_batch((workdir / "batch.bin").read_bytes())
    for fields in spec:
        case = Case(**fields)
        if case.ranks != world_size:
            continue
        weights = trainer_update(case, workdir / "model", whole, rank, world_size)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(workdir / f"{case.name}.safetensors"))
        dist_utils.barrier()
    dist_utils.shutdown()


def launch(workdir: Path, world_size: int, timeout: float) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    done = subprocess.run([deepspeed, "--num_gpus", str(world_size), "--master_port", str(port), __file__,
                           "--rank_worker", str(workdir)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the {world_size}-rank run failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n"
                           f"{done.stderr[-4000:]}")


def check_cases(cases: list[Case], workdir: Path, timeout: float = 900) -> list[tuple[Case, float]]:
    """Run every case (one launcher per world size) and return each with its relative error."""
    from grpo_split.contract.batch import decode_batch, encode_batch

    model_dir = build_model(workdir / "model")
    (workdir / "batch.bin").write_bytes(encode_batch(make_step_batch(model_dir)))
    (workdir / "cases.json").write_text(json.dumps([dataclasses.asdict(c) for c in cases]))
    for world_size in sorted({c.ranks for c in cases}):
        launch(workdir, world_size, timeout)
    from safetensors.torch import load_file

    whole = decode_batch((workdir / "batch.bin").read_bytes())
    results = []
    for case in cases:
        ours = load_file(str(workdir / f"{case.name}.safetensors"))
        results.append((case, compare(case, model_dir, ours, reference_update(case, model_dir, whole))))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("pairwise", "ci"), default="pairwise")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--rank_worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    if args.rank_worker is not None:
        rank_worker(args.rank_worker)
        return 0
    cases = list(CI_SUBSET) if args.subset == "ci" else pairwise_cases()
    if args.list:
        print("\n".join(case.name for case in cases))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = check_cases(cases, Path(tmp))
    failed = 0
    for case, error in results:
        ok = error <= TOLERANCE
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case.name:60s} max rel. error {error:.2e}")
    print(f"{len(results) - failed} passed, {failed} failed (tolerance {TOLERANCE:g} of the largest update)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
