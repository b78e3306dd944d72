"""Fused GRPO loss over the LM head: the loss and both gradients in one pass, three LM-head matmuls.

`policy_loss(linear_logps(hidden, weight, labels), ...)` costs four LM-head matmuls: one in
forward, and in backward one to recompute each vocabulary slice's logits plus two for the
gradients. The recompute is needed only because `linear_logps` does not know, while it holds a
tile's logits, how the loss will weigh each log-prob. The GRPO loss is separable per token once
its normalization weight is known, and that weight depends on the mask alone (grpo: 1 / (B x
tokens of the row), bnpo: 1 / sum(mask), dr_grpo: 1 / (B x max_completion_length), dapo:
1 / num_items). So `linear_policy_loss` computes dL/dlogp of a tile's tokens while it still holds
their logits, turns it into dL/dlogits = dL/dlogp * (onehot - softmax) * slope, and takes both
gradients from that tile at once:

    logits         = tile @ W.T            (matmul 1)
    grad_hidden[tile] = dlogits @ W        (matmul 2)
    grad_weight   += dlogits.T @ tile      (matmul 3)

The autograd backward then only multiplies the two stored gradients by the incoming scalar.

dL/dlogp is not written out by hand: for each tile it is autograd's gradient of `policy_loss`
itself over the tile's tokens with unit normalization (loss_type "dapo" with num_items=1 sums the
per-token losses), times each token's normalization weight, which is autograd's gradient of the
chosen `LOSS_NORMALIZERS` entry w.r.t. the per-token loss. Both come from loss.py, so the two
cannot drift. GSPO's sequence-level weight needs every token of a sequence, so at that level the
tiles hold whole rows. The returned loss and metrics are `policy_loss` of the detached (B, T)
log-probs, so they are the reference's by definition.

Masked tokens contribute nothing to the loss, the metrics or the gradient (policy_loss zeroes them
first), so they are skipped: padding costs no matmul.
"""

from __future__ import annotations

import bisect
import math

import torch

from .fused_linear import _check_positive_finite, _logits_into, _transform_
from .logprobs import accumulation_dtype, check_labels, check_temperature, log_sum_exp_shifted_, subtract_row_max_
from .loss import LOSS_NORMALIZERS, _check_policy_loss_args, policy_loss

NAME = "linear_policy_loss"

# Automatic tile size: the tokens are cut into about TARGET_TILES tiles, each of at least MIN_CHUNK
# and at most MAX_CHUNK tokens. The working memory is one tile of logits (x 2 for a soft-cap's
# slope), while the unfused variants hold more than two (B, T, V) float32 tensors at once (1.3 MB
# per token at V = 151,936 for the seed's log_softmax + gather), so a sixth of the tokens keeps it
# under 10% of theirs. Larger tiles make faster matmuls: each tile streams the (V, H) weight twice
# and reads and writes the weight's gradient once, and on the 2-core development CPU the three
# matmuls of 1,024 tokens took about 11 s in tiles of 128, 10 s in tiles of 256 and 9 s in one tile
# (busy machine, two interleaved runs each). MAX_CHUNK bounds the memory of large batches:
# 622 MB of float32 logits at that vocabulary, 6% of the seed's at 8,192 tokens.
TARGET_TILES = 6
MIN_CHUNK = 128
MAX_CHUNK = 1024


def auto_chunk_size(num_tokens: int) -> int:
    """Tokens per tile for `num_tokens` computed tokens: about a sixth of them, within [MIN_CHUNK, MAX_CHUNK]."""
    return max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(num_tokens / TARGET_TILES)))


# ---- the loss's gradient w.r.t. log-probs, from loss.py ----------------------------------------


def normalization_weights(mask: torch.Tensor, loss_type: str, max_completion_length, num_items,
                          dtype: torch.dtype) -> torch.Tensor:
    """(B, T) weight of each token's loss in the total: d normalizer / d per_token_loss.

    Every normalizer in LOSS_NORMALIZERS is linear in the per-token loss (a sum divided by counts
    read off the mask), so its gradient does not depend on the loss and is the weight itself.
    """
    per_token = torch.zeros(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
    maskf = mask.bool().to(dtype)
    with torch.enable_grad():
        total = LOSS_NORMALIZERS[loss_type](
            per_token, maskf, max_completion_length=max_completion_length, num_items=num_items
        )
        (weights,) = torch.autograd.grad(total, per_token)
    return weights


class _LossTerms:
    """What `policy_loss` needs besides the log-probs, and the gradient of its unnormalized sum for a tile."""

    def __init__(self, old_logps, ref_logps, advantages, mask, beta, epsilon_low, epsilon_high, level):
        self.old_logps, self.ref_logps, self.advantages = old_logps, ref_logps, advantages
        self.length = mask.shape[1]
        self.kwargs = dict(beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                           importance_sampling_level=level)

    def unit_grad(self, tile_logps: torch.Tensor, positions: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """d (sum of the per-token losses of the tile) / d tile_logps, (n,) -> (n,).

        `positions` are the tile's flat indices into (B, T), all within rows [r0, r1). The tile is
        placed in those rows, with a mask of exactly its tokens, and `policy_loss` with loss_type
        "dapo" and num_items=1 returns the plain sum of their per-token losses. Per token, that sum
        depends on the token's own log-prob (token level) or on its row's (sequence level, where a
        tile holds whole rows and the mask is then the rows' own), so the gradient is exact.
        """
        rows = r1 - r0
        local = positions - r0 * self.length  # (n,) flat indices into the (rows, T) sub-batch
        x = tile_logps.detach().requires_grad_()
        with torch.enable_grad():
            logps = x.new_zeros(rows * self.length).index_put((local,), x).view(rows, self.length)  # (r, T)
            mask = torch.zeros(rows * self.length, dtype=torch.bool, device=x.device)
            mask = mask.index_fill_(0, local, True).view(rows, self.length)  # (r, T)
            old = None if self.old_logps is None else self.old_logps[r0:r1]
            ref = None if self.ref_logps is None else self.ref_logps[r0:r1]
            total, _ = policy_loss(logps, old, ref, self.advantages[r0:r1], mask, loss_type="dapo",
                                   num_items=1.0, **self.kwargs)
            (grad,) = torch.autograd.grad(total, x)
        return grad


# ---- tiles ---------------------------------------------------------------------------------------


def plan_tiles(row_counts: list[int], chunk_size: int, whole_rows: bool) -> list[tuple[int, int, int, int]]:
    """(a0, a1, r0, r1) per tile: computed tokens [a0, a1) in row-major order, lying in rows [r0, r1).

    `row_counts` are the computed (unmasked) tokens per row. Token tiles hold `chunk_size` tokens;
    with `whole_rows` (GSPO) a tile holds as many whole rows as fit in `chunk_size` tokens, and at
    least one, however long.
    """
    ends = []  # ends[r] = computed tokens in rows 0..r
    total = 0
    for count in row_counts:
        total += count
        ends.append(total)
    tiles = []
    if whole_rows:
        r0 = 0
        while r0 < len(row_counts):
            r1 = r0 + 1
            start = ends[r0] - row_counts[r0]
            while r1 < len(row_counts) and ends[r1] - start <= chunk_size:
                r1 += 1
            if ends[r1 - 1] > start:  # rows without a computed token need no tile
                tiles.append((start, ends[r1 - 1], r0, r1))
            r0 = r1
        return tiles
    for a0 in range(0, total, chunk_size):
        a1 = min(a0 + chunk_size, total)
        tiles.append((a0, a1, bisect.bisect_right(ends, a0), bisect.bisect_right(ends, a1 - 1) + 1))
    return tiles


class _Head:
    """The LM head's transform and the buffers a tile works in."""

    def __init__(self, weight, temperature, logit_scale, softcap, chunk, acc, with_grad):
        self.weight, self.temperature, self.logit_scale, self.softcap = weight, temperature, logit_scale, softcap
        vocab = weight.shape[0]
        self.scratch = weight.new_empty((chunk, vocab), dtype=acc)  # (C, V), reused by every tile
        # The soft-cap's slope varies per logit: one more tile-sized buffer, only when a gradient is wanted.
        need_slope = with_grad and softcap is not None
        self.slope_scratch = weight.new_empty((chunk, vocab), dtype=acc) if need_slope else None

    def logps(self, hidden_tile: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, H) states, (n,) ids -> log-probs (n,) and the tile's buffer holding `exp(y - max)`, with its log-sum.

        The arithmetic is linear_logps's forward, so the log-probs are the same (to the last bit when the
        matmul rounds a tile of this size as it rounds linear_logps's tiles).
        """
        n = hidden_tile.shape[0]
        logits = _logits_into(hidden_tile, self.weight.t(), self.scratch[:n])  # (n, V) raw logits z
        slope = None if self.slope_scratch is None else self.slope_scratch[:n]
        _transform_(logits, self.logit_scale, self.softcap, self.temperature, slope)  # (n, V) y = f(z) / T
        subtract_row_max_(logits)
        picked = logits.gather(-1, labels[:, None]).squeeze(-1)  # (n,) shifted label logits
        log_sum = log_sum_exp_shifted_(logits)  # (n,); `logits` now holds exp(y - max)
        return picked - log_sum, log_sum

    def dlogits_(self, exp_shifted: torch.Tensor, log_sum: torch.Tensor, labels: torch.Tensor,
                 grad_logps: torch.Tensor) -> torch.Tensor:
        """In place: exp(y - max) (n, V) -> dL/dz = g * (onehot(label) - softmax(y)) * dy/dz, g = dL/dlogp (n,)."""
        g = grad_logps.to(exp_shifted.dtype)
        if self.slope_scratch is None:
            # A scale or a temperature alone has a constant slope dy/dz: folded into the (n,) factors, which
            # saves a pass over the tile.
            g = g * (self.logit_scale / self.temperature)
        # softmax = exp(y - max) / sum, and 1 / sum = exp(-log_sum).
        exp_shifted.mul_((-g * torch.exp(-log_sum))[:, None])  # (n, V) -g * softmax
        exp_shifted.scatter_add_(-1, labels[:, None], g[:, None])  # + g at the label
        if self.slope_scratch is not None:
            exp_shifted.mul_(self.slope_scratch[: exp_shifted.shape[0]])  # the soft-cap's slope, per logit
        return exp_shifted


def _fused_pass(hidden, weight, labels, keep, terms, norm_weights, head_args, chunk_size, level,
                want_hidden, want_weight):
    """All tiles: (B, T) log-probs (0 where masked), and grad_hidden (B, T, H) / grad_weight (V, H) when wanted.

    The gradients are those of the normalized loss (grad_output 1).
    """
    batch, length, width = hidden.shape
    acc = accumulation_dtype(weight.dtype)
    flat_keep = keep.reshape(-1)  # (N,)
    positions = flat_keep.nonzero().squeeze(1)  # (A,) flat indices of the computed tokens, row-major
    dense = positions.numel() == flat_keep.numel()
    flat_hidden = hidden.reshape(batch * length, width)  # (N, H); copies only a non-contiguous tensor
    states = flat_hidden if dense else flat_hidden.index_select(0, positions)  # (A, H)
    ids = labels.reshape(-1).long()  # (N,)
    ids = ids if dense else ids.index_select(0, positions)  # (A,)
    logps = hidden.new_zeros(batch * length, dtype=acc)  # (N,); masked tokens stay 0, as policy_loss makes them
    with_grad = want_hidden or want_weight

    grad_states = None
    if want_hidden:
        # With every token computed, the tiles write every row of the (B, T, H) gradient in place; otherwise
        # they fill an (A, H) buffer that is scattered into a zeroed one (masked tokens get 0).
        grad_hidden = (hidden.new_empty if dense else hidden.new_zeros)((batch, length, width))  # (B, T, H)
        grad_states = grad_hidden.view(batch * length, width) if dense else hidden.new_empty(states.shape)  # (A, H)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if want_weight else None
    weight_written = False

    row_counts = keep.sum(-1).tolist()  # one host sync, for the tile plan
    chunk = auto_chunk_size(positions.numel()) if chunk_size is None else chunk_size
    tiles = plan_tiles(row_counts, chunk, whole_rows=level == "sequence")
    largest = max((a1 - a0 for a0, a1, _, _ in tiles), default=0)
    head = _Head(weight, *head_args, chunk=largest, acc=acc, with_grad=with_grad)
    flat_norm = None if norm_weights is None else norm_weights.reshape(-1)  # (N,)
    for a0, a1, r0, r1 in tiles:
        tile_states, tile_ids, tile_positions = states[a0:a1], ids[a0:a1], positions[a0:a1]
        tile_logps, log_sum = head.logps(tile_states, tile_ids)  # (n,), (n,)
        logps[tile_positions] = tile_logps
        if not with_grad:
            continue
        grad_logps = terms.unit_grad(tile_logps, tile_positions, r0, r1) * flat_norm[tile_positions]  # (n,)
        dlogits = head.dlogits_(head.scratch[: a1 - a0], log_sum, tile_ids, grad_logps).to(weight.dtype)  # (n, V)
        if want_hidden:
            torch.mm(dlogits, weight, out=grad_states[a0:a1])  # (n, V) @ (V, H)
        if want_weight:
            if weight_written:
                grad_weight.addmm_(dlogits.t(), tile_states)  # (V, n) @ (n, H)
            else:
                torch.mm(dlogits.t(), tile_states, out=grad_weight)  # the first tile writes, not adds
                weight_written = True
    if want_weight and not weight_written:
        grad_weight.zero_()  # no computed token: the loss does not depend on the weight
    if want_hidden and not dense:
        grad_hidden.view(batch * length, width).index_copy_(0, positions, grad_states)
    return logps.view(batch, length), (grad_hidden if want_hidden else None), grad_weight


class _PrecomputedGrads(torch.autograd.Function):
    """A zero scalar whose gradient w.r.t. (hidden, weight) is the stored pair, times the incoming gradient.

    Added to the loss value, it attaches the gradients computed in the forward pass to the graph.
    """

    @staticmethod
    def forward(ctx, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return hidden.new_zeros((), dtype=accumulation_dtype(weight.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(
                f"{NAME}: backward ran twice through one loss (retain_graph=True); its gradients were "
                "computed once in the forward pass and handed over: call linear_policy_loss again instead"
            )
        grads, ctx.grads = ctx.grads, None  # released: the (V, H) gradient is not held twice
        if grad_out.item() != 1.0:  # one host sync; callers scale the loss, e.g. by 1 / accumulation steps
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_out.to(grad.dtype))  # in place: no second (V, H) tensor
        return grads[0], grads[1], None, None


def _check_args(hidden, weight, labels, old_logps, ref_logps, advantages, mask, chunk_size, loss_args):
    """ValueErrors naming the argument, as linear_logps and policy_loss give them."""
    if hidden.dim() != 3:
        raise ValueError(f"{NAME}: hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"{NAME}: weight must be (V, H) with H = {hidden.shape[2]} (the hidden size), "
            f"got shape {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"{NAME}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype; "
            "cast the hidden states to the LM head's dtype"
        )
    positive_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1
    if not (chunk_size is None or positive_int):
        raise ValueError(f"{NAME}: chunk_size must be None (automatic) or a positive int, got {chunk_size!r}")
    check_labels(labels, hidden.shape[:2], weight.shape[0], NAME)
    for name, tensor in (("advantages", advantages), ("mask", mask)):
        if tensor is None:
            raise ValueError(f"{NAME}: {name} is required, got None")
    named = (("weight", weight), ("labels", labels), ("old_logps", old_logps), ("ref_logps", ref_logps),
             ("advantages", advantages), ("mask", mask))
    for name, tensor in named:
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{NAME}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{NAME}: {name} is on {tensor.device} but hidden is on {hidden.device}")
    # policy_loss's own checks, on a shape-only stand-in for the (B, T) log-probs.
    stand_in = torch.empty(hidden.shape[:2], device="meta")
    _renamed(_check_policy_loss_args, stand_in, old_logps, ref_logps, advantages, mask, **loss_args)


def _renamed(check, *args, **kwargs):
    """`check(*args, **kwargs)`, with its ValueError's message speaking of linear_policy_loss's arguments."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        message = str(error).split(": ", 1)[1].replace(", logps has", ", labels have")  # logps: ours are (B, T)
        raise ValueError(f"{NAME}: {message}") from None


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    num_items: float | torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss straight from the final hidden states: (B, T, H) hidden, (V, H) weight, (B, T) ids.

    Returns what `policy_loss(linear_logps(hidden, weight, labels, temperature, logit_scale=...,
    softcap=...), old_logps, ref_logps, advantages, mask, beta=..., ...)` returns, `(loss, metrics)`,
    with the same gradients w.r.t. `hidden` and `weight`, but with three LM-head matmuls instead of
    four: both gradients are computed tile by tile in the forward pass and stored, and the backward
    only scales them by the incoming gradient. See `policy_loss` for old_logps, ref_logps,
    advantages (B,), mask and the loss options, and `linear_logps` for temperature, logit_scale
    and softcap.

    `chunk_size`: computed tokens per tile, None = `auto_chunk_size` (a sixth of the unmasked
    tokens, within [128, 1024]). At importance_sampling_level "sequence" (GSPO) a tile holds whole
    rows, so it holds at least one row however long. Masked tokens are not computed at all.
    Memory beyond the inputs and the two gradients: one tile of float32 logits (two with a
    soft-cap), a (B, T, H)-sized copy of the unmasked states when the mask drops tokens, and (B, T)
    vectors. The gradients exist from the forward on, and a loss can be backpropagated once
    (no retain_graph). A bfloat16/float16 weight's gradient is accumulated over the tiles in its
    own dtype (one rounding per tile), as a bfloat16 `.grad` is over micro-batches.
    """
    loss_args = dict(beta=beta, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
                     loss_type=loss_type, max_completion_length=max_completion_length,
                     importance_sampling_level=importance_sampling_level)
    _check_args(hidden, weight, labels, old_logps, ref_logps, advantages, mask, chunk_size, loss_args)
    check_temperature(temperature, NAME)
    logit_scale = _renamed(_check_positive_finite, logit_scale, "logit_scale",
                           "the factor applied to hidden @ weight.T")
    if softcap is not None:
        softcap = _renamed(_check_positive_finite, softcap, "softcap",
                           "the bound of softcap * tanh(z / softcap); None for none")

    want_hidden = torch.is_grad_enabled() and hidden.requires_grad
    want_weight = torch.is_grad_enabled() and weight.requires_grad
    acc = accumulation_dtype(weight.dtype)
    keep = mask.bool()  # (B, T)
    terms = norm_weights = None
    if want_hidden or want_weight:
        terms = _LossTerms(old_logps, ref_logps, advantages, keep, beta, epsilon_low, epsilon_high,
                           importance_sampling_level)
        norm_weights = normalization_weights(keep, loss_type, max_completion_length, num_items, acc)  # (B, T)
    with torch.no_grad():
        logps, grad_hidden, grad_weight = _fused_pass(
            hidden.detach(), weight.detach(), labels, keep, terms, norm_weights,
            (float(temperature), logit_scale, softcap), chunk_size, importance_sampling_level,
            want_hidden, want_weight,
        )
    loss, metrics = policy_loss(logps, old_logps, ref_logps, advantages, mask, **loss_args, num_items=num_items)
    if want_hidden or want_weight:
        loss = loss + _PrecomputedGrads.apply(hidden, weight, grad_hidden, grad_weight)  # + 0, carrying the gradients
    return loss, metrics
