"""The wire format: exact round trips, one rejection test per rule, size caps, and a fuzz of hostile bodies."""

import dataclasses
import io
import json
import math
import pathlib
import pickle
import random

import pytest
import safetensors.torch
import torch

from grpo_split.contract.batch import (
    MAX_HEADER_BYTES,
    ROLLOUT_FIELDS,
    Batch,
    BatchTooLarge,
    WireFormatError,
    decode_batch,
    encode_batch,
    validate_batch,
)

VOCAB = 128
B, T, P = 4, 10, 4  # batch size, sequence length, prompt length
C = T - P  # completion length


def full_batch(seed: int = 0) -> Batch:
    """A batch with every field set, including float values that a lossy encoding would change."""
    gen = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(B, T, dtype=torch.int64)
    attention_mask[0, :2] = 0  # a left-padded prompt
    completion_mask = torch.ones(B, C, dtype=torch.int64)
    completion_mask[1, 3:] = 0  # a completion that stopped early
    old_logps = -5 * torch.rand(B, C, generator=gen)
    old_logps[0, :3] = torch.tensor([-1e30, -0.0, -1e-45])  # huge, negative zero, subnormal
    return Batch(
        input_ids=torch.randint(0, VOCAB, (B, T), generator=gen),
        prompt_length=P,
        attention_mask=attention_mask,
        rewards=torch.tensor([1.0, -0.0, 1e-45, 3.4e38]),
        advantages=torch.randn(B, generator=gen),
        old_logps=old_logps,
        completion_mask=completion_mask,
        ref_logps=-5 * torch.rand(B, C, generator=gen),
        policy_version=7,
        num_generations=2,
        batch_id="queue-00042_a",
        temperature=0.7,
        scored=torch.tensor([1, 0, 1, 1]),  # row 1 no reward function could score: its reward is (-)0
    )


def minimal_batch() -> Batch:
    return Batch(input_ids=torch.arange(B * T).view(B, T) % VOCAB, prompt_length=P)


def bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its bit pattern, so -0.0 != 0.0 and every NaN payload counts."""
    return x.view(torch.int32)


def assert_same_batch(decoded: Batch, original: Batch) -> None:
    for field in dataclasses.fields(Batch):
        got, want = getattr(decoded, field.name), getattr(original, field.name)
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), field.name
            if want.is_floating_point():
                assert got.dtype == torch.float32 and torch.equal(bits(got), bits(want)), field.name
            else:
                assert got.dtype == torch.int64 and torch.equal(got, want.to(torch.int64)), field.name
        else:
            assert got == want and type(got) is type(want), field.name


# ---- round trips --------------------------------------------------------------------------------


def test_round_trip_every_field_is_exact():
    batch = full_batch()
    decoded = decode_batch(encode_batch(batch), vocab_size=VOCAB, require_rollout=True)
    assert_same_batch(decoded, batch)
    assert (decoded.batch_size, decoded.seq_len, decoded.completion_length) == (B, T, C)


def test_round_trip_without_optional_fields():
    batch = minimal_batch()
    decoded = decode_batch(encode_batch(batch))
    assert_same_batch(decoded, batch)
    assert decoded.attention_mask is None and decoded.rewards is None and decoded.batch_id is None
    assert decoded.scored is None
    assert decoded.temperature == 1.0


def test_scored_round_trips_as_uint8_and_decodes_to_int64():
    batch = dataclasses.replace(full_batch(), scored=torch.tensor([True, False, True, True]))
    body = encode_batch(batch)
    assert safetensors.torch.load(body)["scored"].dtype == torch.uint8
    decoded = decode_batch(body, require_rollout=True)
    assert decoded.scored.dtype == torch.int64 and decoded.scored.tolist() == [1, 0, 1, 1]
    assert bits(decoded.rewards)[1].item() == bits(torch.tensor(-0.0)).item()  # the unscored row's reward, as sent
    # Every row unscored is a valid batch too (all of a step's completions failed to parse, say).
    nobody = dataclasses.replace(full_batch(), rewards=torch.zeros(B), scored=torch.zeros(B, dtype=torch.int64))
    assert decode_batch(encode_batch(nobody)).scored.tolist() == [0] * B


def test_batches_from_senders_without_scored_decode_as_all_scored():
    # What an older sender puts on the wire: the same body with no `scored` tensor and the same format.
    body = body_with(drop=("scored",))
    assert "scored" not in split_body(body)[0] and valid_metadata()["format"] == "grpo-batch/1"
    decoded = decode_batch(body, vocab_size=VOCAB, require_rollout=True)
    assert decoded.scored is None
    assert_same_batch(decoded, dataclasses.replace(full_batch(), scored=None))


def test_per_function_rewards_round_trip_with_nan_for_none():
    per_func = torch.tensor([[1.0, float("nan")], [0.0, 0.5], [float("nan"), float("nan")], [2.0, -1.0]])
    batch = dataclasses.replace(full_batch(), reward_per_func=per_func)
    decoded = decode_batch(encode_batch(batch), require_rollout=True)
    assert torch.equal(bits(decoded.reward_per_func), bits(per_func))  # NaN where a function returned None
    assert decode_batch(encode_batch(full_batch())).reward_per_func is None  # optional, as for older senders


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(B), "shape must be"),
    (torch.zeros(B + 1, 2), "shape must be"),
    (torch.zeros(B, 0), "shape must be"),
    (torch.zeros(B, 2, dtype=torch.float64), "dtype must be float32"),
    (torch.tensor([[float("inf"), 0.0]] * B), "finite or NaN"),
])
def test_per_function_rewards_are_validated(bad, message):
    with pytest.raises(WireFormatError, match=message):
        validate_batch(dataclasses.replace(full_batch(), reward_per_func=bad))


def test_ids_travel_as_int32_when_they_fit_and_int64_otherwise():
    body = encode_batch(full_batch())
    wire = safetensors.torch.load(body)
    assert wire["input_ids"].dtype == torch.int32
    assert wire["attention_mask"].dtype == wire["completion_mask"].dtype == wire["scored"].dtype == torch.uint8

    big = minimal_batch()
    big.input_ids[0, 0] = 2**31  # does not fit int32
    body = encode_batch(big)
    assert safetensors.torch.load(body)["input_ids"].dtype == torch.int64
    decoded = decode_batch(body)
    assert decoded.input_ids[0, 0].item() == 2**31 and torch.equal(decoded.input_ids, big.input_ids)


def test_validate_normalizes_dtypes_and_leaves_the_input_alone():
    batch = dataclasses.replace(
        full_batch(),
        input_ids=full_batch().input_ids.to(torch.int32),
        attention_mask=torch.ones(B, T, dtype=torch.bool),
        completion_mask=torch.ones(B, C, dtype=torch.int32),
        temperature=2,
    )
    checked = validate_batch(batch)
    assert checked.input_ids.dtype == checked.attention_mask.dtype == checked.completion_mask.dtype == torch.int64
    assert checked.temperature == 2.0 and type(checked.temperature) is float
    assert batch.input_ids.dtype == torch.int32 and batch.attention_mask.dtype == torch.bool
    decoded = decode_batch(encode_batch(batch))
    assert decoded.input_ids.dtype == torch.int64 and torch.equal(decoded.input_ids, batch.input_ids.long())


def test_encode_accepts_shared_and_non_contiguous_tensors():
    # rewards and advantages as rows of one tensor, ref_logps the very tensor old_logps is (beta = 0),
    # and a transposed (non-contiguous) view: safetensors refuses all three unless encode copies.
    stats = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.5, -0.5, 0.5, -0.5]])
    logps = -torch.rand(C, B).t()
    batch = dataclasses.replace(full_batch(), rewards=stats[0], advantages=stats[1], old_logps=logps, ref_logps=logps)
    assert_same_batch(decode_batch(encode_batch(batch)), batch)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64])
def test_decode_accepts_masks_of_other_integer_dtypes(dtype):
    wire = safetensors.torch.load(encode_batch(full_batch()))
    wire["attention_mask"] = wire["attention_mask"].to(dtype)
    decoded = decode_batch(safetensors.torch.save(wire, metadata=valid_metadata()))
    assert decoded.attention_mask.dtype == torch.int64
    assert torch.equal(decoded.attention_mask, full_batch().attention_mask)


def test_repr_shows_shapes_not_values():
    text = repr(full_batch())
    assert "input_ids=<(4, 10) int64>" in text and "policy_version=7" in text and "tensor(" not in text


# ---- helpers that build bodies no honest encoder would send -------------------------------------


def split_body(body: bytes) -> tuple[dict, bytes]:
    """Body -> (header as a dict, data section)."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]), body[8 + n :]


def frame(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    """8-byte little-endian header length (the true one unless `declared`), header, data."""
    return (len(header) if declared is None else declared).to_bytes(8, "little") + header + data


def join_body(header: dict, data: bytes) -> bytes:
    return frame(json.dumps(header).encode(), data)


def valid_metadata() -> dict:
    return split_body(encode_batch(full_batch()))[0]["__metadata__"]


def body_with(tensors: dict | None = None, metadata: dict | None = None, drop: tuple = ()) -> bytes:
    """A well-framed safetensors body: the full batch's wire tensors and metadata, edited."""
    wire = safetensors.torch.load(encode_batch(full_batch()))
    meta = valid_metadata()
    wire.update(tensors or {})
    meta.update(metadata or {})
    for name in drop:
        wire.pop(name, None)
        meta.pop(name, None)
    return safetensors.torch.save(wire, metadata=meta)


def edit_header(edit) -> bytes:
    """The full batch's body with its JSON header changed in place by `edit(header)`; same data section."""
    header, data = split_body(encode_batch(full_batch()))
    edit(header)
    return join_body(header, data)


# ---- one rejection per rule: Python-side batches ------------------------------------------------

nan_rewards = torch.tensor([1.0, math.nan, 0.0, 0.0])
zero_row_mask = torch.ones(B, T, dtype=torch.int64)
zero_row_mask[2] = 0

VALIDATE_CASES = [
    ({"input_ids": torch.zeros(B, T)}, r"input_ids: dtype must be int32 or int64, got torch.float32"),
    ({"input_ids": torch.zeros(B, T, dtype=torch.int16)}, r"input_ids: dtype must be int32 or int64"),
    ({"input_ids": [[1, 2, 3]]}, r"input_ids: must be a torch.Tensor, got list"),
    ({"input_ids": torch.zeros(T, dtype=torch.int64)}, r"input_ids: must be 2-D \(B, T\), got shape \(10,\)"),
    ({"input_ids": torch.zeros(0, T, dtype=torch.int64)}, r"input_ids: needs B >= 1 rows of T >= 2 tokens"),
    ({"input_ids": torch.zeros(B, 1, dtype=torch.int64), "prompt_length": 1}, r"input_ids: needs B >= 1 .* T >= 2"),
    ({"input_ids": torch.full((B, T), -3)}, r"input_ids: token ids must be >= 0, got min -3"),
    ({"prompt_length": 0}, r"prompt_length: must be >= 1, got 0"),
    ({"prompt_length": -2}, r"prompt_length: must be >= 1, got -2"),
    ({"prompt_length": T}, r"prompt_length: must be less than T=10 .*, got 10"),
    ({"prompt_length": 2.5}, r"prompt_length: must be an int, got float 2.5"),
    ({"prompt_length": True}, r"prompt_length: must be an int, got bool"),
    ({"attention_mask": torch.ones(B, T - 1, dtype=torch.int64)}, r"attention_mask: shape must be \(B, T\) = \(4, 10"),
    ({"attention_mask": torch.full((B, T), 2)}, r"attention_mask: values must be 0 or 1, got 2"),
    ({"attention_mask": torch.ones(B, T)}, r"attention_mask: dtype must be an integer or bool .*torch.float32"),
    ({"attention_mask": zero_row_mask}, r"attention_mask: row 2 attends to no token"),
    ({"completion_mask": torch.ones(B, T, dtype=torch.int64)}, r"completion_mask: shape must be \(B, T-P\) = \(4, 6\)"),
    ({"completion_mask": -torch.ones(B, C, dtype=torch.int64)}, r"completion_mask: values must be 0 or 1, got -1"),
    ({"rewards": torch.zeros(B, dtype=torch.float64)}, r"rewards: dtype must be float32, got torch.float64"),
    ({"rewards": torch.zeros(B + 1)}, r"rewards: shape must be \(B,\) = \(4,\), got \(5,\)"),
    ({"rewards": nan_rewards}, r"rewards: values must be finite, got 1 NaN and 0 infinite; score or drop"),
    ({"advantages": torch.tensor([0.0, math.inf, -math.inf, 0.0])}, r"advantages: .* got 0 NaN and 2 infinite"),
    ({"advantages": torch.zeros(B, 1)}, r"advantages: shape must be \(B,\)"),
    ({"old_logps": torch.zeros(B, C + 1)}, r"old_logps: shape must be \(B, T-P\) = \(4, 6\), got \(4, 7\)"),
    ({"old_logps": torch.full((B, C), math.nan)}, r"old_logps: values must be finite, got 24 NaN"),
    ({"old_logps": torch.zeros(B, C, dtype=torch.float16)}, r"old_logps: dtype must be float32, got torch.float16"),
    ({"ref_logps": torch.full((B, C), -math.inf)}, r"ref_logps: values must be finite, got 0 NaN and 24 infinite"),
    ({"scored": torch.ones(B + 1, dtype=torch.int64)}, r"scored: shape must be \(B,\) = \(4,\), got \(5,\)"),
    ({"scored": torch.ones(B, 1, dtype=torch.int64)}, r"scored: shape must be \(B,\) = \(4,\), got \(4, 1\)"),
    ({"scored": torch.tensor([1, 2, 1, 1])}, r"scored: values must be 0 or 1, got 2"),
    ({"scored": torch.tensor([1, -1, 1, 1])}, r"scored: values must be 0 or 1, got -1"),
    ({"scored": torch.ones(B)}, r"scored: dtype must be an integer or bool \(values 0/1\), got torch.float32"),
    ({"scored": [1, 0, 1, 1]}, r"scored: must be a torch.Tensor, got list"),
    ({"scored": torch.tensor([1, 1, 0, 1])}, r"rewards: row 2 is unscored \(scored\[2\] == 0\) but carries reward "
                                             r"1.4012\d*e-45; an unscored completion must carry reward 0"),
    ({"policy_version": -1}, r"policy_version: must be >= 0, got -1"),
    ({"policy_version": "3"}, r"policy_version: must be an int, got str '3'"),
    ({"num_generations": 0}, r"num_generations: must be >= 1, got 0"),
    ({"num_generations": 3}, r"num_generations: must divide the batch size B=4 .*, got 3"),
    ({"batch_id": ""}, r"batch_id: must be 1..128 characters of \[A-Za-z0-9_-\], got ''"),
    ({"batch_id": "a b"}, r"batch_id: must be 1..128 characters"),
    ({"batch_id": "x" * 129}, r"batch_id: must be 1..128 characters"),
    ({"batch_id": "abc\n"}, r"batch_id: must be 1..128 characters"),
    ({"batch_id": 5}, r"batch_id: must be 1..128 characters"),
    ({"temperature": 0.0}, r"temperature: must lie in \[0.0001, 10000\] .*, got 0.0"),
    ({"temperature": -1.0}, r"temperature: must lie in \[0.0001, 10000\]"),
    ({"temperature": math.nan}, r"temperature: must lie in .*, got nan"),
    ({"temperature": math.inf}, r"temperature: must lie in .*, got inf"),
    # Positive but so small that logits / T overflow float32 (NaN log-probs), or flattens any model to uniform.
    ({"temperature": 1e-39}, r"temperature: must lie in \[0.0001, 10000\] .*overflow.*, got 1e-39"),
    ({"temperature": 9e-5}, r"temperature: must lie in"),
    ({"temperature": 1.5e4}, r"temperature: must lie in"),
    ({"temperature": "1.0"}, r"temperature: must be a float, got str"),
    ({"temperature": True}, r"temperature: must be a float, got bool"),
]


@pytest.mark.parametrize("changes, match", VALIDATE_CASES)
def test_validate_rejects(changes, match):
    batch = dataclasses.replace(full_batch(), **changes)
    with pytest.raises(WireFormatError, match=match):
        validate_batch(batch)
    with pytest.raises(WireFormatError, match=match):
        encode_batch(batch)  # encode validates first


def test_ids_outside_the_vocabulary_are_rejected():
    batch = full_batch()
    batch.input_ids[1, 5] = 500
    validate_batch(batch)  # no vocabulary given: any id >= 0 is fine
    match = r"input_ids: token ids must lie in \[0, 128\) \(the model's vocabulary\), got min \d+ max 500"
    with pytest.raises(WireFormatError, match=match):
        validate_batch(batch, vocab_size=VOCAB)
    with pytest.raises(WireFormatError, match=match):
        decode_batch(encode_batch(batch), vocab_size=VOCAB)
    validate_batch(full_batch(), vocab_size=VOCAB)


@pytest.mark.parametrize("name", ROLLOUT_FIELDS)
def test_require_rollout_names_each_field_a_trainer_needs(name):
    """An upload without any one of them would be accepted and then fail in the trainer."""
    batch = dataclasses.replace(full_batch(), **{name: None})
    with pytest.raises(WireFormatError, match=rf"^{name}: required for a rollout upload \(missing: {name}\)"):
        validate_batch(batch, require_rollout=True)
    with pytest.raises(WireFormatError, match=rf"^{name}: required"):
        decode_batch(encode_batch(batch), require_rollout=True)
    validate_batch(batch)  # fine for /logps, which needs none of them


def test_require_rollout_lists_everything_missing():
    with pytest.raises(WireFormatError, match=r"rewards: required .*missing: rewards, advantages, completion_mask, "
                                              r"old_logps, policy_version, num_generations"):
        validate_batch(minimal_batch(), require_rollout=True)
    decode_batch(encode_batch(full_batch()), require_rollout=True)


def test_bad_caps_from_the_caller_are_a_plain_value_error_not_a_400():
    for kwargs in ({"vocab_size": 0}, {"max_tokens": -1}, {"vocab_size": 12.0}):
        with pytest.raises(ValueError, match=r"must be a positive int or None") as info:
            validate_batch(full_batch(), **kwargs)
        assert not isinstance(info.value, WireFormatError)
    with pytest.raises(TypeError, match=r"decode_batch: expected bytes, got str"):
        decode_batch("not bytes")


# ---- one rejection per rule: bodies ------------------------------------------------------------

WIRE_CASES = [
    ({"values": torch.zeros(B)}, {}, (), r"'values': unknown tensor; a batch carries only input_ids, "),
    ({}, {"note": "hi"}, (), r"'note': unknown metadata key"),
    ({}, {"format": "grpo-batch/2"}, (), r"format: the body was sent as 'grpo-batch/2' but this side speaks "
                                         r"'grpo-batch/1'"),
    ({}, {"format": "grpo-batch/1 "}, (), r"format: the body was sent as 'grpo-batch/1 '"),
    ({}, {}, ("format",), r"format: missing"),
    ({}, {}, ("prompt_length",), r"prompt_length: missing"),
    ({}, {}, ("input_ids",), r"input_ids: missing"),
    ({}, {"prompt_length": "3.5"}, (), r"prompt_length: must be an integer .*, got '3.5'"),
    ({}, {"prompt_length": "abc"}, (), r"prompt_length: must be an integer"),
    ({}, {"prompt_length": ""}, (), r"prompt_length: must be an integer"),
    ({}, {"prompt_length": " 4"}, (), r"prompt_length: must be an integer"),
    ({}, {"prompt_length": "+4"}, (), r"prompt_length: must be an integer"),
    ({}, {"prompt_length": "1e1"}, (), r"prompt_length: must be an integer"),
    ({}, {"prompt_length": "9" * 40}, (), r"prompt_length: must be an integer of at most 19"),
    ({}, {"prompt_length": "0"}, (), r"prompt_length: must be >= 1, got 0"),
    ({}, {"prompt_length": "-1"}, (), r"prompt_length: must be >= 1, got -1"),
    ({}, {"prompt_length": str(T)}, (), r"prompt_length: must be less than T=10"),
    ({}, {"prompt_length": str(T + 5)}, (), r"prompt_length: must be less than T=10"),
    ({}, {"policy_version": "-1"}, (), r"policy_version: must be >= 0"),
    ({}, {"policy_version": "v3"}, (), r"policy_version: must be an integer"),
    ({}, {"num_generations": "3"}, (), r"num_generations: must divide the batch size B=4"),
    ({}, {"num_generations": "0"}, (), r"num_generations: must be >= 1"),
    ({}, {"temperature": "abc"}, (), r"temperature: must be a decimal number, got 'abc'"),
    ({}, {"temperature": "nan"}, (), r"temperature: must be a decimal number"),
    ({}, {"temperature": "inf"}, (), r"temperature: must be a decimal number"),
    ({}, {"temperature": "0"}, (), r"temperature: must lie in"),
    ({}, {"temperature": "-1.0"}, (), r"temperature: must lie in"),
    ({}, {"temperature": "1e400"}, (), r"temperature: must lie in .*, got inf"),
    ({}, {"temperature": "1e-39"}, (), r"temperature: must lie in .*, got 1e-39"),
    ({}, {"batch_id": "a/b"}, (), r"batch_id: must be 1..128 characters"),
    ({"input_ids": torch.zeros(B, T, dtype=torch.int16)}, {}, (), r"input_ids: dtype 'I16' is not one this format"),
    ({"input_ids": torch.zeros(B, T)}, {}, (), r"input_ids: dtype must be int32 or int64, got torch.float32"),
    ({"input_ids": torch.zeros(B, T, dtype=torch.uint8)}, {}, (), r"input_ids: dtype must be int32 or int64"),
    ({"input_ids": torch.zeros(B, T, 1, dtype=torch.int32)}, {}, (), r"input_ids: shape must be a list of at most 2"),
    ({"input_ids": torch.zeros(T, dtype=torch.int32)}, {}, (), r"input_ids: must be 2-D"),
    ({"input_ids": torch.full((B, T), VOCAB, dtype=torch.int32)}, {}, (), r"input_ids: token ids must lie in \[0, 128"),
    ({"input_ids": torch.full((B, T), -1, dtype=torch.int32)}, {}, (), r"input_ids: token ids must lie in \[0, 128"),
    ({"rewards": torch.zeros(B, dtype=torch.float64)}, {}, (), r"rewards: dtype must be float32, got torch.float64"),
    ({"rewards": torch.zeros(B, dtype=torch.float16)}, {}, (), r"rewards: dtype must be float32, got torch.float16"),
    ({"rewards": torch.zeros(B, dtype=torch.bfloat16)}, {}, (), r"rewards: dtype must be float32, got torch.bfloat16"),
    ({"rewards": torch.zeros(B, 1)}, {}, (), r"rewards: shape must be \(B,\)"),
    ({"rewards": torch.zeros(B + 1)}, {}, (), r"rewards: shape must be \(B,\) = \(4,\), got \(5,\)"),
    ({"rewards": nan_rewards}, {}, (), r"rewards: values must be finite, got 1 NaN"),
    ({"old_logps": torch.zeros(B - 1, C)}, {}, (), r"old_logps: shape must be \(B, T-P\) = \(4, 6\), got \(3, 6\)"),
    ({"ref_logps": torch.zeros(B, C, dtype=torch.int32)}, {}, (), r"ref_logps: dtype must be float32"),
    ({"attention_mask": torch.ones(B, T + 1, dtype=torch.uint8)}, {}, (), r"attention_mask: shape must be \(B, T\)"),
    ({"attention_mask": torch.full((B, T), 7, dtype=torch.uint8)}, {}, (), r"attention_mask: values must be 0 or 1"),
    ({"completion_mask": torch.ones(B, C)}, {}, (), r"completion_mask: dtype must be an integer or bool"),
    ({"scored": torch.full((B,), 7, dtype=torch.uint8)}, {}, (), r"scored: values must be 0 or 1, got 7"),
    ({"scored": torch.ones(B, 1, dtype=torch.uint8)}, {}, (), r"scored: shape must be \(B,\)"),
    ({"scored": torch.ones(B)}, {}, (), r"scored: dtype must be an integer or bool"),
    ({"scored": torch.zeros(B, dtype=torch.uint8)}, {}, (), r"rewards: row 0 is unscored .* carries reward 1.0"),
]


@pytest.mark.parametrize("tensors, metadata, drop, match", WIRE_CASES)
def test_decode_rejects(tensors, metadata, drop, match):
    with pytest.raises(WireFormatError, match=match):
        decode_batch(body_with(tensors, metadata, drop), vocab_size=VOCAB)


def set_entry(name: str, key: str, value):
    return lambda header: header[name].__setitem__(key, value)


def bool_mask_with_byte_2() -> bytes:
    # A BOOL tensor whose byte is 2: not a value an honest sender can produce, undefined to torch.
    header, data = split_body(encode_batch(full_batch()))
    start = header["attention_mask"]["data_offsets"][0]
    header["attention_mask"]["dtype"] = "BOOL"
    return join_body(header, data[:start] + b"\x02" + data[start + 1 :])


def lone_surrogate_metadata() -> bytes:
    # Python's json accepts an unpaired surrogate escape; the safetensors parser does not.
    header, data = split_body(encode_batch(full_batch()))
    text = json.dumps(header).replace('"queue-00042_a"', '"\\ud800"')
    assert "\\ud800" in text
    return frame(text.encode(), data)


def header_cases() -> list[tuple[str, bytes, str]]:
    """(name, body, expected message) for the framing and header rules."""
    valid = encode_batch(full_batch())
    header, data = split_body(valid)
    text = json.dumps(header).encode()
    big_header = text + b" " * (MAX_HEADER_BYTES + 1 - len(text))
    return [
        ("empty", b"", r"body: 0 bytes is too short"),
        ("seven bytes", b"\x02\x00\x00\x00\x00\x00\x00", r"body: 7 bytes is too short"),
        ("declared 2**63", frame(text, data, declared=2**63), r"header: declares 9223372036854775808 bytes but only"),
        ("declared past end", frame(text, data, declared=len(text) + len(data) + 1), r"header: declares \d+ bytes"),
        ("header over cap", frame(big_header), r"header: \d+ bytes exceeds the cap of 1048576"),
        ("declared 1", frame(b"{", b"}"), r"header: declares 1 bytes; a JSON object needs at least 2"),
        ("not utf-8", frame(b'{"\xff": 1}'), r"header: not UTF-8"),
        ("not json", frame(b"{'a': 1}"), r"header: not valid JSON"),
        ("json array", frame(b"[1, 2]"), r"header: must be a JSON object, got list"),
        ("NaN constant", frame(b'{"input_ids": NaN}'), r"header: NaN is not JSON"),
        ("duplicate key", frame(b'{"rewards": 1, "rewards": 2}'), r"header: key 'rewards' appears twice"),
        ("deep nesting", frame(b"[" * 100_000), r"header: JSON nested too deeply"),
        ("huge int", frame(b'{"a": ' + b"9" * 5000 + b"}"), r"header: integer of 5000 digits"),
        ("no metadata", frame(b'{"__metadata__": {}}'), r"format: missing"),
        ("metadata not str", edit_header(lambda h: h["__metadata__"].__setitem__("prompt_length", 4)),
         r"__metadata__: must be an object of string keys to string values"),
        ("metadata a list", edit_header(lambda h: h.__setitem__("__metadata__", ["format"])), r"__metadata__: must be"),
        ("extra entry key", edit_header(set_entry("rewards", "extra", 1)),
         r"rewards: header entry must have exactly dtype, shape and data_offsets"),
        ("entry not object", edit_header(lambda h: h.__setitem__("rewards", [1, 2])), r"rewards: header entry must"),
        ("unknown dtype", edit_header(set_entry("rewards", "dtype", "F8_E4M3")), r"rewards: dtype 'F8_E4M3' is not"),
        ("dtype not str", edit_header(set_entry("rewards", "dtype", 4)), r"rewards: dtype 4 is not one"),
        ("huge shape", edit_header(set_entry("old_logps", "shape", [2**62, 2**62])), r"old_logps: shape must be"),
        ("zero-size huge dim", edit_header(set_entry("rewards", "shape", [0, 2**40])), r"rewards: shape must be"),
        ("negative dim", edit_header(set_entry("rewards", "shape", [-4])), r"rewards: shape must be a list"),
        ("float dim", edit_header(set_entry("rewards", "shape", [4.0])), r"rewards: shape must be a list"),
        ("bool dim", edit_header(set_entry("rewards", "shape", [True])), r"rewards: shape must be a list"),
        ("shape not list", edit_header(set_entry("rewards", "shape", "4")), r"rewards: shape must be a list"),
        ("rank 3", edit_header(set_entry("old_logps", "shape", [B, C, 1])), r"old_logps: shape must be a list"),
        ("offsets past data", edit_header(set_entry("rewards", "data_offsets", [0, 2**64])),
         r"rewards: data_offsets \[0, 18446744073709551616\] run past the end of the \d+-byte data section"),
        ("offsets reversed", edit_header(set_entry("rewards", "data_offsets", [16, 0])), r"must satisfy 0 <= start <="),
        ("negative offset", edit_header(set_entry("rewards", "data_offsets", [-16, 0])), r"must satisfy 0 <= start <="),
        ("offsets not ints", edit_header(set_entry("rewards", "data_offsets", [0.0, 16.0])),
         r"rewards: data_offsets must be \[start, end\] ints"),
        ("three offsets", edit_header(set_entry("rewards", "data_offsets", [0, 8, 16])), r"rewards: data_offsets must"),
        ("size mismatch", edit_header(set_entry("rewards", "shape", [B + 1])),
         r"rewards: data_offsets span 16 bytes but shape \[5\] of F32 needs 20"),
        ("overlap", edit_header(lambda h: h["advantages"].__setitem__("data_offsets", h["rewards"]["data_offsets"])),
         r"tensors must tile the data section without gaps or overlap"),
        ("trailing bytes", valid + b"\x00", r"body: 1 bytes after the last tensor that no tensor claims"),
        ("bool byte 2", bool_mask_with_byte_2(), r"attention_mask: values must be 0 or 1, got 2"),
        ("lone surrogate", lone_surrogate_metadata(), r"body: not a valid safetensors file"),
    ]


@pytest.mark.parametrize("name, body, match", header_cases(), ids=[case[0] for case in header_cases()])
def test_decode_rejects_bad_framing_and_headers(name, body, match):
    with pytest.raises(WireFormatError, match=match) as info:
        decode_batch(body, vocab_size=VOCAB)
    assert (name == "header over cap") == isinstance(info.value, BatchTooLarge)


# ---- size caps ----------------------------------------------------------------------------------


def test_max_bytes_is_checked_before_parsing():
    body = encode_batch(full_batch())
    decode_batch(body, max_bytes=len(body))
    with pytest.raises(BatchTooLarge, match=rf"body: {len(body)} bytes exceeds this server's cap of {len(body) - 1}"):
        decode_batch(body, max_bytes=len(body) - 1)
    # Garbage over the cap is "too large", not "malformed": nothing of it was read.
    with pytest.raises(BatchTooLarge):
        decode_batch(b"\xff" * 100, max_bytes=99)


def test_max_tokens():
    body = encode_batch(full_batch())
    decode_batch(body, max_tokens=B * T)
    match = r"input_ids: B x T = 4 x 10 = 40 tokens exceeds this server's cap of 39"
    with pytest.raises(BatchTooLarge, match=match):
        decode_batch(body, max_tokens=B * T - 1)
    with pytest.raises(BatchTooLarge, match=match):
        validate_batch(full_batch(), max_tokens=B * T - 1)
    assert issubclass(BatchTooLarge, WireFormatError)


# ---- fuzz ---------------------------------------------------------------------------------------


class TouchOnUnpickle:
    """Unpickling this creates a file: the proof that a decoder ran code it was sent."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


def pickle_bodies(marker: pathlib.Path) -> list[tuple[str, bytes]]:
    payload = pickle.dumps(TouchOnUnpickle(marker))
    buffer = io.BytesIO()
    torch.save({"input_ids": torch.zeros(B, T), "x": TouchOnUnpickle(marker)}, buffer)
    return [
        ("pickle", payload),
        ("pickle protocol 0", pickle.dumps(TouchOnUnpickle(marker), protocol=0)),
        ("torch.save", buffer.getvalue()),
        ("pickle behind a length prefix", frame(payload)),
        ("pickle as the data section", frame(json.dumps({"__metadata__": valid_metadata()}).encode(), payload)),
    ]


def wrong_dtype_and_shape_bodies() -> list[tuple[str, bytes]]:
    """Every field with every dtype and several shapes it must not have, each sent as an otherwise valid body."""
    ints = [torch.uint8, torch.int32, torch.int64, torch.bool]
    floats = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    valid_dtypes = {
        "input_ids": [torch.int32, torch.int64],
        "attention_mask": ints,
        "completion_mask": ints,
        "scored": ints,
        **{name: [torch.float32] for name in ("rewards", "advantages", "old_logps", "ref_logps")},
    }
    valid_shapes = {"input_ids": (B, T), "attention_mask": (B, T), "rewards": (B,), "advantages": (B,), "scored": (B,)}
    wrong_shapes = {
        (B, T): [(), (B,), (T, B), (B + 1, T), (B, T + 1), (1, B * T)],
        (B, C): [(), (B,), (C, B), (B - 1, C), (B, C + 1), (B, T)],
        (B,): [(), (B + 1,), (B - 1,), (B, 1), (1, B)],
    }
    bodies = []
    for name, dtypes in valid_dtypes.items():
        shape = valid_shapes.get(name, (B, C))
        for dtype in ints + floats:
            if dtype not in dtypes:
                bodies.append((f"{name} as {dtype}", body_with({name: torch.zeros(shape, dtype=dtype)})))
        for bad in wrong_shapes[shape]:
            bodies.append((f"{name} shaped {bad}", body_with({name: torch.zeros(bad, dtype=dtypes[0])})))
    return bodies


def fuzz_bodies(marker: pathlib.Path) -> list[tuple[str, bytes]]:
    rng = random.Random(20240611)
    valid = encode_batch(full_batch())
    header_len = int.from_bytes(valid[:8], "little")
    bodies: list[tuple[str, bytes]] = []

    for i in range(60):  # random bytes of various lengths
        bodies.append((f"random {i}", rng.randbytes(rng.choice([0, 1, 7, 8, 9, 16, 64, 300, 4096]))))
    for i in range(40):  # a plausible small header length, then random bytes
        size = rng.randrange(2, 200)
        bodies.append((f"random header {i}", frame(rng.randbytes(size), rng.randbytes(rng.randrange(0, 64)))))
    alphabet = '{}[]":, 0123456789-.eEabcdefIFU_NaN'
    for i in range(40):  # random text made of JSON's own characters
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(2, 120))).encode()
        bodies.append((f"json-ish {i}", frame(text, rng.randbytes(rng.randrange(0, 32)))))

    for cut in range(0, len(valid), 7):  # truncations of a valid body
        bodies.append((f"truncated at {cut}", valid[:cut]))
    bodies += [("one byte extra", valid + b"\x00"), ("one space extra", valid + b" ")]

    structural = [i for i in range(8, 8 + header_len) if valid[i : i + 1] in (b"{", b"}", b'"', b":", b",", b"[")]
    for _ in range(60):  # valid framing, corrupted JSON
        pos = rng.choice(structural)
        junk = rng.choice([b"#", b"\xff", b"\x00", b"'"])
        bodies.append((f"corrupt json at {pos}", valid[:pos] + junk + valid[pos + 1 :]))
    for _ in range(10):  # a byte inserted into the header without fixing its declared length
        pos = rng.randrange(9, 8 + header_len)
        bodies.append((f"inserted at {pos}", valid[:pos] + b"x" + valid[pos:]))

    header, data = split_body(valid)
    for declared in (2**63, 2**64 - 1, MAX_HEADER_BYTES + 1, len(valid) - 7, 0, 1):  # lying header lengths
        bodies.append((f"declared {declared}", frame(json.dumps(header).encode(), data, declared=declared)))

    bodies += [(name, body) for name, body, _ in header_cases()]
    bodies += [(f"wire case {i}", body_with(*case[:3])) for i, case in enumerate(WIRE_CASES)]
    bodies += wrong_dtype_and_shape_bodies()
    for prompt_length in ("0", str(T), "-1", "2.5", "", "4.0", "0x4", "٤"):  # P out of range or not an int
        bodies.append((f"prompt_length {prompt_length!r}", body_with(metadata={"prompt_length": prompt_length})))
    bodies += pickle_bodies(marker)
    return bodies


def test_fuzz_every_malformed_body_is_a_wire_format_error_and_nothing_runs(tmp_path):
    # The payload is live: unpickled, it really creates its file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchOnUnpickle(control)))
    assert control.exists()

    marker = tmp_path / "marker"
    bodies = fuzz_bodies(marker)
    assert len(bodies) >= 300
    accepted = []
    for name, body in bodies:
        try:
            decode_batch(body, vocab_size=VOCAB)
        except WireFormatError:
            continue
        accepted.append(name)
    assert not accepted, f"decoded without error: {accepted}"
    assert not marker.exists(), "a pickle payload was executed"

    batch = full_batch()
    assert_same_batch(decode_batch(encode_batch(batch), vocab_size=VOCAB), batch)
