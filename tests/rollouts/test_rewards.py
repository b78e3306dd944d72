"""Reward functions: the built-ins on hand-written completions, spec loading, and scoring."""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback

import pytest
import torch

from grpo_split.rollouts import rewards
from grpo_split.rollouts.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    accuracy_reward,
    extract_answer,
    format_reward,
    load_reward_funcs,
    score_completions,
)


def accuracy(completions: list[str], answers: list) -> list[float | None]:
    return accuracy_reward(["prompt"] * len(completions), completions, answer=answers)


def fmt(completions: list[str]) -> list[float | None]:
    return format_reward(["prompt"] * len(completions), completions)


# ---------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>6*12</think><answer>72</answer>", "72"),
        ("<answer> 1 </answer> then <answer>\n72\n</answer> trailing 5", "72"),  # the last tag wins over numbers
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
        ("\\boxed{7} then an unclosed \\boxed{8", "7"),  # the last balanced one
        ("\\boxed {9}", "9"),
        ("<answer>\\boxed{3}</answer> \\boxed{4}", "\\boxed{3}"),  # the tag comes before \boxed
        ("She has 3 apples, then 1,234.5 apples.", "1234.5"),
        ("12 minus 15 is -3.", "-3"),
        ("ranges 3-5", "5"),  # a hyphen after a digit is not a sign
        ("values 1,2,3", "3"),  # a list, not a thousands separator
        ("答案是 ４２", "42"),  # full-width digits
        ("x = −3", "-3"),  # U+2212 minus sign
        ("no digits here", None),
        ("", None),
        ("<answer>   </answer>", None),
        ("<answer>", None),  # unclosed: falls back to the (absent) number
        ("</answer> 5 <answer>", "5"),  # tags in the wrong order
        ("\\boxed{", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_overlong_answers_are_cut_down_or_dropped():
    essay = "<answer>" + "because " * 200 + "the total is 72</answer>"
    assert extract_answer(essay) == "72"
    assert extract_answer("the answer is " + "1" * 5000) is None  # no real final answer has 5000 digits


# ---------------------------------------------------------------------------------------------
# accuracy


def test_accuracy_right_and_wrong_answers():
    completions = [
        "<think>6 * 12 = 72</think><answer>72</answer>",
        "<think>6 * 12</think><answer>71</answer>",
        "The answer is \\boxed{72}.",
        "I think 70, no wait: 72",
        "I think 72, no wait: 70",
        "I cannot tell.",
    ]
    assert accuracy(completions, ["72"] * 6) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_gsm8k_gold_answers():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    completions = ["<answer>72</answer>", "<answer>24</answer>", "<answer>1,234</answer>", "<answer>1234</answer>"]
    assert accuracy(completions, [gold, gold, "#### 1,234", "####1234"]) == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("gold", ["1/2", "\\frac{1}{2}", "0.5", "$\\frac12$"])
def test_accuracy_fractions_and_decimals_are_equivalent(gold):
    completions = [
        "<answer>0.5</answer>",
        "<answer>\\frac{1}{2}</answer>",
        "<answer>\\dfrac12</answer>",
        "\\boxed{\\frac{1}{2}}",
        "<answer>2/4</answer>",
        "<answer>0.25</answer>",
        "<answer>\\frac{1}{3}</answer>",
    ]
    assert accuracy(completions, [gold] * len(completions)) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_numeric_forms():
    completions = ["<answer>72.0</answer>", "<answer>−3</answer>", "<answer>-3</answer>", "<answer>3</answer>"]
    assert accuracy(completions, [72, "-3", "−3", "-3"]) == [1.0, 1.0, 1.0, 0.0]


def test_accuracy_unicode():
    completions = [
        "答案是 42",  # the last number
        "<answer>４２</answer>",  # full-width digits read as ASCII
        "最终答案：＜answer＞42＜/answer＞",  # full-width tag brackets too
        "<answer>٤٢</answer>",  # Arabic-Indic digits: not read as a number, so wrong, not a crash
        "<answer>🙂</answer>",
        "<answer>四十二</answer>",
    ]
    assert accuracy(completions, ["42"] * len(completions)) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_accuracy_malformed_completions_score_zero():
    completions = ["", "<answer></answer>", "<answer>", "</answer>", "\\boxed{", "\\boxed{}", "<think>", "}}}{{{",
                   "<answer>\\frac{</answer>", "<answer>???</answer>"]
    assert accuracy(completions, ["5"] * len(completions)) == [0.0] * len(completions)


def test_accuracy_is_none_without_a_usable_gold_answer():
    golds = [None, "", "   ", "#### ", "???", math.nan, True, ["5"], "5"]
    assert accuracy(["<answer>5</answer>"] * len(golds), golds) == [None] * 8 + [1.0]


def test_accuracy_needs_the_answer_column():
    with pytest.raises(ValueError, match="answer_column"):
        accuracy_reward(["p"], ["<answer>1</answer>"])
    with pytest.raises(ValueError, match="2 answers for 1 completions"):
        accuracy_reward(["p"], ["<answer>1</answer>"], answer=["1", "2"])


def test_accuracy_ignores_other_columns():
    assert accuracy_reward(["p"], ["<answer>3</answer>"], answer=["3"], difficulty=["hard"]) == [1.0]


def test_accuracy_off_the_main_thread_runs_without_signal_timeout():
    # math_verify's timeout uses signal.alarm, which raises ValueError outside the main thread.
    results: dict[str, object] = {}

    def work() -> None:
        results["timeout"] = rewards._math_verify_timeout()
        results["scores"] = accuracy(["<answer>\\frac{1}{2}</answer>", "<answer>3</answer>"], ["0.5", "4"])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == {"timeout": None, "scores": [1.0, 0.0]}
    assert rewards._math_verify_timeout() == rewards.MATH_VERIFY_TIMEOUT_S


def test_accuracy_times_out_on_a_pathological_expression_in_the_main_thread(monkeypatch):
    # sympy never finishes comparing this power tower with 9; the signal timeout cuts it off.
    monkeypatch.setattr(rewards, "MATH_VERIFY_TIMEOUT_S", 1)
    start = time.monotonic()
    assert accuracy(["<answer>9**9**9**9</answer>"], ["9"]) == [0.0]
    assert time.monotonic() - start < 10


ADVERSARIAL = [
    "<answer>" * 12_500,
    "</answer><answer>" * 6_000,
    "\\boxed{" * 14_000,
    "\\boxed{" * 7_000 + "}" * 7_000,
    "{" * 100_000,
    "1," * 50_000,
    "-" * 50_000 + "1" * 50_000,
    "<think>" * 7_000 + "</think>" * 6_000,
    "<think>" + "a" * 100_000 + "</think><answer>" + "b" * 100_000,
]


def test_builtins_are_fast_on_adversarial_inputs():
    start = time.monotonic()
    acc = accuracy(ADVERSARIAL, ["5"] * len(ADVERSARIAL))
    form = fmt(ADVERSARIAL)
    assert time.monotonic() - start < 10
    assert acc == [0.0] * len(ADVERSARIAL)
    assert form == [0.0] * len(ADVERSARIAL)


# ---------------------------------------------------------------------------------------------
# format


@pytest.mark.parametrize(
    "completion",
    [
        "<think>6*12</think><answer>72</answer>",
        "  \n<think>\nmultiply\n</think>\n\n<answer>\n72\n</answer>\n ",
        "<think></think><answer></answer>",
        "<think>a < b and 答案</think> <answer>x</answer>",
    ],
)
def test_format_accepts_the_layout(completion):
    assert fmt([completion]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "72",
        "<answer>72</answer>",  # no think
        "<think>x</think>",  # no answer
        "<think>x</think><answer>72</answer> and more",  # text after </answer>
        "so: <think>x</think><answer>72</answer>",  # text before <think>
        "<think>x</think> so <answer>72</answer>",  # text between the parts
        "<answer>72</answer><think>x</think>",  # reversed
        "<think>x</think><answer>72</answer><answer>73</answer>",  # a second answer
        "<think>x</think></think><answer>72</answer>",  # a repeated tag
        "<think>x<answer>72</answer>",  # think never closed
        "<think>x</think><answer>72",  # answer never closed
        "<think>x</answer><answer>72</think>",  # crossed tags
        "<THINK>x</THINK><ANSWER>72</ANSWER>",
    ],
)
def test_format_rejects_anything_else(completion):
    assert fmt([completion]) == [0.0]


# ---------------------------------------------------------------------------------------------
# load_reward_funcs


def test_load_builtins():
    assert load_reward_funcs(["accuracy", "format"]) == [("accuracy", accuracy_reward), ("format", format_reward)]
    assert set(BUILTIN_REWARDS) == {"accuracy", "format"}


def test_load_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_pkg").mkdir()
    (tmp_path / "my_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_rewards_pkg" / "length.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n"
        "class Scorers:\n"
        "    @staticmethod\n"
        "    def short(prompts, completions, **kwargs):\n"
        "        return [1.0 if len(c) < 3 else 0.0 for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = ["format", "my_rewards_pkg.length:length_reward", " my_rewards_pkg.length:Scorers.short"]
    loaded = load_reward_funcs(specs)
    assert [name for name, _ in loaded] == ["format", "length_reward", "short"]
    assert loaded[1][1](["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert loaded[2][1](["p", "p"], ["ab", "abcd"]) == [1.0, 0.0]

    with pytest.raises(ValueError) as missing:
        load_reward_funcs(["my_rewards_pkg.length:nope"])
    assert "'my_rewards_pkg.length:nope'" in str(missing.value) and "has no attribute 'nope'" in str(missing.value)
    with pytest.raises(ValueError) as not_callable:
        load_reward_funcs(["my_rewards_pkg.length:NOT_CALLABLE"])
    assert "'NOT_CALLABLE' is a int, not callable" in str(not_callable.value)
    with pytest.raises(ValueError, match="name 'format' is already used by 'format'"):
        load_reward_funcs(["format", "format"])
    monkeypatch.delitem(sys.modules, "my_rewards_pkg.length")
    monkeypatch.delitem(sys.modules, "my_rewards_pkg")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("acuracy", "unknown built-in"),
        ("", "unknown built-in"),
        ("a:b:c", "malformed spec"),
        (":func", "malformed spec"),
        ("module:", "malformed spec"),
        ("my module:func", "malformed spec"),
        ("pkg..mod:func", "malformed spec"),
        ("no_such_module_for_rewards_test:func", "cannot import module 'no_such_module_for_rewards_test'"),
    ],
)
def test_load_errors_name_the_spec_and_the_fix(spec, problem):
    with pytest.raises(ValueError) as error:
        load_reward_funcs([spec])
    message = str(error.value)
    assert repr(spec) in message and problem in message
    assert "accuracy, format" in message and "'package.module:function'" in message


def test_load_import_error_keeps_the_cause():
    with pytest.raises(ValueError) as error:
        load_reward_funcs(["no_such_module_for_rewards_test:func"])
    assert isinstance(error.value.__cause__, ModuleNotFoundError)


def test_load_rejects_empty_and_non_list_specs():
    with pytest.raises(ValueError, match="no reward functions given"):
        load_reward_funcs([])
    with pytest.raises(ValueError, match="must be a list of strings"):
        load_reward_funcs("accuracy")
    with pytest.raises(ValueError, match="is a int, not a string"):
        load_reward_funcs([3])


# ---------------------------------------------------------------------------------------------
# score_completions


def constant(*values):
    def reward(prompts, completions, **columns):
        return list(values)

    return reward


PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["c0", "c1", "c2"]


def test_score_weighted_sum():
    funcs = [("a", constant(1.0, 0.0, 2.0)), ("b", constant(0.5, 1.0, -1.0))]
    total, per_func = score_completions(funcs, [1.0, 0.5], PROMPTS, COMPLETIONS, {})
    assert total.dtype == per_func.dtype == torch.float32
    assert total.shape == (3,) and per_func.shape == (3, 2)
    torch.testing.assert_close(total, torch.tensor([1.25, 0.5, 1.5]))
    torch.testing.assert_close(per_func, torch.tensor([[1.0, 0.5], [0.0, 1.0], [2.0, -1.0]]))
    unweighted, _ = score_completions(funcs, None, PROMPTS, COMPLETIONS, {})
    torch.testing.assert_close(unweighted, torch.tensor([1.5, 1.0, 1.0]))


def test_score_none_and_nan_mean_cannot_score():
    funcs = [("a", constant(1.0, None, None)), ("b", constant(2.0, 3.0, math.nan))]
    total, per_func = score_completions(funcs, [1.0, 2.0], PROMPTS, COMPLETIONS, {})
    assert total[:2].tolist() == [5.0, 6.0]  # item 1: only b scored it
    assert math.isnan(total[2].item())  # nobody could score item 2
    assert per_func.isnan().tolist() == [[False, False], [True, False], [True, True]]


def test_score_accepts_bools_ints_tuples_and_tensors():
    funcs = [("bools", constant(True, False, True)), ("ints", lambda **kw: (1, 2, 3)),
             ("tensor", lambda **kw: torch.tensor([0.5, 0.5, 0.5]))]
    total, per_func = score_completions(funcs, None, PROMPTS, COMPLETIONS, {})
    assert per_func[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [2.5, 2.5, 4.5]


def test_score_passes_prompts_completions_and_columns_by_keyword():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, columns=columns)
        return [0.0] * len(completions)

    score_completions([("spy", spy)], None, PROMPTS, COMPLETIONS, {"answer": ["1", "2", "3"], "level": [1, 2, 3]})
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS,
                    "columns": {"answer": ["1", "2", "3"], "level": [1, 2, 3]}}


def test_score_with_the_builtins():
    funcs = load_reward_funcs(["accuracy", "format"])
    completions = ["<think>6*12</think><answer>72</answer>", "<answer>72</answer>",
                   "<think>?</think><answer>7</answer>"]
    total, per_func = score_completions(funcs, [1.0, 0.2], PROMPTS, completions, {"answer": ["#### 72", "72", ""]})
    assert per_func[:2].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert math.isnan(per_func[2, 0].item()) and per_func[2, 1].item() == 1.0
    assert total.tolist() == pytest.approx([1.2, 1.0, 0.2])


def test_score_rejects_mismatched_inputs():
    funcs = [("a", constant(1.0, 1.0, 1.0))]
    with pytest.raises(ValueError, match="got 2 prompts for 3 completions"):
        score_completions(funcs, None, PROMPTS[:2], COMPLETIONS, {})
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 3 completions"):
        score_completions(funcs, None, PROMPTS, COMPLETIONS, {"answer": ["1", "2"]})
    with pytest.raises(ValueError, match=r"got 2 reward weights for 1 reward functions \['a'\]"):
        score_completions(funcs, [1.0, 1.0], PROMPTS, COMPLETIONS, {})
    with pytest.raises(ValueError, match="finite numbers"):
        score_completions(funcs, [math.inf], PROMPTS, COMPLETIONS, {})
    with pytest.raises(ValueError, match="no reward functions"):
        score_completions([], None, PROMPTS, COMPLETIONS, {})


def test_score_raising_function_names_itself_and_the_prompt():
    original = ValueError("model output had no digits")

    def broken(prompts, completions, **columns):
        raise original

    long_prompt = "Q" * 150 + "R" * 150
    with pytest.raises(RewardFunctionError) as error:
        score_completions([("fine", constant(1.0, 1.0)), ("broken", broken)], None, [long_prompt, "other"],
                          ["c0", "c1"], {})
    message = str(error.value)
    assert message.startswith(
        "reward function 'broken' raised ValueError: model output had no digits on completion 0 of 2, prompt: "
    )
    assert repr(long_prompt[:200]) in message and "R" * 51 not in message
    assert error.value.__cause__ is original
    assert error.value.func_name == "broken" and error.value.prompt == long_prompt
    # Raising the same object again while looking for the failing row leaves its traceback as it was.
    assert [frame.name for frame in traceback.extract_tb(original.__traceback__)] == ["score_completions", "broken"]


def test_score_raising_function_reports_the_completion_it_fails_on_and_its_traceback():
    batch_errors, calls = [], []

    def picky(prompts, completions, level, **columns):
        calls.append((list(prompts), list(completions), list(level)))
        return [_score_one(completion) for completion in completions]

    def _score_one(completion):
        if completion == "c2":
            error = ValueError("bad row")
            batch_errors.append(error)
            raise error
        return 1.0

    prompts = ["p0", "p1", "p2", "p3", "p4"]
    completions = ["c0", "c1", "c2", "c3", "c4"]
    with pytest.raises(RewardFunctionError) as error:
        score_completions([("picky", picky)], None, prompts, completions, {"level": [0, 1, 2, 3, 4]})
    message = str(error.value)
    assert message.startswith("reward function 'picky' raised ValueError: bad row on completion 2 of 5, prompt: 'p2'")
    assert error.value.prompt == "p2" and error.value.func_name == "picky"
    assert error.value.__cause__ is batch_errors[0]  # the batch call's exception, not a retry's
    # The user's own frames, innermost last, with their source lines.
    lines = message.splitlines()
    assert lines[1] == "traceback inside the reward function (most recent call last):"
    assert any("in picky" in line for line in lines) and any("in _score_one" in line for line in lines)
    assert lines[-1].strip() == 'raise error' and "in _score_one" in lines[-2]
    # The batch call, then one call per row, each with lists of one, until row 2 raised.
    assert calls == [(prompts, completions, [0, 1, 2, 3, 4]), (["p0"], ["c0"], [0]), (["p1"], ["c1"], [1]),
                     (["p2"], ["c2"], [2])]


def test_score_failure_only_on_the_whole_batch_says_so():
    def batch_only(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("out of memory on a batch")
        return [1.0]

    with pytest.raises(RewardFunctionError) as error:
        score_completions([("batch_only", batch_only)], None, PROMPTS, COMPLETIONS, {})
    message = str(error.value)
    assert "raised RuntimeError: out of memory on a batch on the batch of 3 completions, though on none of them " \
           "alone; first prompt: 'p0'" in message
    assert 'raise RuntimeError("out of memory on a batch")' in message
    assert error.value.prompt == "p0"


def test_score_a_row_failing_differently_alone_is_not_blamed():
    def spread(prompts, completions, **columns):
        if len(completions) == 1:
            raise ZeroDivisionError("std of one value")  # fails alone, but not the way the batch did
        raise KeyError("missing field")

    with pytest.raises(RewardFunctionError, match="though on none of them alone") as error:
        score_completions([("spread", spread)], None, PROMPTS, COMPLETIONS, {})
    assert isinstance(error.value.__cause__, KeyError)


def test_score_traceback_keeps_the_innermost_frames_of_a_deep_stack():
    def recurse(depth):
        if depth == 0:
            raise ValueError("deep")
        return recurse(depth - 1)

    def deep(prompts, completions, **columns):
        return recurse(30)

    with pytest.raises(RewardFunctionError) as error:
        score_completions([("deep", deep)], None, PROMPTS, COMPLETIONS, {})
    message = str(error.value)
    assert "outer frames left out" in message and "in deep" not in message
    # Ten frames: the raising one, and nine identical ones that traceback folds into three plus a count.
    assert message.count("in recurse") == 4 and "[Previous line repeated 6 more times]" in message
    assert message.rstrip().endswith('raise ValueError("deep")')


def test_score_a_function_with_the_wrong_signature_says_the_call_failed():
    def no_kwargs(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardFunctionError) as error:
        score_completions([("no_kwargs", no_kwargs)], None, PROMPTS, COMPLETIONS, {"answer": ["1", "2", "3"]})
    message = str(error.value)
    assert "raised TypeError" in message and "unexpected keyword argument 'answer'" in message
    assert "the call itself failed" in message and "completion 0 of 3" in message


def test_score_missing_answer_column_surfaces_through_the_error():
    with pytest.raises(RewardFunctionError, match="'accuracy' raised ValueError: .*answer_column") as error:
        score_completions(load_reward_funcs(["accuracy"]), None, PROMPTS, COMPLETIONS, {})
    assert isinstance(error.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("output", "problem", "prompt"),
    [
        ([1.0, 1.0], "returned 2 values for 3 completions", "p0"),
        ([1.0, "1.0", 0.0], "returned '1.0' (str) at index 1; expected a real number or None; prompt: 'p1'", "p1"),
        ([1.0, 0.0, math.inf], "returned inf at index 2; rewards must be finite", "p2"),
        ([1.0, 0.0, -math.inf], "returned -inf at index 2", "p2"),
        ([1.0, 0.0, [1.0]], "returned [1.0] (list) at index 2", "p2"),
        (None, "returned a NoneType; expected a list of 3 floats or None", "p0"),
        ("1.0", "returned a str", "p0"),
        (1.0, "returned a float", "p0"),
        ({"a": 1.0}, "returned a dict", "p0"),
        (torch.ones(3, 1), "returned a Tensor", "p0"),
    ],
)
def test_score_rejects_bad_return_values(output, problem, prompt):
    # A bad value names its own completion's prompt; a bad output as a whole, the first prompt.
    with pytest.raises(RewardFunctionError) as error:
        score_completions([("weird", lambda **kw: output)], None, PROMPTS, COMPLETIONS, {})
    assert error.value.func_name == "weird" and error.value.prompt == prompt
    assert str(error.value).startswith("reward function 'weird' ") and problem in str(error.value)


def test_plain_integers_are_compared_without_sympy_and_agree_with_math_verify(monkeypatch):
    from math_verify import parse, verify

    pairs = [("72", "72"), ("72", "072"), ("-3", "-3"), ("1,234", "1234"), ("5", "6"), ("0", "-0"),
             ("1000000", "1,000,000"), ("12", "-12")]
    expected = [1.0 if verify(parse(gold), parse(pred)) else 0.0 for gold, pred in pairs]

    def no_sympy(text):
        raise AssertionError(f"math_verify parse called for the plain integer {text!r}")

    monkeypatch.setattr(rewards, "_parse_math", no_sympy)
    completions = [f"<answer>{pred}</answer>" for _, pred in pairs]
    assert accuracy(completions, [gold for gold, _ in pairs]) == expected
