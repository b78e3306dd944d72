"""Loading causal LMs and computing per-token log-probs of completions with `stable_ops`.

Shared by the reference server (frozen reference model) and the trainer (old and current
policy log-probs), so both sides compute log-probs the same way.

The fused LM head (`stable_ops.linear_logps`) needs to know how the model turns its final hidden
states into logits. Rather than trusting a list of architectures, `lm_head_plan` checks the fused
computation against the model's own `forward` once, at load, and falls back to the model's own
logits when nothing it can express reproduces them.

The G completions of a GRPO group share their prompt. `completion_hidden` forwards each distinct
prompt once and expands its KV cache to the rows (`shared_prefix_cache`), where `prefix_plan` has
checked, also once at load, that the model's cache allows it; elsewhere every row forwards its own.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, replace

import torch

from grpo_split.config.parsing import ConfigError
from stable_ops import linear_logps, linear_policy_loss, log_softmax, per_token_logps, policy_loss

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Where `lm_head_plan` caches a model's plan: an attribute of the model object itself, so a plan
# computed at load (before DeepSpeed ZeRO-3 partitions the weights) follows the model everywhere.
_PLAN_ATTRIBUTE = "_grpo_lm_head_plan"
# The probe: one row of this many fixed pseudo-random tokens. Long enough that attention mixes
# positions, short enough to cost nothing next to loading a 7B model.
_PROBE_LENGTH = 8
_PROBE_SEED = 0
# Raw logits of a random tiny model are a few units, where cap * tanh(z / cap) ~= z and a plain
# head would pass for Gemma's soft-capped one. The second probe scales the final hidden states
# until the transformed logits reach about this size, where every candidate transform differs
# from the others by several nats.
_AMPLIFIED_LOGIT = 64.0
# Tolerance of the check, in units of the head dtype's epsilon times the logits' size: the model
# rounds its logits once in the matmul and up to three more times in its transform (divide, tanh,
# multiply), and a log-prob error is at most twice the largest logit error.
_TOLERANCE_EPSILONS = 8.0


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; an explicit device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, else float32 (CPU half-precision matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class ModelLoadError(ConfigError):
    """`from_pretrained` could not load the model or tokenizer named in the configuration."""


def load_causal_lm(path: str, dtype: torch.dtype, *, gradient_checkpointing: bool = False):
    """A causal LM through `from_pretrained`, as a user's model is loaded, with its LM-head plan.

    The plan (`lm_head_plan`) is checked here, on the full weights as loaded: under DeepSpeed
    ZeRO-3 they are partitioned placeholders later. The model stays where `from_pretrained` put it
    (the CPU); the caller moves it. Raises ModelLoadError naming the path.
    """
    from transformers import AutoModelForCausalLM  # heavy import, kept out of module import time

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(
            f"model_name_or_path={path!r} could not be loaded: {exc}. Pass a local model directory (config.json + "
            "weights) or a hub name this machine can download"
        ) from exc
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    lm_head_plan(model)
    return model


def load_frozen_model(path: str, device: torch.device, dtype: torch.dtype):
    """`load_causal_lm` on `device`, in eval mode with gradients off (the reference model, a worker's policy)."""
    model = load_causal_lm(path, dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def load_tokenizer(path: str):
    """The policy's tokenizer, with a chat template and a pad token, padding on the left (prompts)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"model_name_or_path={path!r}: its tokenizer could not be loaded: {exc}") from exc
    if tokenizer.chat_template is None:
        raise ConfigError(f"model_name_or_path={path!r}: the tokenizer has no chat_template; GRPO prompts are "
                          "chat-formatted, so use an instruct/chat model or add a template to tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out, so any id works; EOS is what most chat models use.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting only attended tokens.

    With left padding, the first real token gets position 0, exactly as in the unpadded row, so
    a padded row gets the same log-probs as the row alone.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---- the LM-head plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LMHeadPlan:
    """How `completion_logps` turns a model's final hidden states into log-probs.

    `fused`: `stable_ops.linear_logps` on the LM head's weight with the transform
    `f(z) = softcap * tanh(logit_scale * z / softcap)` (or `logit_scale * z` when `softcap` is
    None), where `z = hidden @ weight.T`; the (B, T, V) logits are never built. Not fused: the
    model's own forward computes the logits and `stable_ops.per_token_logps` reads them in chunks.
    `reason` is one line for the logs: what was verified, or why the fused head is not used.
    """

    fused: bool
    logit_scale: float = 1.0
    softcap: float | None = None
    reason: str = ""

    def transform(self) -> str:
        """The logits as a formula of the raw head output z, e.g. `30 * tanh(z / 30)`."""
        scaled = "z" if self.logit_scale == 1.0 else f"{self.logit_scale:g} * z"
        return scaled if self.softcap is None else f"{self.softcap:g} * tanh({scaled} / {self.softcap:g})"


def lm_head_plan(model) -> LMHeadPlan:
    """The model's `LMHeadPlan`, computed on the first call and cached on the model object.

    Call it right after loading, before DeepSpeed ZeRO-3 partitions the weights: the check runs
    a few forwards of one short sequence, which under ZeRO-3 would have to happen on every rank
    at once. Later calls (and `completion_logps`) reuse the cached plan. The first call also checks
    whether the model can share prompts between rows (`prefix_plan`), for the same reason.
    """
    plan = getattr(model, _PLAN_ATTRIBUTE, None)
    if plan is None:
        plan = _build_lm_head_plan(model)
        setattr(model, _PLAN_ATTRIBUTE, plan)
        prefix_plan(model)
        # The fallback is correct but slower and needs B x T x V memory: worth a warning, once per model.
        # The fused plan is only logged at debug level; entry points log whichever plan they run with.
        log.log(logging.DEBUG if plan.fused else logging.WARNING, "LM head plan: %s", plan.reason)
    return plan


def _fallback(reason: str) -> LMHeadPlan:
    return LMHeadPlan(fused=False, reason=f"full logits through the model's own forward: {reason}")


def _positive_config_number(config, name: str) -> float | None:
    """`config.<name>` as a float when it is a finite number > 0 (the only values a transform can use), else None."""
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _config_transform(config) -> tuple[float, float | None, str]:
    """(logit_scale, softcap) that the config's known attributes announce, and the attributes as text.

    `logit_scale` multiplies the logits (Cohere), `logits_scaling` divides them (Granite),
    `final_logit_softcapping` caps them (Gemma 2/3). Composite configs keep these on the text model.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale, announced = 1.0, []
    multiplier = _positive_config_number(config, "logit_scale")
    if multiplier is not None:
        scale *= multiplier
        announced.append(f"logit_scale={multiplier:g}")
    divisor = _positive_config_number(config, "logits_scaling")
    if divisor is not None:
        scale /= divisor
        announced.append(f"logits_scaling={divisor:g}")
    softcap = _positive_config_number(config, "final_logit_softcapping")
    if softcap is not None:
        announced.append(f"final_logit_softcapping={softcap:g}")
    return scale, softcap, ", ".join(announced) or "none"


def _candidates(scale: float, softcap: float | None) -> list[tuple[float, float | None]]:
    """(logit_scale, softcap) pairs to try, the config's own reading first, the plain head last.

    The scale applied before the cap is what Gemma-style code does; a cap applied before the
    scale, `s * c * tanh(z / c)`, is `linear_logps` with softcap `s * c`. The partial readings
    cover a config that announces an attribute its model's forward does not apply.
    """
    pairs = [(scale, softcap)]
    if softcap is not None:
        pairs += [(scale, scale * softcap), (scale, None), (1.0, softcap)]
    pairs.append((1.0, None))
    return list(dict.fromkeys(pairs))  # without repeats, in order


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout, so two forwards agree) for the block, then each module's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _scaled_final_hidden(model, factor: float):
    """Within the block, the base model's last hidden state comes out multiplied by `factor`.

    A forward hook, so the model's own forward and `_final_hidden` both see the scaled states.
    """

    def hook(module, args, output):
        if isinstance(output, tuple):  # return_dict=False
            return (output[0] * factor, *output[1:])
        output.last_hidden_state = output.last_hidden_state * factor  # a ModelOutput keeps [0] in step
        return output

    handle = model.base_model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _final_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor | None:
    """(B, T, H) final hidden states (after the final norm) from the base model, or None if it gives none."""
    out = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "last_hidden_state", None)


def _model_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(B, T, V) logits from the model's own forward: the ground truth every plan is held to."""
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits


def _tolerance(dtype: torch.dtype, device: torch.device, logit_size: float) -> float:
    """Largest log-prob difference (nats) that rounding alone explains at logits of `logit_size`."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and device.type != "cpu":
        eps = 2.0**-10  # GPU float32 matmuls may run in TF32 (10-bit mantissa)
    return _TOLERANCE_EPSILONS * eps * (1.0 + logit_size) + 1e-5


def _build_lm_head_plan(model) -> LMHeadPlan:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return _fallback(f"the output embedding is a {type(head).__name__}, not a torch.nn.Linear")
    if head.bias is not None:
        return _fallback("the LM head has a bias, which the fused head (linear_logps) does not take")
    if model.base_model is model:
        return _fallback(f"{type(model).__name__} has no base model to take final hidden states from")
    scale, softcap, announced = _config_transform(model.config)
    with _eval_mode(model), torch.no_grad():
        probes = _probe(model, head, scale, softcap)
        if probes is None:
            return _fallback(f"{type(model.base_model).__name__} returns no last_hidden_state")
        tried = []
        for logit_scale, cap in _candidates(scale, softcap):
            candidate = LMHeadPlan(fused=True, logit_scale=logit_scale, softcap=cap)
            checks = [_check(head, hidden, logits, labels, candidate) for hidden, logits, labels in probes]
            if all(error <= tolerance for error, _, tolerance in checks):
                (e1, s1, _), (e2, s2, _) = checks
                return replace(candidate, reason=(
                    f"fused LM head, logits = {candidate.transform()} (config: {announced}); matches the model's "
                    f"own log-probs to {e1:.1e} nats at logits up to {s1:.3g} and {e2:.1e} at logits up to {s2:.3g}"
                ))
            tried.append(f"{candidate.transform()}: off by {max(error for error, _, _ in checks):.3g} nats")
    return _fallback(
        f"no transform linear_logps can express reproduces the model's own log-probs (config: {announced}; "
        + "; ".join(tried) + ")"
    )


def _probe(model, head, scale: float, softcap: float | None):
    """[(hidden (1, L, H), the model's own logits (1, L, V), labels (4, L))] at natural and amplified scale.

    None when the base model gives no final hidden states. The labels at each position are the most
    and least likely tokens (where a wrong transform shows most) and two fixed random ones.
    """
    embeddings = model.get_input_embeddings()
    vocab = min(head.out_features, getattr(embeddings, "num_embeddings", head.out_features))
    device = head.weight.device
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    ids = torch.randint(0, vocab, (1, _PROBE_LENGTH), generator=gen).to(device)  # (1, L)
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    hidden = _final_hidden(model, ids, mask, positions)  # (1, L, H)
    if hidden is None:
        return None
    factor = _amplification(head(hidden).abs().max().item(), scale, softcap)
    runs = [(hidden, _model_logits(model, ids, mask, positions))]
    with _scaled_final_hidden(model, factor):
        runs.append((_final_hidden(model, ids, mask, positions), _model_logits(model, ids, mask, positions)))
    probes = []
    for hidden, logits in runs:
        labels = torch.cat([
            logits.argmax(-1), logits.argmin(-1),
            torch.randint(0, head.out_features, (2, _PROBE_LENGTH), generator=gen).to(device),
        ])  # (4, L)
        probes.append((hidden, logits, labels))
    return probes


def _amplification(raw_size: float, scale: float, softcap: float | None) -> float:
    """Factor for the final hidden states that brings raw logits of `raw_size` to where the
    transformed logits reach `_AMPLIFIED_LOGIT` and a cap's tanh saturates (scale * z / cap >= 2).

    A power of two, so scaling the hidden states adds no rounding of its own; never below 1.
    """
    if not raw_size > 0:
        return 1.0
    target = max(_AMPLIFIED_LOGIT, 2.0 * (softcap or 0.0)) / scale
    return 2.0 ** max(0, round(math.log2(target / raw_size)))


def _check(head, hidden, logits, labels, candidate: LMHeadPlan) -> tuple[float, float, float]:
    """(largest |fused - model's own| log-prob in nats at `labels` (K, L), largest |logit|, tolerance).

    `hidden` (1, L, H) are the base model's final states, `logits` (1, L, V) the model's own from the same input.
    """
    count = labels.shape[0]
    fused = _head_logps(head, hidden.expand(count, -1, -1), labels, 1.0, candidate)  # (K, L)
    own = log_softmax(logits[0].double()).gather(1, labels.t()).t()  # (L, V) -> (L, K) -> (K, L), float64
    size = logits.abs().max().item()
    return (fused.double() - own).abs().max().item(), size, _tolerance(head.weight.dtype, head.weight.device, size)


# ---- sharing each group's prompt ---------------------------------------------------------------

# Where `prefix_plan` caches a model's plan, beside the LM-head plan and for the same reason.
_PREFIX_PLAN_ATTRIBUTE = "_grpo_prefix_plan"
# Set on a model once a training forward fell back because of gradient checkpointing, to warn once.
_CHECKPOINTING_WARNED_ATTRIBUTE = "_grpo_prefix_checkpointing_warned"
# The probe's prompts are padded to this many positions, its completions this many tokens long.
_PREFIX_PROBE_PROMPT = 5
_PREFIX_PROBE_COMPLETION = 3
# Tolerance of the probe on the relative (Frobenius) difference of the shared forward's hidden states
# from the plain ones, in units of the dtype's epsilon and never below the floor: a forward of U
# prompts instead of B rows only rounds differently (float32, random Qwen2 H=512: 8e-7 at 8 layers,
# 1e-6 at 24), while a cache continued wrong (dropped, positions off by one) moves the states by
# tens of percent (0.3 in tests/test_shared_prefix.py).
_PREFIX_TOLERANCE_EPSILONS = 8.0
_PREFIX_TOLERANCE_FLOOR = 1e-4
# What a forward raises when it cannot take back a cache it built, or the cache cannot be indexed.
_PROBE_ERRORS = (TypeError, ValueError, RuntimeError, AttributeError, IndexError, KeyError, NotImplementedError)


@dataclass(frozen=True)
class PrefixPlan:
    """Whether rows that share a prompt forward it once (`completion_hidden`, `sample_completions`).

    `shared`: the distinct prefixes (prompt tokens and mask) are forwarded once with the KV cache on,
    the cache is expanded to the rows by index_select, and each row forwards only its own tokens,
    passing the cache as `cache_kwarg` (`cache` in transformers 5, `past_key_values` before).
    `reason` is one line for the logs: what was verified, or why every row forwards its own prompt.
    """

    shared: bool
    reason: str = ""
    cache_kwarg: str = "cache"


# Every row forwards its own prompt: what callers pass as `prefix=` to force the plain forward.
UNSHARED = PrefixPlan(shared=False, reason="every row forwards its own prompt")


class _CacheNotExpandable(Exception):
    """The model's KV cache is of a kind whose row-wise expansion is not known to be exact."""


def prefix_plan(model) -> PrefixPlan:
    """The model's `PrefixPlan`, computed on the first call and cached on the model object.

    `lm_head_plan` computes it too, so it is checked at load (before ZeRO-3 partitions the weights)
    wherever the LM-head plan is: a probe of rows sharing a left-padded prompt, through the shared
    and the plain forward, which must agree to rounding.
    """
    plan = getattr(model, _PREFIX_PLAN_ATTRIBUTE, None)
    if plan is None:
        plan = _build_prefix_plan(model)
        setattr(model, _PREFIX_PLAN_ATTRIBUTE, plan)
        # The fallback is correct but forwards each prompt G times: worth a warning, once per model.
        log.log(logging.INFO if plan.shared else logging.WARNING, "Prompt sharing: %s", plan.reason)
    return plan


def _unshared(reason: str) -> PrefixPlan:
    return PrefixPlan(shared=False, reason=f"every row forwards its own prompt: {reason}")


def cache_keyword(module) -> str | None:
    """The name under which the module's forward takes a KV cache, or None if it takes none."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _build_prefix_plan(model) -> PrefixPlan:
    if model.base_model is model:
        return _unshared(f"{type(model).__name__} has no base model to forward the prompts through")
    kwarg = cache_keyword(model.base_model)
    if kwarg is None:
        return _unshared(f"{type(model.base_model).__name__}.forward takes no KV cache")
    candidate = PrefixPlan(shared=True, cache_kwarg=kwarg)
    with _eval_mode(model), torch.no_grad():
        try:
            error, tolerance = _prefix_probe(model, candidate)
        except _CacheNotExpandable as exc:
            return _unshared(str(exc))
        except _PROBE_ERRORS as exc:
            return _unshared(f"the shared forward of the probe raised {type(exc).__name__}: {exc}")
    if not error <= tolerance:  # NaN included
        return _unshared(f"the shared forward's hidden states differ from the plain ones by {error:.2e} "
                         f"(relative), more than rounding explains ({tolerance:.1e})")
    return replace(candidate, reason=(
        f"each distinct prompt is forwarded once, its KV cache expanded to its rows; matches the plain forward "
        f"to {error:.1e} (relative, rounding allows {tolerance:.1e})"
    ))


def _prefix_probe(model, plan: PrefixPlan) -> tuple[float, float]:
    """(relative difference of the shared forward's completion states from the plain forward's, tolerance).

    Three rows: two share a prompt of 3 real tokens left-padded to 5, the third has a full prompt of
    its own and a right-padded completion, so padding, positions and row expansion all count.
    """
    P, C = _PREFIX_PROBE_PROMPT, _PREFIX_PROBE_COMPLETION
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    ids = torch.randint(0, vocab, (3, P + C), generator=gen)
    ids[1, :P] = ids[0, :P]  # rows 0 and 1 share their prompt
    mask = torch.ones_like(ids)
    mask[:2, : P - 3] = 0  # their prompt: 3 real tokens after left padding
    mask[2, -1] = 0  # right padding after row 2's completion
    ids, mask = ids.to(device), mask.to(device)
    plain = completion_hidden(model, ids, mask, P, UNSHARED)  # (3, C, H)
    shared = completion_hidden(model, ids, mask, P, plan)
    attended = mask[:, P:].bool()  # (3, C): states whose next token is real
    difference = (shared[attended].double() - plain[attended].double()).norm() / plain[attended].double().norm()
    dtype = plain.dtype
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and device.type != "cpu":
        eps = 2.0**-10  # GPU float32 matmuls may run in TF32 (10-bit mantissa)
    return difference.item(), max(_PREFIX_TOLERANCE_EPSILONS * eps, _PREFIX_TOLERANCE_FLOOR)


def shared_prefix_cache(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                        plan: PrefixPlan | None = None) -> dict | None:
    """`{cache keyword: KV cache}` of the first `length` tokens of every row, each distinct prefix
    (tokens and mask, (B, length)) forwarded once, for the model's forward or `generate` to continue
    from; None where every row must forward its own: the plan (default `prefix_plan(model)`) says so,
    no two rows share a prefix, or gradient checkpointing would drop the cache.

    The cache is expanded by index_select, whose backward sums the rows' gradients into their shared
    prefix: the gradients are those of the plain forward. (In training mode with dropout, the rows of
    a prefix also share its dropout noise; each row's own distribution is unchanged.)
    """
    if plan is None:
        plan = prefix_plan(model)
    if not plan.shared or length < 1 or _checkpointing_drops_cache(model):
        return None
    distinct = _distinct_prefixes(input_ids, attention_mask, length)
    if distinct is None:
        return None
    first, inverse = distinct
    ids, mask = input_ids[first, :length], attention_mask[first, :length]  # (U, L)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=True)
    cache = returned_cache(out)
    _check_expandable(cache)
    cache.reorder_cache(inverse)  # (U, heads, L, d) -> (B, heads, L, d) in every layer, by index_select
    return {plan.cache_kwarg: cache}


def returned_cache(out):
    """The KV cache a base model's forward returned: `cache` in transformers 5, `past_key_values` before."""
    if not hasattr(out, "get"):  # a tuple (return_dict=False): no named cache to rely on
        return None
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _distinct_prefixes(input_ids, attention_mask, length) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U,) the first row of each distinct prefix and (B,) each row's index among them, or None when
    all B rows differ. A prefix is the first `length` tokens and their mask; a padding id does not count."""
    key = torch.where(attention_mask[:, :length].bool(), input_ids[:, :length], -1)  # (B, L); ids are >= 0
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (B,) in 0..U-1
    rows = key.shape[0]
    count = int(inverse.max()) + 1
    if count == rows:
        return None
    order = torch.arange(rows, device=key.device)
    first = torch.full((count,), rows, device=key.device).scatter_reduce(0, inverse, order, reduce="amin")  # (U,)
    return first, inverse


def _check_expandable(cache) -> None:
    """Raise `_CacheNotExpandable` unless every layer holds the whole prefix as (rows, heads, L, d)
    keys and values, the one layout whose index_select over rows is the rows' own cache."""
    from transformers import DynamicCache

    if cache is None:
        raise _CacheNotExpandable("the base model returns no KV cache")
    if type(cache) is not DynamicCache:
        raise _CacheNotExpandable(f"its KV cache is a {type(cache).__name__}, not a plain DynamicCache")
    others = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])} - {"DynamicLayer"})
    if others:
        raise _CacheNotExpandable(
            f"its KV cache has {', '.join(others)} layers (sliding-window, recurrent or indexed states, which keep "
            "part of the prompt or more than its keys and values), not only full-attention DynamicLayers"
        )


def _checkpointing_drops_cache(model) -> bool:
    """True in training mode with gradient checkpointing: transformers' checkpointed layers then drop
    the cache they are given (silently for `cache=`), so a row would not see its shared prompt."""
    if not model.training:
        return False
    dropping = any(getattr(module, "gradient_checkpointing", False) is True and module.training
                   for module in model.modules())
    if dropping and not getattr(model, _CHECKPOINTING_WARNED_ATTRIBUTE, False):
        setattr(model, _CHECKPOINTING_WARNED_ATTRIBUTE, True)
        log.warning("Prompt sharing: off for training forwards, every row forwards its own prompt: gradient "
                    "checkpointing is on, and transformers' checkpointed layers drop the KV cache")
    return dropping


# ---- completion log-probs ---------------------------------------------------------------------


def completion_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_length: int,
    temperature: float = 1.0,
    head: LMHeadPlan | None = None,
    prefix: PrefixPlan | None = None,
) -> torch.Tensor:
    """(B, T) prompt + completion ids -> (B, T - P) log-probs of the completion tokens, float32.

    Equals `log_softmax(model(...).logits[:, P-1:-1] / temperature).gather(completion ids)`, with
    position ids counted from the attention mask. `head` is the model's `LMHeadPlan` (default:
    `lm_head_plan(model)`, computed once and cached): fused, the final hidden states go through
    `stable_ops.linear_logps` with the head's verified transform, so a 152k vocabulary never needs
    B x T x V memory; otherwise the model's own logits go through `stable_ops.per_token_logps`.
    `prefix` is the model's `PrefixPlan` (default: `prefix_plan(model)`): rows sharing a prompt share
    its forward on both head paths. Gradients flow when the caller has them enabled.
    """
    _check_inputs("completion_logps", input_ids, prompt_length)
    if head is None:
        head = lm_head_plan(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = input_ids[:, prompt_length:]  # (B, C)
    if head.fused:
        hidden = completion_hidden(model, input_ids, attention_mask, prompt_length, prefix)  # (B, C, H)
        return _head_logps(model.get_output_embeddings(), hidden, labels, temperature, head)
    logits = _completion_logits(model, input_ids, attention_mask, prompt_length, prefix)  # (B, C, V)
    return per_token_logps(logits, labels, temperature)


def completion_hidden(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_length: int,
    prefix: PrefixPlan | None = None,
) -> torch.Tensor:
    """(B, T) prompt + completion ids -> (B, C, H) final hidden states (after the final norm) at
    positions P-1..T-2, the ones whose head output predicts the completion tokens P..T-1.

    Rows that share their prompt (tokens and mask) forward it once when `prefix` (default:
    `prefix_plan(model)`) allows; the result and its gradients are those of the plain forward.
    """
    _check_inputs("completion_hidden", input_ids, prompt_length)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    shared = _shared_prefix_for(model, input_ids, attention_mask, prompt_length, prefix)
    if shared is None:
        hidden = _final_hidden(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))  # (B, T, H)
        if hidden is None:
            raise ValueError(f"completion_hidden: {type(model.base_model).__name__} returns no last_hidden_state")
        # The state at position t predicts token t + 1: completion tokens P..T-1 come from P-1..T-2.
        return hidden[:, prompt_length - 1 : -1]  # (B, C, H)
    out = model.base_model(**_tail_inputs(input_ids, attention_mask, prompt_length), **shared, use_cache=True)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, C, H)


def _completion_logits(model, input_ids, attention_mask, prompt_length, prefix) -> torch.Tensor:
    """(B, C, V) the model's own logits at positions P-1..T-2, the prompt shared as in `completion_hidden`."""
    shared = _shared_prefix_for(model, input_ids, attention_mask, prompt_length, prefix)
    if shared is None:
        logits = _model_logits(model, input_ids, attention_mask, position_ids_from_mask(attention_mask))  # (B, T, V)
        return logits[:, prompt_length - 1 : -1]
    return model(**_tail_inputs(input_ids, attention_mask, prompt_length), **shared, use_cache=True).logits


def _check_inputs(caller: str, input_ids: torch.Tensor, prompt_length: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"{caller}: input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if not 0 < prompt_length < input_ids.shape[1]:
        raise ValueError(
            f"{caller}: prompt_length must be in [1, {input_ids.shape[1] - 1}] for sequences of "
            f"{input_ids.shape[1]} tokens (at least one prompt and one completion token), got {prompt_length}"
        )


def _shared_prefix_for(model, input_ids, attention_mask, prompt_length, prefix) -> dict | None:
    """`shared_prefix_cache` of the first P - 1 tokens: the last prompt token goes with the tail, so
    the tail's C outputs are exactly the states that predict the C completion tokens."""
    if prefix is None:
        prefix = prefix_plan(model)
    return shared_prefix_cache(model, input_ids, attention_mask, prompt_length - 1, prefix)


def _tail_inputs(input_ids, attention_mask, prompt_length) -> dict:
    """The forward after the cached first P - 1 tokens: ids and positions of P-1..T-2 (B, C), and
    the mask over everything the tail attends to, cache included (B, T - 1)."""
    positions = position_ids_from_mask(attention_mask)  # (B, T): continue each row's own count
    return {
        "input_ids": input_ids[:, prompt_length - 1 : -1],
        "attention_mask": attention_mask[:, :-1],
        "position_ids": positions[:, prompt_length - 1 : -1],
    }


def _head_logps(
    head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor, temperature: float, plan: LMHeadPlan
) -> torch.Tensor:
    """`linear_logps` with the head's weight and the plan's transform; (B, C, H) -> (B, C)."""

    def fused_forward(states: torch.Tensor) -> torch.Tensor:
        return linear_logps(
            states.to(head.weight.dtype), head.weight, labels, temperature,
            logit_scale=plan.logit_scale, softcap=plan.softcap,
        )

    return run_as_head(head, fused_forward, hidden)


def run_as_head(head: torch.nn.Module, fused_forward, hidden: torch.Tensor):
    """`fused_forward(hidden)`, a computation that reads `head.weight`, run where that weight is whole.

    Under DeepSpeed ZeRO-3 the weight is a partitioned placeholder except while its own module runs
    (ZeRO-3 gathers a module's parameters in its forward hooks and again before its backward), so the
    fused computation is run *as* the head's forward: the hooks gather the full weight for it and for
    its backward, exactly as they would for the plain Linear, and the logits are still never built.
    Tied embeddings need nothing special: the head's weight is the embedding's parameter.
    """
    if not hasattr(head.weight, "ds_id"):  # not partitioned: call directly, no hook machinery
        return fused_forward(hidden)
    head.forward = fused_forward
    try:
        return head(hidden)
    finally:
        del head.forward  # back to the class's Linear.forward


def completion_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    temperature: float,
    *,
    old_logps: torch.Tensor | None,
    ref_logps,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_settings: dict,
    head: LMHeadPlan | None = None,
    prefix: PrefixPlan | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of the completions of (B, T) `input_ids` and its metrics: what
    `policy_loss(completion_logps(...), old_logps, ref_logps(), advantages, mask, **loss_settings)` returns.

    With a fused head plan it is `stable_ops.linear_policy_loss` over the completion hidden states:
    each tile's loss gradient is taken while its logits exist, so forward and backward cost three
    LM-head matmuls (`linear_logps` + `policy_loss` cost four) and the backward only hands back
    stored gradients. `ref_logps` is a callable returning the (B, C) reference log-probs or None,
    called after the transformer's forward, so a reference request still in flight overlaps it.
    """
    _check_inputs("completion_loss", input_ids, prompt_length)
    if head is None:
        head = lm_head_plan(model)
    labels = input_ids[:, prompt_length:]  # (B, C)
    if not head.fused:
        logps = completion_logps(model, input_ids, attention_mask, prompt_length, temperature, head, prefix)
        return policy_loss(logps, old_logps, ref_logps(), advantages, mask, **loss_settings)
    hidden = completion_hidden(model, input_ids, attention_mask, prompt_length, prefix)  # (B, C, H)
    lm_head = model.get_output_embeddings()
    reference = ref_logps()

    def fused_forward(states: torch.Tensor):
        return linear_policy_loss(
            states.to(lm_head.weight.dtype), lm_head.weight, labels, old_logps, reference, advantages, mask,
            temperature=temperature, logit_scale=head.logit_scale, softcap=head.softcap, **loss_settings,
        )

    return run_as_head(lm_head, fused_forward, hidden)


def row_chunks(num_rows: int, row_length: int, max_tokens: int) -> list[slice]:
    """Split rows into consecutive slices of at most `max_tokens` tokens each (at least one row each)."""
    rows = max(1, max_tokens // max(row_length, 1))
    return [slice(i, min(i + rows, num_rows)) for i in range(0, num_rows, rows)]


@torch.inference_mode()
def frozen_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_length: int,
    temperature: float = 1.0,
    max_batch_tokens: int = 1 << 16,
) -> torch.Tensor:
    """Completion log-probs of a model without gradients, (B, T - P) float32 on the CPU, in micro-batches
    of `max_batch_tokens`: the reference server's reference log-probs and a worker's sampling-policy
    (old) log-probs alike."""
    device = next(model.parameters()).device
    head = lm_head_plan(model)
    outputs = []
    for rows in row_chunks(input_ids.shape[0], input_ids.shape[1], max_batch_tokens):
        mask = None if attention_mask is None else attention_mask[rows].to(device)
        out = completion_logps(model, input_ids[rows].to(device), mask, prompt_length, temperature, head)
        outputs.append(out.float().cpu())
    return torch.cat(outputs)  # (B, C)
