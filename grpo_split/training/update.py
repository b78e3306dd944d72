"""One training step's update: `num_iterations` optimizer passes of the GRPO loss over a rank's batch,
split into gradient-accumulation micro-batches, with non-finite losses skipped on every rank.

`train_on_batch` needs only this of its engine (DeepSpeed's, or `training.engine.TorchEngine`):
`engine(input_ids, attention_mask, prompt_length, temperature)` -> (b, C) completion log-probs;
`backward(loss)` (scales by the accumulation steps); `step()` (updates at the accumulation
boundary, then steps the LR schedule); `optimizer.param_groups`; `get_global_grad_norm()`;
`train()` / `eval()`; `device`.
"""

from __future__ import annotations

import math
import sys

import torch

from grpo_split.config.trainer import RunConfig
from grpo_split.contract.batch import Batch
from grpo_split.training import distributed as dist_utils


def zero_loss(engine, batch: Batch) -> torch.Tensor:
    """A loss of exactly 0 whose backward visits every parameter (2 tokens through the model).

    Stands in for a micro-batch whose loss was not finite: DeepSpeed's gradient-accumulation
    bookkeeping needs a forward, a backward and a step per micro-batch on every rank, and this one
    adds a zero gradient instead of NaN.
    """
    ids = batch.input_ids[:1, :2].to(engine.device)
    return engine(ids, torch.ones_like(ids), 1, 1.0).float().sum() * 0.0


def micro_batch_rows(batch: Batch, num_micro_batches: int, loss_type: str) -> list[torch.Tensor]:
    """Row indices of each gradient-accumulation micro-batch, equal in size.

    With several micro-batches, whole groups are ordered by their longest sequence first, so each
    micro-batch holds sequences of similar length and `trim_padding` can cut more columns. Any
    equal-size split gives the same update for grpo, dr_grpo and dapo (each row's weight does not
    depend on its micro-batch's other rows); bnpo normalizes by each micro-batch's own token count
    (TRL's definition), so there the rows keep their order.
    """
    rows = batch.batch_size // num_micro_batches
    order = torch.arange(batch.batch_size)
    G = batch.num_generations
    if num_micro_batches > 1 and loss_type != "bnpo" and G and batch.batch_size % G == 0:
        lengths = batch.attention_mask.sum(1).view(-1, G).amax(1)  # (groups,) longest sequence per group
        groups = torch.sort(lengths, stable=True).indices  # (groups,)
        order = (groups[:, None] * G + torch.arange(G)).reshape(-1)  # (N,) rows, groups kept whole
    return [order[m * rows : (m + 1) * rows] for m in range(num_micro_batches)]


def trim_padding(batch: Batch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """`rows` of the batch without the columns that are padding in every one of them: left padding of
    the prompts and the completions' right padding past the longest. Returns (input_ids, attention_mask,
    prompt_length, completion_length) of the trimmed (b, P' + C') block. The log-probs of the kept
    completion tokens are those of the untrimmed rows: positions count from the mask, and padded
    positions were masked out of attention anyway."""
    attend = batch.attention_mask[rows]  # (b, P + C)
    P = batch.prompt_length
    used = attend.bool().any(0)  # (P + C,)
    first = int(used[:P].nonzero()[0]) if used[:P].any() else P - 1
    first = min(first, P - 1)  # at least one prompt column: it predicts the first completion token
    completion_used = used[P:].nonzero()
    C = int(completion_used[-1]) + 1 if len(completion_used) else 1
    return batch.input_ids[rows, first : P + C], attend[:, first : P + C], P - first, C


def engine_logps(engine, batch: Batch, rows: torch.Tensor, grad: bool) -> torch.Tensor:
    """(b, C') float32 completion log-probs of `batch`'s `rows` through the engine's forward, over the
    trimmed completion columns (see `trim_padding`)."""
    device = engine.device
    input_ids, attention_mask, prompt_length, _ = trim_padding(batch, rows)
    with torch.set_grad_enabled(grad):
        return engine(input_ids.to(device), attention_mask.to(device), prompt_length, batch.temperature).float()


def padding_fraction(batch: Batch, parts: list[torch.Tensor]) -> float:
    """Share of the positions the update's micro-batches compute that are padding (after trimming)."""
    computed = real = 0
    for rows in parts:
        _, attention_mask, _, _ = trim_padding(batch, rows)
        computed += attention_mask.numel()
        real += int(attention_mask.sum())
    return 1.0 - real / max(computed, 1)


def train_on_batch(engine, batch: Batch, config: RunConfig, world_size: int, reference=None) -> dict:
    """`num_iterations` optimizer updates on one batch; returns this rank's loss metrics (means), with
    `weights` (what each mean weighs when ranks are combined), `grad_norm`, `learning_rate`,
    `nonfinite_updates` and `padding_fraction`.

    The batch is split into `gradient_accumulation_steps` micro-batches (`micro_batch_rows`); the
    engine divides each micro-batch loss by that number and steps the optimizer at the last one.
    `reference` (a `training.reference.PendingReference`): the reference log-probs still on their way;
    they are waited for where the first loss needs them, and stored in `batch.ref_logps`.
    """
    loss_cfg = config.loss
    GA = config.training.gradient_accumulation_steps
    parts = micro_batch_rows(batch, GA, loss_cfg.loss_type)
    old_logps = batch.old_logps
    if old_logps is None and loss_cfg.num_iterations > 1:
        # The sampling policy's log-probs, frozen for all passes (TRL's mu > 1): forwards, no graph.
        engine.eval()
        old_logps = torch.zeros(batch.completion_mask.shape)  # (N, C); trimmed columns stay 0 (masked)
        for part in parts:
            logps = engine_logps(engine, batch, part, grad=False).cpu()  # (b, C')
            old_logps[part, : logps.shape[1]] = logps
        engine.train()

    def ref_logps() -> torch.Tensor | None:
        if batch.ref_logps is None and reference is not None:
            batch.ref_logps = reference.result()  # (N, C)
        return batch.ref_logps
    # DAPO normalizes by the tokens of the whole step on all ranks; the engine averages ranks and
    # micro-batches, so each micro-batch divides by (global tokens / (ranks x GA)).
    global_tokens = dist_utils.all_reduce_sum([float(batch.completion_mask.sum())])[0]
    num_items = max(global_tokens, 1.0) / (world_size * GA)

    totals = StepTotals(per_sequence=loss_cfg.importance_sampling_level == "sequence")
    nonfinite, grad_norms, learning_rate = 0, [], math.nan
    for _ in range(loss_cfg.num_iterations):
        poisoned = False
        for m, part in enumerate(parts):
            if not poisoned:
                loss, metrics = micro_batch_loss(engine, batch, part, old_logps, ref_logps, config, num_items)
                # One scalar collective per micro-batch: every rank must skip together, or the
                # gradient all-reduce inside backward would pair up different micro-batches.
                poisoned = dist_utils.any_rank(not bool(torch.isfinite(loss)))
                if poisoned:
                    print(f"warning: non-finite loss ({float(loss.detach())}) on a micro-batch of some rank: this "
                          "update is skipped (counted in nonfinite_steps)", file=sys.stderr, flush=True)
                else:
                    totals.add(loss, metrics, tokens=float(batch.completion_mask[part].sum()),
                               sequences=float(len(part)))
            engine.backward(zero_loss(engine, batch) if poisoned else loss)
            if m < GA - 1:
                engine.step()
            else:
                learning_rate = step_at_boundary(engine, skip=poisoned)
                nonfinite += poisoned
        norm = engine.get_global_grad_norm()
        if norm is not None and not poisoned:
            grad_norms.append(float(norm))
    result = totals.result()
    result["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
    result["nonfinite_updates"] = float(nonfinite)
    result["learning_rate"] = learning_rate
    result["padding_fraction"] = padding_fraction(batch, parts)
    return result


def micro_batch_loss(engine, batch: Batch, part: torch.Tensor, old_logps: torch.Tensor | None, ref_logps,
                     config: RunConfig, num_items: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch (`part`: its row indices) and its metrics; the loss carries the
    gradient. `ref_logps()` returns the batch's (N, C) reference log-probs (waiting for them the first
    time). The engine's forward computes the loss itself (fused into the LM head: `modeling.completion_loss`)."""
    loss_cfg = config.loss
    device = engine.device
    input_ids, attention_mask, prompt_length, kept = trim_padding(batch, part)  # (b, P' + C'); C' = kept

    def reference() -> torch.Tensor | None:
        ref = ref_logps()
        return None if ref is None else ref[part, :kept].to(device)  # (b, C')

    loss_inputs = {
        "old_logps": None if old_logps is None else old_logps[part, :kept].to(device),
        "ref_logps": reference,
        "advantages": batch.advantages[part].to(device),
        "mask": batch.completion_mask[part, :kept].to(device),
        "loss_settings": {
            "beta": loss_cfg.beta,
            "epsilon_low": loss_cfg.epsilon,
            "epsilon_high": loss_cfg.epsilon_high,
            "loss_type": loss_cfg.loss_type,
            "max_completion_length": config.rollout.max_completion_length,
            "importance_sampling_level": loss_cfg.importance_sampling_level,
            "num_items": num_items,
        },
    }
    return engine(input_ids.to(device), attention_mask.to(device), prompt_length, batch.temperature, loss_inputs)


def step_at_boundary(engine, skip: bool) -> float:
    """The optimizer step at the accumulation boundary; returns the learning rate it was scheduled at.

    `skip`: no parameter moves, because the step runs at learning rate 0 (the finite micro-batches'
    gradients still reach Adam's moments, which keeps them finite too). The scheduler steps inside
    engine.step() and writes the next update's rate into the groups itself, so nothing is restored
    afterwards: the skipped update uses up its own slot of the schedule, the next one gets its own.
    """
    learning_rate = float(engine.optimizer.param_groups[0]["lr"])
    if skip:
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
    engine.step()
    return learning_rate


class StepTotals:
    """Loss metrics of the whole step, whatever the micro-batching: each micro-batch's value weighs
    what it averages over (its tokens; its sequences for GSPO's per-sequence clip metrics), so with
    GA 2 a step logs what GA 1 logs. `loss` itself weighs each micro-batch equally: that is the
    quantity the engine averages into the gradient."""

    def __init__(self, per_sequence: bool):
        self.per_sequence = per_sequence
        self.totals: dict[str, list[float]] = {}  # key -> [weighted sum, weight]

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], tokens: float, sequences: float) -> None:
        weights = {key: sequences if self.per_sequence and key != "kl" else tokens for key in metrics}
        for key, value in {"loss": loss, **metrics}.items():
            total = self.totals.setdefault(key, [0.0, 0.0])
            total[0] += float(value.detach()) * weights.get(key, 1.0)
            total[1] += weights.get(key, 1.0)

    def result(self) -> dict:
        """{key: weighted mean} and `weights`: what each mean weighs when ranks are combined (step_metrics)."""
        result: dict = {key: total / weight if weight > 0 else 0.0 for key, (total, weight) in self.totals.items()}
        result["weights"] = {key: weight for key, (_, weight) in self.totals.items()}
        return result
