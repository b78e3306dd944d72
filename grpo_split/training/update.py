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
from stable_ops import policy_loss


def zero_loss(engine, batch: Batch) -> torch.Tensor:
    """A loss of exactly 0 whose backward visits every parameter (2 tokens through the model).

    Stands in for a micro-batch whose loss was not finite: DeepSpeed's gradient-accumulation
    bookkeeping needs a forward, a backward and a step per micro-batch on every rank, and this one
    adds a zero gradient instead of NaN.
    """
    ids = batch.input_ids[:1, :2].to(engine.device)
    return engine(ids, torch.ones_like(ids), 1, 1.0).float().sum() * 0.0


def engine_logps(engine, batch: Batch, rows: slice, grad: bool) -> torch.Tensor:
    """(b, C) float32 completion log-probs of `batch`'s `rows` through the engine's forward."""
    device = engine.device
    with torch.set_grad_enabled(grad):
        return engine(batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device), batch.prompt_length,
                      batch.temperature).float()


def train_on_batch(engine, batch: Batch, config: RunConfig, world_size: int) -> dict:
    """`num_iterations` optimizer updates on one batch; returns this rank's loss metrics (means), with
    `weights` (what each mean weighs when ranks are combined), `grad_norm`, `learning_rate` and
    `nonfinite_updates`.

    The batch is split into `gradient_accumulation_steps` micro-batches; the engine divides each
    micro-batch loss by that number and steps the optimizer at the last one.
    """
    loss_cfg = config.loss
    GA = config.training.gradient_accumulation_steps
    rows = batch.batch_size // GA
    parts = [slice(m * rows, (m + 1) * rows) for m in range(GA)]
    old_logps = batch.old_logps
    if old_logps is None and loss_cfg.num_iterations > 1:
        # The sampling policy's log-probs, frozen for all passes (TRL's mu > 1): forwards, no graph.
        engine.eval()
        old_logps = torch.cat([engine_logps(engine, batch, part, grad=False).cpu() for part in parts])
        engine.train()
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
                loss, metrics = micro_batch_loss(engine, batch, part, old_logps, config, num_items)
                # One scalar collective per micro-batch: every rank must skip together, or the
                # gradient all-reduce inside backward would pair up different micro-batches.
                poisoned = dist_utils.any_rank(not bool(torch.isfinite(loss)))
                if poisoned:
                    print(f"warning: non-finite loss ({float(loss.detach())}) on a micro-batch of some rank: this "
                          "update is skipped (counted in nonfinite_steps)", file=sys.stderr, flush=True)
                else:
                    totals.add(loss, metrics, tokens=float(batch.completion_mask[part].sum()),
                               sequences=float(part.stop - part.start))
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
    return result


def micro_batch_loss(engine, batch: Batch, part: slice, old_logps: torch.Tensor | None, config: RunConfig,
                     num_items: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of one micro-batch (`part` of the rows) and its metrics; the loss carries the gradient."""
    loss_cfg = config.loss
    logps = engine_logps(engine, batch, part, grad=True)  # (b, C) float32
    device = logps.device
    return policy_loss(
        logps,
        None if old_logps is None else old_logps[part].to(device),
        None if batch.ref_logps is None else batch.ref_logps[part].to(device),
        batch.advantages[part].to(device),
        batch.completion_mask[part].to(device),
        beta=loss_cfg.beta,
        epsilon_low=loss_cfg.epsilon,
        epsilon_high=loss_cfg.epsilon_high,
        loss_type=loss_cfg.loss_type,
        max_completion_length=config.rollout.max_completion_length,
        importance_sampling_level=loss_cfg.importance_sampling_level,
        num_items=num_items,
    )


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
