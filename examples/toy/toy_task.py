"""The toy task: a GRPO problem that a tiny random model learns in minutes on a CPU.

Each prompt names one digit among a few words, and the answer is that digit:

    prompt:  "copy the digit 7"        answer: "7"        wanted completion: "<answer>7</answer>"

Why this task: the demo and the end-to-end test need a reward that visibly rises within a few
minutes on two CPU cores, starting from random weights. A random model with the 74-token toy
vocabulary (examples/toy/make_toy_model.py) earns some reward (an `<answer>` tag now and then, the right
digit one time in ten), which gives GRPO the reward variance within a group that it needs. It
first learns the answer layout (tens of steps), then which digit to copy from the prompt (a
transformer's easiest skill, yet one that takes a few hundred steps of GRPO's noisy signal).

Two reward functions exercise the real reward interface (TRL's `f(prompts, completions,
**columns) -> list[float | None]`), for a total reward from 0 to 2:
  - the project's built-in `accuracy`: the last `<answer>` content, else the last number of the
    completion, compared with the `answer` column;
  - `answer_format_reward` below, loaded as `examples.toy.toy_task:answer_format_reward`:
    partial credit on the way to exactly `<answer>...</answer>`, a dense signal a random model
    earns often.

The words of every prompt are fixed (`VOCABULARY_TEXT`), so a toy tokenizer trained on them
covers every dataset `make_examples` can produce, whatever the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Bumped whenever the prompts, answers or vocabulary change, so cached toy models are rebuilt.
TASK_VERSION = 1

DIGITS = "0123456789"
# The completion tags the rewards look for; the toy tokenizer gives each one a single token.
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Prompt templates; {d} is the answer digit. Several wordings so the model must find the digit
# rather than learn one fixed position.
TEMPLATES = (
    "copy the digit {d}",
    "copy {d} please",
    "the digit is {d}",
    "{d} is the digit to copy",
)
# Words of the chat template (roles) that the toy tokenizer must also know.
CHAT_WORDS = ("system", "user", "assistant")

_WORD_RE = re.compile(r"[a-z]+")


def _vocabulary_text() -> str:
    words = sorted({w for t in TEMPLATES for w in _WORD_RE.findall(t.format(d=""))} | set(CHAT_WORDS))
    return " ".join([*words, *DIGITS])


# Every word and digit a prompt can contain (the tags are separate: the toy tokenizer gives each
# one a single token of its own), for training the toy tokenizer.
VOCABULARY_TEXT = _vocabulary_text()


def make_examples(num: int, seed: int = 0) -> list[dict[str, str]]:
    """`num` toy examples `{"prompt": str, "answer": str}`; the same (num, seed) always gives the same list.

    Digits and templates are drawn uniformly with a private `random.Random(seed)`, so the global
    random state is untouched.
    """
    if num < 0:
        raise ValueError(f"make_examples: num must be >= 0, got {num}")
    rng = random.Random(seed)
    examples = []
    for _ in range(num):
        digit = rng.choice(DIGITS)
        template = rng.choice(TEMPLATES)
        examples.append({"prompt": template.format(d=digit), "answer": digit})
    return examples


def write_jsonl(path: str | Path, examples: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (the layout `datasets.load_dataset("json", ...)` reads); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def completion_text(completion: str | Sequence[dict[str, str]]) -> str:
    """A completion as text: a string as is, a conversational completion (list of messages) as its last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict) \
            and "content" in completion[-1]:
        return str(completion[-1]["content"])
    raise TypeError(
        f"completion must be a string or a list of chat messages with 'content', got {type(completion).__name__}"
    )


def answer_format_score(text: str) -> float:
    """Partial credit on the way to exactly `<answer>...</answer>`: 0.25 for each of four checks.

    The checks: the completion has an `<answer>` tag; nothing but whitespace comes before the
    first one; a `</answer>` follows it; nothing but whitespace follows that `</answer>`. Each
    check is one more token in the right place, so GRPO has a gradient to follow long before
    the whole format is ever sampled. What stands between the tags is the correctness reward's
    business: crediting "an integer" here too would reinforce whichever digit the first
    well-formed completions happened to hold, and the policy collapses onto it before it can
    learn to copy the right one.
    """
    start = text.find("<answer>")
    if start < 0:
        return 0.0
    score = 0.5 if not text[:start].strip() else 0.25
    end = text.find("</answer>", start + len("<answer>"))
    if end >= 0:
        score += 0.25
        if not text[end + len("</answer>") :].strip():
            score += 0.25
    return score


def answer_format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """TRL-style reward: `answer_format_score` of each completion (0, 0.25, 0.5, 0.75 or 1.0).

    Load it in a config as `examples.toy.toy_task:answer_format_reward`. `prompts` and the
    dataset `columns` are not needed; they are accepted because every reward function gets them.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"answer_format_reward: {len(prompts)} prompts but {len(completions)} completions")
    return [answer_format_score(completion_text(c)) for c in completions]
