"""The wire format: the one place a rollout batch becomes bytes and bytes become a batch again.

The trainer, the generation workers and the reference server exchange batches over HTTP as the
bytes of a safetensors file: named tensors plus a string->string metadata header carrying
`"format": "grpo-batch/1"` and the scalars (prompt length, policy version, ...). Never pickle:
unpickling runs whatever code the sender chose (the public simple_GRPO project's reference server
unpickles `torch.load` bodies on a port bound to 0.0.0.0).

Everything that arrives is checked before use, and every rejection is a `WireFormatError` that
names the field and says what is wrong, so a server can answer 400 with a message a user can
act on (`BatchTooLarge`, a subclass, is the 413 case). Decoding is safe on any bytes: the
header is parsed here, with bounded sizes, before the safetensors library sees the body, so a
hostile or truncated body costs at most one pass over bytes already in memory.

On the wire:
- `input_ids` travel as int32 when every id fits (half the bytes; real vocabularies are far
  below 2**31) and int64 otherwise; both decode to int64.
- masks travel as uint8: one byte per position, and unlike BOOL every byte value is a defined
  integer, so a stray 2 is caught by the 0/1 check instead of being undefined behaviour.
  int32/int64/bool masks from other senders are accepted too; all decode to int64.
- `scored` (optional, (B,)) is a 0/1 flag per completion, 1 where at least one reward function
  could score it; it travels and decodes like the masks (uint8 on the wire, int64 after decode,
  so it indexes and multiplies like them). Rewards must be finite, so an unscored completion
  carries reward 0 and `scored` says that 0 is no score at all, for reward means that leave it
  out. A batch without it (every batch from an older sender) means all scored. It is optional
  within "grpo-batch/1", so old batches still decode; a receiver older than the field rejects a
  batch that carries it as an unknown tensor, loudly.
- `reward_per_func` (optional, (B, F)) holds each reward function's own value for each
  completion, float32, NaN where that function returned None (could not score it); the trainer
  logs `rewards/<function>/mean` from it for batches generation workers sent. F is the number of
  reward functions, in the order of the run's `reward_funcs`.
- rewards, advantages and log-probs are float32, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

FORMAT_VERSION = "grpo-batch/1"
# Cap on the JSON header we parse. A real header is a few hundred bytes (eight tensors, six
# scalars); the cap keeps a hostile declared length from costing more than a fixed small amount.
MAX_HEADER_BYTES = 1 << 20

TENSOR_FIELDS = (
    "input_ids", "attention_mask", "rewards", "scored", "advantages", "old_logps", "completion_mask", "ref_logps",
    "reward_per_func",
)
# What a trainer needs of a queued rollout batch, so what `require_rollout` (an upload) requires.
ROLLOUT_FIELDS = ("rewards", "advantages", "completion_mask", "old_logps", "policy_version", "num_generations")
# Sampling temperatures a batch may carry. Log-probs are of logits / temperature: below ~1e-36 that
# overflows float32 and turns the log-probs into NaN, and long before that the softmax is one-hot to
# the last bit, so 1e-4 is as greedy as sampling gets; above 1e4 any model's logits are flattened to
# a uniform distribution to within float32 rounding. Outside the range is a bug on the sender's side.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4
METADATA_KEYS = ("format", "prompt_length", "policy_version", "num_generations", "batch_id", "temperature")

# Bytes per element of the safetensors dtypes we recognise in a header. F16/BF16/F64 are never
# valid for any field; they are recognised so that the field rules can reject them with a dtype
# message ("rewards: dtype must be float32 ...") rather than a generic "unknown dtype".
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# No dimension of a real batch comes near this; the cap keeps a hostile shape away from integer
# overflow in the safetensors parser (a zero-size tensor could otherwise declare any other dim).
_MAX_DIM = 2**31 - 1
# Decimal digits in the longest JSON integer we parse; enough for any 64-bit offset.
_MAX_INT_CHARS = 20

_ID_DTYPES = (torch.int32, torch.int64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_INT_TEXT = re.compile(r"-?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


class WireFormatError(ValueError):
    """A body or a batch field is malformed; the message names the field and what is wrong."""


class BatchTooLarge(WireFormatError):
    """A body, header or batch exceeds a size cap (a server answers 413)."""


@dataclass(eq=False, repr=False)
class Batch:
    """One batch of rollouts: B sequences of T tokens, the first P of them the prompt.

    `eq=False` because the fields are tensors: the generated `==` would ask a tensor for its
    truth value and raise. `validate_batch` states and checks the rules of every field.
    """

    input_ids: torch.Tensor  # (B, T) int64 after decode: prompt (left-padded) then completion (right-padded)
    prompt_length: int  # P: input_ids[:, :P] is the prompt; 0 < P < T
    attention_mask: torch.Tensor | None = None  # (B, T) 0/1; None means all ones
    rewards: torch.Tensor | None = None  # (B,) float32, finite: 0 where `scored` is 0
    advantages: torch.Tensor | None = None  # (B,) float32
    old_logps: torch.Tensor | None = None  # (B, T-P) float32
    completion_mask: torch.Tensor | None = None  # (B, T-P) 0/1
    ref_logps: torch.Tensor | None = None  # (B, T-P) float32, added by the reference server
    policy_version: int | None = None  # >= 0: the policy weights the completions were sampled with
    num_generations: int | None = None  # >= 1 and divides B: completions per prompt, consecutive
    batch_id: str | None = None  # set by the server's queue; 1..128 chars of [A-Za-z0-9_-]
    temperature: float = 1.0  # in [MIN_TEMPERATURE, MAX_TEMPERATURE]; reference log-probs are of logits / temperature
    # (B,) 0/1, int64 after decode: 1 where at least one reward function scored the completion;
    # None means all scored. Where 0, rewards (if set) must be 0. Added last, so that a positional
    # construction written before it still means what it did.
    scored: torch.Tensor | None = None
    # (B, F) float32: each reward function's value, NaN where it returned None; None if not sent.
    reward_per_func: torch.Tensor | None = None
    # Never on the wire: the lease under which GET /get delivered this batch (its X-Lease-Id header),
    # set by `RefServerClient.get`; an ack or dead letter of the batch must name it.
    lease: str | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def completion_length(self) -> int:
        return self.seq_len - self.prompt_length

    def __repr__(self) -> str:
        # Shapes, not values: a batch holds thousands of numbers and ends up in logs.
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                parts.append(f"{f.name}=<{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}>")
            elif value is not None:
                parts.append(f"{f.name}={value!r}")
        return f"Batch({', '.join(parts)})"


# ---- validation ---------------------------------------------------------------------------------


def validate_batch(
    batch: Batch, *, vocab_size: int | None = None, max_tokens: int | None = None, require_rollout: bool = False
) -> Batch:
    """Check every field of `batch`; return a copy with ids and masks as int64 (the input is not changed).

    `vocab_size`: ids must lie in [0, vocab_size). `max_tokens`: B * T must not exceed it
    (BatchTooLarge). `require_rollout`: the batch must be a scored rollout, as a queue upload
    is: rewards or advantages, policy_version and num_generations. `scored`, when present, is a
    (B,) 0/1 mask like the others, and rewards must be exactly 0 where it is 0 (a consumer that
    ignores `scored` then sees what it saw before the field existed). Raises WireFormatError.
    """
    if not isinstance(batch, Batch):
        raise TypeError(f"validate_batch: expected a Batch, got {type(batch).__name__}")
    _check_cap_argument("vocab_size", vocab_size)
    _check_cap_argument("max_tokens", max_tokens)

    ids = _check_input_ids(batch.input_ids, max_tokens)  # (B, T) int64
    num_rows, seq_len = ids.shape
    prompt_length = _check_int("prompt_length", batch.prompt_length, minimum=1)
    if prompt_length >= seq_len:
        raise WireFormatError(
            f"prompt_length: must be less than T={seq_len} (input_ids holds prompt then at least one completion "
            f"token), got {prompt_length}"
        )
    _check_id_range(ids, vocab_size)
    completion_shape = (num_rows, seq_len - prompt_length)

    attention_mask = None
    if batch.attention_mask is not None:
        attention_mask = _check_mask("attention_mask", batch.attention_mask, (num_rows, seq_len), "(B, T)")
        if not attention_mask.any(dim=1).all():
            row = int((~attention_mask.any(dim=1)).nonzero()[0, 0])
            raise WireFormatError(f"attention_mask: row {row} attends to no token; every row needs at least one 1")
    completion_mask = None
    if batch.completion_mask is not None:
        completion_mask = _check_mask("completion_mask", batch.completion_mask, completion_shape, "(B, T-P)")
    for name in ("rewards", "advantages"):
        _check_float(name, getattr(batch, name), (num_rows,))
    scored = None
    if batch.scored is not None:
        scored = _check_mask("scored", batch.scored, (num_rows,), "(B,)")
        if batch.rewards is not None:
            _check_unscored_rewards(batch.rewards, scored)
    for name in ("old_logps", "ref_logps"):
        _check_float(name, getattr(batch, name), completion_shape)
    _check_reward_per_func(batch.reward_per_func, num_rows)

    if batch.policy_version is not None:
        _check_int("policy_version", batch.policy_version, minimum=0)
    if batch.num_generations is not None:
        generations = _check_int("num_generations", batch.num_generations, minimum=1)
        if num_rows % generations:
            raise WireFormatError(
                f"num_generations: must divide the batch size B={num_rows} (each prompt's completions are "
                f"consecutive), got {generations}"
            )
    if batch.batch_id is not None:
        if not isinstance(batch.batch_id, str) or not _BATCH_ID.fullmatch(batch.batch_id):
            raise WireFormatError(f"batch_id: must be 1..128 characters of [A-Za-z0-9_-], got {_short(batch.batch_id)}")
    temperature = _check_temperature(batch.temperature)

    if require_rollout:
        missing = [name for name in ROLLOUT_FIELDS if getattr(batch, name) is None]
        if missing:
            raise WireFormatError(
                f"{missing[0]}: required for a rollout upload (missing: {', '.join(missing)}); a trainer needs "
                "all of " + ", ".join(ROLLOUT_FIELDS) + ": generation workers must send complete scored rollouts "
                "with the policy version they sampled with"
            )

    return dataclasses.replace(
        batch,
        input_ids=ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        scored=scored,
        temperature=temperature,
    )


def _check_cap_argument(name: str, value: int | None) -> None:
    """The caller's own limits: a bad one is a bug on the receiving side, not bad input, so not a 400."""
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise WireFormatError(f"{name}: must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise WireFormatError(f"{name}: must be a dense tensor, got layout {value.layout}")
    return value


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise WireFormatError(f"{name}: shape must be {what} = {shape}, got {tuple(tensor.shape)}")


def _check_input_ids(ids, max_tokens: int | None) -> torch.Tensor:
    """Dtype, rank and size of input_ids (not yet the values, so the size cap comes before any scan)."""
    ids = _check_tensor("input_ids", ids)
    if ids.dtype not in _ID_DTYPES:
        raise WireFormatError(f"input_ids: dtype must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 2:
        raise WireFormatError(f"input_ids: must be 2-D (B, T), got shape {tuple(ids.shape)}")
    num_rows, seq_len = ids.shape
    if num_rows < 1 or seq_len < 2:
        raise WireFormatError(
            f"input_ids: needs B >= 1 rows of T >= 2 tokens (a prompt and a completion), got shape {tuple(ids.shape)}"
        )
    if max_tokens is not None and num_rows * seq_len > max_tokens:
        raise BatchTooLarge(
            f"input_ids: B x T = {num_rows} x {seq_len} = {num_rows * seq_len} tokens exceeds this server's cap of "
            f"{max_tokens}; send smaller batches"
        )
    return ids.to(torch.int64)


def _check_id_range(ids: torch.Tensor, vocab_size: int | None) -> None:
    lowest, highest = (int(v) for v in torch.aminmax(ids))
    if vocab_size is not None and (lowest < 0 or highest >= vocab_size):
        raise WireFormatError(
            f"input_ids: token ids must lie in [0, {vocab_size}) (the model's vocabulary), "
            f"got min {lowest} max {highest}"
        )
    if lowest < 0:
        raise WireFormatError(f"input_ids: token ids must be >= 0, got min {lowest}")


def _check_mask(name: str, mask, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A 0/1 mask of the given shape (`what` names it in errors, e.g. "(B, T)"), as int64."""
    mask = _check_tensor(name, mask)
    if mask.dtype not in _MASK_DTYPES:
        raise WireFormatError(f"{name}: dtype must be an integer or bool (values 0/1), got {mask.dtype}")
    _check_shape(name, mask, shape, what)
    # The raw bytes of a bool tensor: one decoded from a body may hold any byte value.
    values = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    lowest, highest = (int(v) for v in torch.aminmax(values)) if values.numel() else (0, 0)
    if lowest < 0 or highest > 1:
        raise WireFormatError(f"{name}: values must be 0 or 1, got {lowest if lowest < 0 else highest}")
    return values.to(torch.int64)


def _check_float(name: str, tensor, shape: tuple[int, ...]) -> None:
    """An optional float32 tensor of the given shape with finite values."""
    if tensor is None:
        return
    tensor = _check_tensor(name, tensor)
    if tensor.dtype != torch.float32:
        raise WireFormatError(
            f"{name}: dtype must be float32, got {tensor.dtype}; convert with .float() before sending"
        )
    _check_shape(name, tensor, shape, "(B,)" if len(shape) == 1 else "(B, T-P)")
    finite = torch.isfinite(tensor)
    if not finite.all():
        num_nan = int(torch.isnan(tensor).sum())
        hint = "; score or drop a rollout before uploading it" if name == "rewards" else ""
        raise WireFormatError(
            f"{name}: values must be finite, got {num_nan} NaN and {int((~finite).sum()) - num_nan} infinite{hint}"
        )


def _check_reward_per_func(tensor, num_rows: int) -> None:
    """Optional (B, F) float32, F >= 1; NaN means "that function could not score it", +-inf is an error."""
    if tensor is None:
        return
    tensor = _check_tensor("reward_per_func", tensor)
    if tensor.dtype != torch.float32:
        raise WireFormatError(f"reward_per_func: dtype must be float32, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[0] != num_rows or tensor.shape[1] < 1:
        raise WireFormatError(f"reward_per_func: shape must be (B, F) = ({num_rows}, number of reward functions), "
                              f"got {tuple(tensor.shape)}")
    if torch.isinf(tensor).any():
        raise WireFormatError("reward_per_func: values must be finite or NaN (NaN: the function returned None)")


def _check_unscored_rewards(rewards: torch.Tensor, scored: torch.Tensor) -> None:
    """Rewards (already checked: float32, (B,), finite) are 0 wherever `scored` is 0."""
    stray = (scored.to(rewards.device) == 0) & (rewards != 0)  # (B,); -0.0 counts as 0
    if stray.any():
        row = int(stray.nonzero()[0, 0])
        raise WireFormatError(
            f"rewards: row {row} is unscored (scored[{row}] == 0) but carries reward {float(rewards[row])!r}; "
            "an unscored completion must carry reward 0"
        )


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int subclass; True as a prompt length is a bug, not a 1.
    if type(value) is not int:
        raise WireFormatError(f"{name}: must be an int, got {type(value).__name__} {_short(value)}")
    if value < minimum:
        raise WireFormatError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireFormatError(f"temperature: must be a float, got {type(value).__name__} {_short(value)}")
    value = float(value)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:  # also False for NaN
        raise WireFormatError(
            f"temperature: must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (logits are divided by it; "
            f"outside that range the log-probs overflow or carry no information), got {value}"
        )
    return value


def _short(value, limit: int = 60) -> str:
    """repr of a value, cut short: error messages echo what a client sent and must stay small."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ---- encode -------------------------------------------------------------------------------------


def encode_batch(batch: Batch) -> bytes:
    """Validate `batch` (no vocabulary check) and serialize it to safetensors bytes; see the module docstring."""
    batch = validate_batch(batch)
    ids = batch.input_ids
    ids_dtype = torch.int32 if int(ids.max()) <= torch.iinfo(torch.int32).max else torch.int64
    tensors = {"input_ids": ids.detach().to("cpu", ids_dtype)}
    for name in ("attention_mask", "completion_mask", "scored"):
        if getattr(batch, name) is not None:
            tensors[name] = getattr(batch, name).detach().to("cpu", torch.uint8)
    for name in ("rewards", "advantages", "old_logps", "ref_logps", "reward_per_func"):
        if getattr(batch, name) is not None:
            tensors[name] = getattr(batch, name).detach().cpu()
    tensors = _own_storage(tensors)

    metadata = {"format": FORMAT_VERSION, "prompt_length": str(batch.prompt_length)}
    for name in ("policy_version", "num_generations", "batch_id"):
        if getattr(batch, name) is not None:
            metadata[name] = str(getattr(batch, name))
    metadata["temperature"] = repr(batch.temperature)  # repr round-trips a float exactly
    return safetensors.torch.save(tensors, metadata=metadata)


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that share no storage: safetensors refuses to save tensors that do.

    Sharing happens innocently (rewards and advantages as two rows of one stats tensor, or
    ref_logps passed as old_logps when beta = 0); only those get copied.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
            pointer = tensor.untyped_storage().data_ptr()
        seen.add(pointer)
        out[name] = tensor
    return out


# ---- decode -------------------------------------------------------------------------------------


def decode_batch(
    data: bytes,
    *,
    vocab_size: int | None = None,
    max_bytes: int | None = None,
    max_tokens: int | None = None,
    require_rollout: bool = False,
) -> Batch:
    """Parse and validate a body from `encode_batch` (or any sender); raises WireFormatError on anything else.

    `max_bytes` caps the body size and is checked before any parsing; `vocab_size`,
    `max_tokens` and `require_rollout` are passed to `validate_batch`. Safe on any bytes: see
    `_read_header` for the checks made before the safetensors library reads the body.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_batch: expected bytes, got {type(data).__name__}")
    _check_cap_argument("max_bytes", max_bytes)
    if max_bytes is not None and len(data) > max_bytes:
        raise BatchTooLarge(
            f"body: {len(data)} bytes exceeds this server's cap of {max_bytes} bytes; send smaller batches"
        )
    data = bytes(data)

    metadata = _read_header(data)
    scalars = _parse_metadata(metadata)
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as exc:
        raise WireFormatError(f"body: not a valid safetensors file: {exc}") from exc
    if "input_ids" not in tensors:
        raise WireFormatError("input_ids: missing; every batch carries its token ids")
    batch = Batch(**tensors, **scalars)
    return validate_batch(batch, vocab_size=vocab_size, max_tokens=max_tokens, require_rollout=require_rollout)


def _read_header(data: bytes) -> dict[str, str]:
    """Check the safetensors framing and header of `data`; return its metadata.

    Layout: an 8-byte little-endian header length n, n bytes of UTF-8 JSON, then the data
    section. Every tensor entry must be one of ours, with a known dtype, a shape of at most two
    dims and offsets whose size matches the shape; together the tensors must tile the data
    section exactly (the rule safetensors itself enforces). Checked here first so that no length
    or shape a client declares reaches an allocation, and so errors name the field.
    """
    if len(data) < 8:
        raise WireFormatError(
            f"body: {len(data)} bytes is too short for a safetensors file (8-byte header length, then the header)"
        )
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise WireFormatError(
            f"header: declares {header_len} bytes but only {len(data) - 8} follow the length prefix "
            "(truncated body, or not a safetensors file)"
        )
    if header_len > MAX_HEADER_BYTES:
        raise BatchTooLarge(f"header: {header_len} bytes exceeds the cap of {MAX_HEADER_BYTES} bytes")
    if header_len < 2:
        raise WireFormatError(f"header: declares {header_len} bytes; a JSON object needs at least 2")
    try:
        text = data[8 : 8 + header_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"header: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        header = json.loads(
            text, object_pairs_hook=_unique_keys, parse_int=_bounded_int, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"header: not valid JSON ({exc.msg} at char {exc.pos})") from exc
    except RecursionError as exc:
        raise WireFormatError("header: JSON nested too deeply; a safetensors header is two levels deep") from exc
    if not isinstance(header, dict):
        raise WireFormatError(f"header: must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireFormatError("__metadata__: must be an object of string keys to string values")
    buffer_len = len(data) - 8 - header_len
    spans = sorted((*_check_entry(name, info, buffer_len), name) for name, info in header.items())
    position = 0
    for start, end, name in spans:
        if start != position:
            raise WireFormatError(
                f"{name}: data_offsets start at {start} but the previous tensor ends at {position}; tensors must "
                "tile the data section without gaps or overlap"
            )
        position = end
    if position != buffer_len:
        raise WireFormatError(f"body: {buffer_len - position} bytes after the last tensor that no tensor claims")
    return metadata


def _check_entry(name: str, info, buffer_len: int) -> tuple[int, int]:
    """One tensor entry of the header -> its (start, end) offsets within the data section."""
    if name not in TENSOR_FIELDS:
        raise WireFormatError(f"{_short(name)}: unknown tensor; a batch carries only {', '.join(TENSOR_FIELDS)}")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        raise WireFormatError(f"{name}: header entry must have exactly dtype, shape and data_offsets, got {keys}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise WireFormatError(f"{name}: dtype {_short(dtype)} is not one this format uses ({', '.join(_ITEMSIZE)})")
    if not (isinstance(shape, list) and len(shape) <= 2 and all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape)):
        raise WireFormatError(f"{name}: shape must be a list of at most 2 ints in [0, {_MAX_DIM}], got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise WireFormatError(f"{name}: data_offsets must be [start, end] ints, got {_short(offsets)}")
    start, end = offsets
    if not 0 <= start <= end:
        raise WireFormatError(f"{name}: data_offsets {_short(offsets)} must satisfy 0 <= start <= end")
    if end > buffer_len:
        raise WireFormatError(
            f"{name}: data_offsets {_short(offsets)} run past the end of the {buffer_len}-byte data section "
            "(truncated body?)"
        )
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - start != expected:
        raise WireFormatError(
            f"{name}: data_offsets span {end - start} bytes but shape {shape} of {dtype} needs {expected}"
        )
    return start, end


def _is_int(value) -> bool:
    return type(value) is int  # not bool, not float


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a repeated key is an error, not "last one wins" (parsers disagree on which wins)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise WireFormatError(f"header: key {_short(key)} appears twice")
        out[key] = value
    return out


def _bounded_int(text: str) -> int:
    # Python refuses int() of more than 4,300 digits with a bare ValueError; no offset needs 21.
    if len(text) > _MAX_INT_CHARS:
        raise WireFormatError(f"header: integer of {len(text)} digits; offsets and shapes fit in {_MAX_INT_CHARS}")
    return int(text)


def _reject_constant(text: str):
    raise WireFormatError(f"header: {text} is not JSON (Python's json accepts it, safetensors does not)")


def _parse_metadata(metadata: dict[str, str]) -> dict:
    """The string metadata -> Batch keyword arguments, parsed strictly ("3" is an int, "3.5" is not)."""
    unknown = sorted(set(metadata) - set(METADATA_KEYS))
    if unknown:
        raise WireFormatError(
            f"{_short(unknown[0])}: unknown metadata key; a batch carries only {', '.join(METADATA_KEYS)}"
        )
    sent = metadata.get("format")
    if sent is None:
        raise WireFormatError(f"format: missing; a batch must declare \"format\": {FORMAT_VERSION!r}")
    if sent != FORMAT_VERSION:
        raise WireFormatError(
            f"format: the body was sent as {_short(sent)} but this side speaks {FORMAT_VERSION!r}; "
            "run the same version of grpo_split on the trainer, workers and server"
        )
    if "prompt_length" not in metadata:
        raise WireFormatError("prompt_length: missing; the metadata must say how many tokens of input_ids are prompt")
    out: dict = {"prompt_length": _parse_int("prompt_length", metadata["prompt_length"])}
    for name in ("policy_version", "num_generations"):
        if name in metadata:
            out[name] = _parse_int(name, metadata[name])
    if "batch_id" in metadata:
        out["batch_id"] = metadata["batch_id"]
    if "temperature" in metadata:
        text = metadata["temperature"]
        if not _FLOAT_TEXT.fullmatch(text):
            raise WireFormatError(f"temperature: must be a decimal number, got {_short(text)}")
        out["temperature"] = float(text)
    return out


def _parse_int(name: str, text: str) -> int:
    if not _INT_TEXT.fullmatch(text):
        raise WireFormatError(f"{name}: must be an integer of at most 19 decimal digits, got {_short(text)}")
    return int(text)
