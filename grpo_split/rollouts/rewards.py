"""Reward functions for GRPO, with the interface of TRL's GRPOTrainer.

A reward function is `f(prompts, completions, **columns) -> list[float | None]`:
- `prompts`: N prompt strings, the dataset's prompt text, one per completion (a prompt sampled
  G times appears G times);
- `completions`: N decoded completion strings;
- `columns`: every other dataset column as a keyword argument holding a list of N values
  (e.g. `answer=[...]`);
- the result: N values, each a real number or `None` for "cannot score this one" (no gold
  answer, say). A function that does not know a column should accept `**kwargs` and ignore it.

Built-ins (`BUILTIN_REWARDS`): `accuracy` (the model's final answer equals the gold `answer`,
checked with math_verify) and `format` (the completion is laid out as
`<think>...</think><answer>...</answer>`). A user function is named as "package.module:function"
and loaded by `load_reward_funcs`.

`score_completions` calls each function once on the whole batch and combines the results like
TRL: a weighted sum that skips `None`, with NaN for a completion no function could score (the
advantage code gives NaN rewards an advantage of 0). A function that raises or returns something
that is not a list of N real numbers/None stops training with a `RewardFunctionError` naming the
function, the completion it failed on and that completion's prompt, and, when it raised, the
traceback inside the function: a reward bug must never turn silently into a reward of 0.

Input values accepted from reward functions: any `numbers.Real` (int, float, numpy floats) and
`None`; a bool counts as 1.0/0.0, because `pred == gold` is a natural way to write a 0/1 reward and
its meaning is unambiguous; a float NaN is treated like `None`; +-inf, strings and anything else
are errors.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "BUILTIN_REWARDS",
    "MATH_VERIFY_TIMEOUT_S",
    "RewardFunctionError",
    "accuracy_reward",
    "extract_answer",
    "format_reward",
    "load_reward_funcs",
    "score_completions",
]

RewardFunc = Callable[..., Sequence[Any]]

# Seconds math_verify may spend parsing one expression or comparing one pair, when a timeout can be
# used at all (see `_math_verify_timeout`). sympy can take unbounded time on a few inputs (a power
# tower like 9**9**9**9 compared with 9 never finishes), so without a cap one completion could stall
# training.
MATH_VERIFY_TIMEOUT_S = 3

# An extracted answer longer than this is reduced to its last number before math_verify sees it, and
# dropped if even that is longer: math_verify's cost grows with the text, and a final answer is short.
_MAX_ANSWER_CHARS = 1000
_PROMPT_CHARS_IN_ERRORS = 200
# Frames of a reward function's traceback quoted in a RewardFunctionError: the innermost ones, where
# the bug usually is, without burying the message under a deep library stack.
_TRACEBACK_FRAMES_IN_ERRORS = 10

# Full-width ASCII forms (U+FF01..U+FF5E, typed by CJK input methods: "４２", "＜answer＞") map to
# ASCII, and the Unicode minus signs to "-". Deliberately not NFKC: it would also turn "3²" into
# "32", a different number.
_UNICODE_FOLD = {0xFF01 + i: 0x21 + i for i in range(94)} | {0x2212: "-", 0xFE63: "-", 0x3000: " "}

# Linear-time: every quantifier is followed by a character class it cannot also match, so a
# failed match backtracks at most three digits. ASCII digits only, after `_UNICODE_FOLD`, because
# math_verify parses ASCII digits only. A "-" counts as a sign unless it follows a word character
# or ")" (then it is a hyphen or a subtraction: "3-5" yields 3 and 5).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_BOXED = re.compile(r"\\boxed\s*\{")
_IDENTIFIER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable.

    `func_name` is the function's name as configured; `prompt` is the prompt of the completion it
    failed on, or the batch's first prompt when the failure belongs to no single completion (the
    full text; the message holds its first 200 characters).
    """

    def __init__(self, message: str, *, func_name: str, prompt: str | None) -> None:
        super().__init__(message)
        self.func_name = func_name
        self.prompt = prompt


# ---------------------------------------------------------------------------------------------
# Answer extraction (pure string work, linear time on any input)


def _fold_unicode(text: str) -> str:
    return text.translate(_UNICODE_FOLD)


def _last_tag_content(text: str) -> str | None:
    """Content of the last complete `<answer>...</answer>`, or None.

    str.rfind instead of a regex: `<answer>(.*?)</answer>` rescans to the end of the text from every
    unclosed `<answer>`, which is quadratic on a completion that repeats the tag.
    """
    close = text.rfind(_ANSWER_CLOSE)
    if close < 0:
        return None
    open_ = text.rfind(_ANSWER_OPEN, 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(_ANSWER_OPEN) : close]


def _last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces balance (nested braces allowed), or None."""
    starts = [match.end() - 1 for match in _BOXED.finditer(text)]  # index of each "{"
    if not starts:
        return None
    # One pass matching every brace pair, so that many unclosed "\boxed{" cost O(n), not O(n^2).
    closing: dict[int, int] = {}
    stack: list[int] = []
    for index, char in enumerate(text):
        if char == "{":
            stack.append(index)
        elif char == "}" and stack:
            closing[stack.pop()] = index
    for start in reversed(starts):
        if start in closing:
            return text[start + 1 : closing[start]]
    return None


def _last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed ("1,234" -> "1234"), or None."""
    last = deque(_NUMBER.finditer(text), maxlen=1)  # keeps one match object, not all of them
    return last[0].group(0).replace(",", "") if last else None


def extract_answer(completion: str) -> str | None:
    """The model's final answer as text: the last `<answer>` content, else the last `\\boxed{}`
    content, else the last number; None when there is nothing to extract. Full-width characters and
    Unicode minus signs are read as ASCII first; an answer over 1000 characters is cut down to its
    last number (and dropped if that is still over 1000)."""
    text = _fold_unicode(completion)
    candidate = _last_tag_content(text)
    if candidate is None:
        candidate = _last_boxed_content(text)
    candidate = _last_number(text) if candidate is None else candidate.strip()
    if candidate is not None and len(candidate) > _MAX_ANSWER_CHARS:
        candidate = _last_number(candidate)
    if not candidate or len(candidate) > _MAX_ANSWER_CHARS:
        return None
    return candidate


def _gold_text(value: Any) -> str | None:
    """The gold answer as text, None when missing. GSM8K's raw answers end in "#### 72": only the
    part after the last "####" is the answer, the rest is the worked solution."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return None if math.isnan(value) or math.isinf(value) else str(value)
    if not isinstance(value, str):
        return None
    text = _fold_unicode(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    return text or None


# ---------------------------------------------------------------------------------------------
# math_verify


def _math_verify_timeout() -> int | None:
    """The timeout to give math_verify in the calling thread.

    math_verify 0.9 implements its timeout with signal.alarm on POSIX (its `utils.timeout`:
    signal.signal(SIGALRM, ...) + signal.alarm), and signal.signal may only be called from the main
    thread: from any other thread `parse` and `verify` raise ValueError ("Math-Verify doesn't
    support threaded environment ..."). A timeout of None disables the signal handling. So the timeout is on in the
    main thread, where the trainer scores rollouts, and off elsewhere (a server thread, a worker
    pool): there a pathological expression can block that thread, the price of not crashing.
    (In the main thread the alarm replaces any SIGALRM timer the caller had set; math_verify restores
    the handler but not the timer.)
    Off POSIX, math_verify's fallback spawns a process per call, far too slow for a reward, so it is
    off there too.
    """
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    return None


def _parse_math(text: str) -> list[Any]:
    """SymPy objects parsed from an answer text by math_verify; [] when nothing parses.

    Text with LaTeX markers is parsed inside "$...$" first, because math_verify finds LaTeX only
    between delimiters ("\\dfrac12" alone gives nothing); plain text is parsed as is first, because
    "$42 dollars$" would read as the product 42*d*o*l*l*a*r*s. No string fallback: a gold answer
    that does not parse is "cannot score", and a prediction that does not parse is wrong.
    """
    from math_verify import parse  # imported on first use: it pulls in sympy, ~0.5 s

    wrapped = f"${text}$"
    attempts = (wrapped, text) if ("\\" in text or "{" in text) else (text, wrapped)
    timeout = _math_verify_timeout()
    for attempt in attempts:
        parsed = parse(attempt, fallback_mode="no_fallback", parsing_timeout=timeout)
        if parsed:
            return parsed
    return []


# ---------------------------------------------------------------------------------------------
# Built-in reward functions


# An integer as GSM8K and the toy task write them: optional minus, digits, optional thousands commas
# (no "+": math_verify does not parse "+7", and the fast path must give its answers).
# ASCII digits only: \d would also take other scripts' digits, which math_verify does not read.
_PLAIN_INTEGER = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)")


def _plain_integer(text: str | None) -> int | None:
    """The value of a text that is just an integer ("72", "-3", "1,234"), else None."""
    if text is None:
        return None
    text = text.strip()
    if len(text) > 40 or not _PLAIN_INTEGER.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], answer: Sequence[Any] | None = None, **columns: Any
) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold answer, else 0.0.

    The final answer is the content of the last `<answer>...</answer>`, else of the last
    `\\boxed{...}`, else the last number in the text (see `extract_answer`). Equality is
    mathematical, via math_verify: "0.5", "1/2" and "\\frac{1}{2}" are all equal; "1,234" equals
    1234. Full-width digits and the Unicode minus are read as their ASCII forms; other scripts'
    digits are not numbers here.

    Returns None for a completion whose gold answer is missing, empty or unparseable (GSM8K's
    "... #### 72" gives "72"), and 0.0 when the completion holds no extractable answer.
    Raises ValueError when the `answer` column is absent or has the wrong length.
    """
    if answer is None:
        raise ValueError(
            "the accuracy reward needs the gold answers: the dataset's answer column must be passed as `answer` "
            "(set `answer_column` in the config to the dataset column that holds them)"
        )
    if len(answer) != len(completions):
        raise ValueError(f"accuracy reward got {len(answer)} answers for {len(completions)} completions")
    from math_verify import verify  # imported on first use: it pulls in sympy, ~0.5 s

    timeout = _math_verify_timeout()
    # A prompt's G completions share one gold answer: parse it once.
    gold_cache: dict[str, list[Any]] = {}
    rewards: list[float | None] = []
    for completion, gold_value in zip(completions, answer, strict=True):
        gold_text = _gold_text(gold_value)
        if gold_text is None:
            rewards.append(None)
            continue
        predicted_text = extract_answer(completion) if isinstance(completion, str) else None
        gold_int, predicted_int = _plain_integer(gold_text), _plain_integer(predicted_text)
        if gold_int is not None and predicted_int is not None:
            # Two plain integers: exact comparison gives math_verify's answer at a fraction of its
            # cost (~10 ms per sympy parse; a step scores hundreds of completions).
            rewards.append(1.0 if gold_int == predicted_int else 0.0)
            continue
        if gold_text not in gold_cache:
            gold_cache[gold_text] = _parse_math(gold_text)
        gold = gold_cache[gold_text]
        if not gold:
            rewards.append(None)
            continue
        predicted = _parse_math(predicted_text) if predicted_text else []
        # verify(gold, prediction) is not symmetric (math_verify docs): gold goes first.
        correct = bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)
        rewards.append(1.0 if correct else 0.0)
    return rewards


def _has_think_answer_layout(completion: str) -> bool:
    # str methods, no regex: with `.*?` groups a regex backtracks over every repeated tag.
    text = completion.strip()
    tags = (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    if not (text.startswith(_THINK_OPEN) and text.endswith(_ANSWER_CLOSE)):
        return False
    think_close = text.index(_THINK_CLOSE)
    answer_open = text.index(_ANSWER_OPEN)
    if answer_open < think_close:
        return False
    return text[think_close + len(_THINK_CLOSE) : answer_open].strip() == ""


def format_reward(prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float | None]:
    """1.0 when the completion is laid out as `<think>...</think><answer>...</answer>`, else 0.0.

    Whitespace is allowed before, between and after the two parts; any content is allowed inside
    them except the four tags themselves (each tag appears exactly once), and nothing but whitespace
    may follow `</answer>`. The completion must include the opening `<think>`. Never None.
    """
    return [1.0 if isinstance(c, str) and _has_think_answer_layout(c) else 0.0 for c in completions]


BUILTIN_REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


# ---------------------------------------------------------------------------------------------
# Loading and scoring


def _spec_help() -> str:
    return f"use a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) or 'package.module:function'"


def _load_one(spec: str) -> tuple[str, RewardFunc]:
    if ":" not in spec:
        if spec in BUILTIN_REWARDS:
            return spec, BUILTIN_REWARDS[spec]
        raise ValueError(f"reward function {spec!r}: unknown built-in; {_spec_help()}")
    module_name, _, attr_path = spec.partition(":")
    if not (_IDENTIFIER_PATH.fullmatch(module_name) and _IDENTIFIER_PATH.fullmatch(attr_path)):
        raise ValueError(
            f"reward function {spec!r}: malformed spec, expected 'package.module:function' "
            f"(dotted Python names around one ':'); {_spec_help()}"
        )
    try:
        func: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({exc}); "
            f"is it installed or on PYTHONPATH? {_spec_help()}"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(func, part):
            raise ValueError(
                f"reward function {spec!r}: module {module_name!r} has no attribute {attr_path!r}; {_spec_help()}"
            )
        func = getattr(func, part)
    if not callable(func):
        raise ValueError(
            f"reward function {spec!r}: {attr_path!r} is a {type(func).__name__}, not callable; {_spec_help()}"
        )
    return attr_path.rsplit(".", 1)[-1], func


def load_reward_funcs(specs: Sequence[str]) -> list[tuple[str, RewardFunc]]:
    """Resolve reward function specs to (name, function) pairs, in order.

    A spec is a built-in name (`BUILTIN_REWARDS`) or "package.module:function" (imported with
    importlib; "module:Class.method" works too). The name is the built-in's name or the function's
    attribute name; it labels the reward in metrics, so two specs with the same name are an error.
    Raises ValueError naming the spec for an empty list, an unknown built-in, a malformed spec, a
    module that cannot be imported, or an attribute that is missing or not callable.
    """
    if isinstance(specs, str):
        raise ValueError(f"reward function specs must be a list of strings, got the string {specs!r}")
    if not specs:
        raise ValueError(f"no reward functions given; {_spec_help()}, e.g. ['accuracy', 'format']")
    loaded: list[tuple[str, RewardFunc]] = []
    seen: dict[str, str] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"reward function spec {spec!r} is a {type(spec).__name__}, not a string; {_spec_help()}")
        name, func = _load_one(spec.strip())
        if name in seen:
            raise ValueError(
                f"reward function {spec!r}: name {name!r} is already used by {seen[name]!r}; "
                "each reward needs a distinct name for its metrics"
            )
        seen[name] = spec
        loaded.append((name, func))
    return loaded


def _as_list(output: Any) -> list[Any] | None:
    if isinstance(output, (list, tuple)):
        return list(output)
    # numpy arrays and tensors: 1-D ones become lists of Python numbers.
    if hasattr(output, "tolist") and getattr(output, "ndim", None) == 1:
        return output.tolist()
    return None


def _checked_values(name: str, output: Any, prompts: Sequence[str]) -> list[float]:
    """A reward function's output as N floats with NaN for None; RewardFunctionError otherwise.

    An error about one value names that completion's prompt; one about the whole output names the
    first prompt.
    """
    n = len(prompts)
    prompt = prompts[0] if n else None
    values = _as_list(output)
    if values is None:
        raise RewardFunctionError(
            f"reward function {name!r} returned a {type(output).__name__}; expected a list of {n} floats or None",
            func_name=name, prompt=prompt,
        )
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(values)} values for {n} completions",
            func_name=name, prompt=prompt,
        )
    floats: list[float] = []
    for index, value in enumerate(values):
        if value is None:
            floats.append(math.nan)
            continue
        if not isinstance(value, numbers.Real):
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) at index {index}; "
                f"expected a real number or None; prompt: {_shown(prompts[index])}",
                func_name=name, prompt=prompts[index],
            )
        number = float(value)
        if math.isinf(number):
            raise RewardFunctionError(
                f"reward function {name!r} returned {number} at index {index}; rewards must be finite "
                f"(return None for a completion it cannot score); prompt: {_shown(prompts[index])}",
                func_name=name, prompt=prompts[index],
            )
        floats.append(number)  # NaN stays NaN: "cannot score", like None
    return floats


def score_completions(
    reward_funcs: Sequence[tuple[str, RewardFunc]],
    weights: Sequence[float] | None,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, list[Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score N completions with F reward functions.

    Each function is called once, as `func(prompts=..., completions=..., **columns)`; only when
    that call raises is it called again, one completion at a time, to find the completion it fails
    on (see `_raised_error`).
    Returns `(rewards, per_func)`: `per_func` (N, F) float32 holds each function's values with NaN
    for None; `rewards` (N,) float32 is the weighted sum over functions skipping NaN (TRL's nansum),
    and NaN where no function could score the completion.

    `weights`: F floats, or None for all 1.0. Raises ValueError for mismatched lengths or weights,
    RewardFunctionError (with the original exception as `__cause__`) when a function raises or
    returns anything but N real numbers/None.
    """
    n, f = len(completions), len(reward_funcs)
    if f == 0:
        raise ValueError(f"no reward functions to score with; {_spec_help()}")
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} completions; pass one prompt per completion")
    for column, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {column!r} has {len(values)} values for {n} completions")
    if weights is None:
        weights = [1.0] * f
    if len(weights) != f:
        names = [name for name, _ in reward_funcs]
        raise ValueError(f"got {len(weights)} reward weights for {f} reward functions {names}")
    if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
        raise ValueError(f"reward weights must be finite numbers, got {list(weights)}")

    per_func = torch.empty(n, f, dtype=torch.float64)  # (N, F)
    for j, (name, func) in enumerate(reward_funcs):
        try:
            output = func(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            raise _raised_error(name, func, exc, prompts, completions, columns) from exc
        per_func[:, j] = torch.tensor(_checked_values(name, output, prompts), dtype=torch.float64)

    weighted = per_func * torch.tensor([float(w) for w in weights], dtype=torch.float64)  # (N, F)
    rewards = torch.nansum(weighted, dim=1)  # (N,)
    rewards[per_func.isnan().all(dim=1)] = math.nan
    return rewards.float(), per_func.float()


def _shown(prompt: str | None) -> str:
    return repr((prompt or "")[:_PROMPT_CHARS_IN_ERRORS])


def _user_traceback(exc: BaseException) -> str:
    """The frames of `exc` below the frame that caught it (the reward function's own), innermost last.

    Formatted at once: calling the function again with the same exception object (a function may
    raise one it keeps) would chain more frames onto its `__traceback__`.
    """
    below_caller = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    frames = traceback.extract_tb(below_caller)
    if not frames:
        return "  (none: the call itself failed; does the function take prompts, completions and **kwargs?)\n"
    skipped = len(frames) - _TRACEBACK_FRAMES_IN_ERRORS
    shown = frames[-_TRACEBACK_FRAMES_IN_ERRORS:] if skipped > 0 else frames
    head = f"  ... {skipped} outer frames left out ...\n" if skipped > 0 else ""
    return head + "".join(traceback.format_list(shown))


def _failing_row(func: RewardFunc, exc: Exception, prompts: Sequence[str], completions: Sequence[str],
                 columns: dict[str, list[Any]]) -> int | None:
    """The first completion that alone makes `func` raise what the whole batch raised, or None.

    Each call gets that row's prompt, completion and column values as lists of one. A row only
    counts when it raises the batch's exception type: a function that fails differently on a
    batch of one (a std over one value, say) must not be blamed on whichever row comes first.
    """
    for index in range(len(completions)):
        try:
            func(prompts=[prompts[index]], completions=[completions[index]],
                 **{column: [values[index]] for column, values in columns.items()})
        except Exception as row_exc:  # whatever it raises is the answer sought; none escapes from here
            if type(row_exc) is type(exc):
                return index
    return None


def _raised_error(name: str, func: RewardFunc, exc: Exception, prompts: Sequence[str],
                  completions: Sequence[str], columns: dict[str, list[Any]]) -> RewardFunctionError:
    """The error for a reward function whose batch call raised `exc`: which completion, its prompt, where.

    The trainer prints only this message and exits, so it carries the prompt and the traceback
    inside the user's function itself. Finding the completion costs up to N more calls, on a path
    that ends the run anyway.
    """
    where = _user_traceback(exc)
    original_traceback = exc.__traceback__
    n = len(completions)
    row = _failing_row(func, exc, prompts, completions, columns)
    exc.with_traceback(original_traceback)  # undo frames a re-raise of the same object chained on
    if row is None:
        prompt = prompts[0] if n else None
        what = (f"on the batch of {n} completions, though on none of them alone; "
                f"first prompt: {_shown(prompt)}")
    else:
        prompt = prompts[row]
        what = f"on completion {row} of {n}, prompt: {_shown(prompt)}"
    return RewardFunctionError(
        f"reward function {name!r} raised {type(exc).__name__}: {exc} {what}\n"
        f"traceback inside the reward function (most recent call last):\n{where.rstrip()}",
        func_name=name, prompt=prompt,
    )
