"""Specification of reward.py: boxed-answer extraction, math-verify equivalence, reward hacking, bounded work.

The real-data tests (MATH train, GSM8K test) need ../shared/data and skip without it; run with -s to see figures.
"""

import json
import logging
import math
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import reward
from reward import accuracy_reward, extract_boxed, format_reward, rewards, score

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TIME_LIMIT_S = 10.0


def boxed(answer: str) -> str:
    """A typical Qwen3 thinking completion (the prompt already opened <think>) ending in answer."""
    return "Let me compute step by step.\n</think>\n\nThe final answer is $\\boxed{" + answer + "}$."


# ----------------------------------------------------------------------------------------------------------------
# extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{5}$.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces don't close the box
        (r"first \boxed{1}, finally \boxed{2}", "2"),  # the last box is the answer
        (r"\fbox{7}", "7"),
        (r"\fbox{7} then \boxed{8}", "8"),
        (r"$\boxed 5$", "5"),
        ("\\boxed 12\nmore text", "12"),
        (r"\boxed {5}", "5"),
        ("no box here", None),
        (r"\boxedfoo{3}", None),  # a different command
        (r"\boxed{1} and a truncated \boxed{2", None),  # the last box never closes: no final answer
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_finds_the_box_at_the_end_of_a_megabyte():
    assert extract_boxed("x" * 1_000_000 + r"\boxed{42}") == "42"


# ----------------------------------------------------------------------------------------------------------------
# accuracy_reward: equivalent forms (pred, gold) score 1.0


EQUIVALENT = [
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\frac12", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", "0.75"),
    ("3/4", r"\frac{3}{4}"),
    (r"\frac{-2}{3}", r"-\frac{2}{3}"),
    ("-3", "-3"),
    ("-3.0", "-3"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),  # tuple
    ("(1,2)", r"\left(1, 2\right)"),
    ("[2, 5)", "[2,5)"),  # interval
    (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"x \in [2, 5)", "[2,5)"),
    (r"\{3, 1, 2\}", r"\{1,2,3\}"),  # set
    ("1, 2, 3", r"\{1,2,3\}"),
    (r"\text{Evelyn}", r"\text{Evelyn}"),  # text answers
    ("Evelyn", r"\text{Evelyn}"),
    (r"\text{(C)}", "(C)"),
    ("C", r"\text{(C)}"),
    (r"\textbf{(C)}", r"\text{(C)}"),
    (r"25\%", "25"),  # percent
    ("25", r"25\%"),
    ("0.25", r"25\%"),
    (r"5\text{ cm}", "5"),  # units
    (r"5 \text{ cm}^2", "5"),
    ("5", r"5\text{ cm}"),
    ("12 square feet", "12"),
    (r"18 \text{ dollars}", "18"),
    (r"\$18.00", "18"),
    (r"30^\circ", "30"),  # degrees
    ("30", r"30^{\circ}"),
    (r"\cos(\pi/30)", r"\cos 6^\circ"),
    (r"2\pi", r"2 \pi"),  # pi forms
    (r"\frac{\pi}{2}", r"\pi/2"),
    (r"\frac{3\pi}{4}", r"\frac34\pi"),
    (r"2007 + \frac{\pi}{2}", r"2007 + \frac\pi 2"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"),
    (r"3\sqrt{2}", r"3\sqrt{2}"),  # parsed bare, the gold would be 3
    ("x^2 + 2x + 1", "(x+1)^2"),
    ("a + b + c", "c + b + a"),  # not stripped as a unit "c"
    ("x = 5", "5"),
    ("1000", "1,000"),  # GSM8K thousands separators
    ("1,000", "1000"),
    ("1234567", "1,234,567"),
    (r"\$1,000", "1000"),
    (r"\frac{1}{29322216}", r"\dfrac{1}{29,\!322,\!216}"),
    ("8.24", r"\approx 8.24 \text{ mph}"),
    ("2^{4950}", "2^{4950}"),  # big but legitimate
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
]


@pytest.mark.parametrize("pred, gold", EQUIVALENT)
def test_equivalent_answers_score_one(pred, gold):
    assert accuracy_reward(boxed(pred), gold) == 1.0


@pytest.mark.parametrize("gold", [142.0, "142.0", 142, "142"])
def test_numbers_stored_as_floats(gold):
    assert accuracy_reward(boxed("142"), gold) == 1.0
    assert accuracy_reward(boxed("143"), gold) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# accuracy_reward: wrong answers score 0.0

WRONG = [
    ("3", r"3\sqrt{2}"),
    ("0.51", r"\frac12"),
    ("(2, 1)", "(1, 2)"),
    ("[1, 2)", "(1, 2)"),
    ("1, 2", r"\{1,2,3\}"),
    ("D", r"\text{(C)}"),
    ("Eve", r"\text{Evelyn}"),
    ("1001", "1,000"),
    ("1,001", "1000"),
    ("x^2 + 1", "(x+1)^2"),
    ("-3", "3"),
    ("3.14", r"\pi"),
    (r"26\%", "25"),
    (r"5 \text{ or } 6", "5"),  # hedging between answers is not an answer
    ("5", r"5 \text{ or } 6"),
    ("", "5"),
]


@pytest.mark.parametrize("pred, gold", WRONG)
def test_wrong_answers_score_zero(pred, gold):
    assert accuracy_reward(boxed(pred), gold) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# reward hacking: the anchored, final, post-think box is the only thing that counts


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (r"Maybe \boxed{3}. No wait, \boxed{5}.", "5", 1.0),  # two boxes: the last counts
        (r"Maybe \boxed{5}. No wait, \boxed{3}.", "5", 0.0),
        (r"<think>\boxed{5}</think> The answer is 5.", "5", 0.0),  # boxed only inside the think block
        (r"I think it is \boxed{5}</think> so the answer is 5.", "5", 0.0),  # Qwen3: prompt opened <think>
        (r"<think> so \boxed{5} and still thinking", "5", 0.0),  # think block never closed
        (r"<think>\boxed{4}</think>\boxed{5}", "5", 1.0),
        (r"<think>\boxed{5}</think>\boxed{4}", "5", 0.0),
        (r"<think>a</think> b </think> \boxed{5}", "5", 1.0),  # only the part after the last </think>
        (r"<think>a</think> <think>b \boxed{5}", "5", 0.0),  # a block reopened after the last </think>
        (r"<think>a</think> \boxed{5} <think>b \boxed{4}", "5", 1.0),  # the box before the reopened block
        ("The answer is 5.", "5", 0.0),  # no box
        ("5", "5", 0.0),  # bare number, no box
        (r"$5$", "5", 0.0),
        (r"\boxed{}", "5", 0.0),
        (r"\boxed{5", "5", 0.0),  # never closed
        (r"\boxed{1, 2, 3, 4, 5}", "5", 0.0),  # listing candidates
        (r"\boxed{5}" + " trailing words" * 10, "5", 1.0),
        (r"so $\boxed 5$.", "5", 1.0),  # other box forms count as boxes
        (r"\fbox{5}", "5", 1.0),
        (r"\boxed{3 + 8}", "11", 0.0),  # the question restated, not answered
        (r"\boxed{5 \times 2}", "10", 0.0),
        (r"\boxed{12 - 4*2}", "4", 0.0),
        (r"\boxed{$3 + 8$}", "11", 0.0),
        (r"\boxed{3+8}", "3+8", 1.0),  # unless that is the gold answer itself
        (r"\boxed{1/2}", r"\frac12", 1.0),  # a fraction is an answer
    ],
)
def test_reward_hacking(completion, gold, expected):
    assert accuracy_reward(completion, gold) == expected


# ----------------------------------------------------------------------------------------------------------------
# adversarial input: 0.0 in bounded time, never an exception


ADVERSARIAL = [
    (r"\boxed{10^{10^{10^{10}}}}", "5"),
    (r"\boxed{10^{10^{10}}}", r"10^{10^{10}}+1"),  # huge on both sides
    (r"\boxed{9^{9^{9}}}", r"\frac12"),
    (r"\boxed{2^{2^{30}}}", "x+1"),
    (r"\boxed{(10^{10})!}", "5"),
    (r"\boxed{100000!}", "5"),
    (r"\boxed{\binom{10^{10}}{5000}}", "5"),
    (r"\boxed{\prod_{n=1}^{10^{6}} n}", "5"),
    (r"\boxed{(x+y+z)^{50}}", "(x+y)^{50}"),
    (r"\boxed{(x+1)^{100000}}", "x^{100000}+1"),
    (r"\boxed{\sin(\sin(\sin(\sin(\sin(\sin(x))))))}", r"\cos(\cos(\cos(\cos(x))))"),
    ("x" * 1_000_000, "5"),  # 1 MB, no box
    ("\\boxed{" + "9" * 1_000_000 + "}", "5"),  # 1 MB box
    ("\\boxed{2}" * 110_000, "5"),  # 1 MB of boxes
    ("\\boxed{" * 150_000, "5"),
    ("{" * 1_000_000, "5"),
    ("\\boxed{" + "{" * 500 + "5" + "}" * 500 + "}", "6"),  # 500-deep braces
    ("\\boxed{" + "(" * 500 + "5" + ")" * 500 + "}", "6"),
    ("\\boxed{" + "(" * 12 + "5" + ")" * 12 + "}", "6"),  # at the nesting cap: parsed and compared
    ("\\boxed{" + "2^{" * 12 + "5" + "}" * 12 + "}", "6"),
    ("\\boxed{" + r"\frac{1}{" * 12 + "2" + "}" * 12 + "}", "6"),
    ("\\boxed{" + r"\sin(1+" * 12 + "1" + ")" * 12 + "}", "6"),  # sympy needs minutes: the timeout stops it
    (r"\boxed{\frac{1}{2", "5"),  # unbalanced
    (r"\boxed{5}}}}", "6"),
    (r"\boxed{\frac{}{}}", "5"),  # malformed LaTeX
    (r"\boxed{\sqrt{}}", "5"),
    (r"\boxed{^^__}", "5"),
    (r"\boxed{\begin{pmatrix}}", "5"),
    (r"\boxed{\left(}", "5"),
    (r"\boxed{五}", "5"),  # non-ASCII
    ("\\boxed{\u0000}", "5"),
    ("\\boxed{😀}", "5"),
    ("\\boxed{\u202e5}", "6"),
    ("", "5"),  # empty strings
    (r"\boxed{5}", ""),
    (None, "5"),  # garbage types
    (r"\boxed{5}", None),
    (123, "5"),
    (b"\\boxed{5}", "5"),
    (r"\boxed{5}", math.nan),
    (r"\boxed{5}", [5]),
]


@pytest.mark.parametrize("completion, gold", ADVERSARIAL, ids=[f"adv{i}" for i in range(len(ADVERSARIAL))])
def test_adversarial_input_scores_zero_in_bounded_time(completion, gold):
    start = time.perf_counter()
    assert accuracy_reward(completion, gold) == 0.0
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert format_reward(completion) in (0.0, 1.0)


def timed_reward(completion, gold) -> tuple[float, float]:
    start = time.perf_counter()
    return accuracy_reward(completion, gold), time.perf_counter() - start


def test_adversarial_input_off_the_main_thread_scores_zero_in_bounded_time():
    # No signal.alarm outside the main thread: reward.py's own deadline bounds the work there.
    with ThreadPoolExecutor(1) as pool:
        got = list(pool.map(timed_reward, *zip(*ADVERSARIAL, strict=True)))
    assert [value for value, _ in got] == [0.0] * len(ADVERSARIAL)
    slow = [(i, round(seconds, 1)) for i, (_, seconds) in enumerate(got) if seconds >= TIME_LIMIT_S]
    assert not slow, f"(case, seconds) over {TIME_LIMIT_S} s: {slow}"


def test_correct_answer_at_the_end_of_a_megabyte():
    assert accuracy_reward("x" * 1_000_000 + "</think>" + boxed("42"), "42") == 1.0


# ----------------------------------------------------------------------------------------------------------------
# threads


def test_math_verify_timeouts_need_the_main_thread():
    # Why reward.py switches math-verify's timeouts off in other threads: they use signal.alarm.
    from math_verify import parse

    errors = []

    def run():
        try:
            parse("$1$", parsing_timeout=5)
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1


def test_accuracy_reward_off_the_main_thread():
    # \frac12 vs 0.5 are different strings, so this goes through math-verify's parse and verify.
    cases = [(boxed(r"\frac12"), "0.5", 1.0), (boxed("0.6"), "0.5", 0.0), (boxed("x^2+2x+1"), "(x+1)^2", 1.0)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda c: accuracy_reward(c[0], c[1]), cases))
    assert got == [expected for _, _, expected in cases]


# ----------------------------------------------------------------------------------------------------------------
# unparseable gold answers


def test_unparseable_gold_is_warned_about_once_and_still_matches_itself(caplog):
    gold = r"\qqq{a gold answer math-verify cannot parse}"
    with caplog.at_level(logging.WARNING, logger="reward"):
        assert accuracy_reward(boxed("7"), gold) == 0.0
        assert accuracy_reward(boxed("8"), gold) == 0.0
        assert accuracy_reward(boxed(gold), gold) == 1.0  # not 0 forever: the identical string matches
    warnings = [r for r in caplog.records if repr(gold) in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_missing_gold_is_warned_about_once(caplog):
    with caplog.at_level(logging.WARNING, logger="reward"):
        for _ in range(3):
            assert accuracy_reward(boxed("5"), float("inf")) == 0.0
    assert len([r for r in caplog.records if "inf" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------------------------------------------
# format_reward


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("I add them.\n</think>\n\nThe answer is $\\boxed{5}$.", 1.0),  # Qwen3: the prompt opened <think>
        ("<think>I add them.</think>\n\\boxed{5}", 1.0),
        ("The answer is \\boxed{5}.", 1.0),  # no think tags at all
        ("<think>\n\n</think>\n\n\\boxed{5}", 1.0),  # thinking disabled: empty block
        ("The answer is 5.", 0.0),  # no box
        ("</think> The answer is 5.", 0.0),
        ("<think>\\boxed{5}</think> The answer is 5.", 0.0),  # box only inside the think block
        ("<think>still thinking \\boxed{5}", 0.0),  # never closed
        ("<think>a</think><think>b</think>\\boxed{5}", 0.0),  # two opens
        ("a</think>b</think>\\boxed{5}", 0.0),  # two closes
        ("</think> x <think> \\boxed{5}", 0.0),  # open after close
        ("</think> \\boxed{}", 0.0),  # empty box
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


# ----------------------------------------------------------------------------------------------------------------
# score / rewards


def test_score_adds_the_weighted_format_reward_to_accuracy():
    completions = [
        "</think> \\boxed{5}",  # right and well-formed
        "<think>a</think><think>b</think> \\boxed{5}",  # right, two opens
        "</think> \\boxed{4}",  # wrong, well-formed
        "no answer",  # neither
    ]
    answers = ["5", "5", "5", "5"]
    reward_, accuracy = score(completions, answers, format_weight=0.5)
    assert accuracy == [1.0, 1.0, 0.0, 0.0]
    assert reward_ == [1.5, 1.0, 0.5, 0.0]
    assert score(completions, answers) == (accuracy, accuracy)  # format_weight defaults to 0
    assert rewards(completions, answers, format_weight=0.5) == reward_


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"3 completions but 2 answers"):
        score(["a", "b", "c"], ["1", "2"])
    with pytest.raises(ValueError, match=r"1 completions but 2 answers"):
        rewards(["a"], ["1", "2"])


# ----------------------------------------------------------------------------------------------------------------
# real data: official solutions are accepted, perturbed answers rejected


def _math_rows() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / "math" / "train.jsonl").read_text().splitlines()]
    return [(r["solution"], r["answer"]) for r in rows if r.get("answer") not in (None, "")]


def _gsm8k_rows() -> list[tuple[str, str]]:
    out = []
    for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines():
        work, gold = json.loads(line)["answer"].rsplit("#### ", 1)
        out.append((work + "\\boxed{" + gold.strip() + "}", gold.strip()))
    return out


@pytest.mark.parametrize("name, load", [("math/train.jsonl", _math_rows), ("gsm8k/test.jsonl", _gsm8k_rows)])
def test_real_data_solutions_accepted_and_perturbed_answers_rejected(name, load):
    if not (DATA / name).exists():
        pytest.skip(f"{DATA / name} is absent")
    rows = load()
    # Each row's solution and its perturbed \boxed{answer+1} go to the same worker (even chunks) so the gold is
    # parsed once; math-verify's signal timeouts work in each worker's main thread.
    calls = [call for solution, gold in rows for call in ((solution, gold), ("\\boxed{" + gold + "+1}", gold))]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        scores = pool.starmap(reward.accuracy_reward, calls, chunksize=64)
    seconds = time.perf_counter() - start
    accepted = sum(scores[0::2]) / len(rows)
    rejected = scores[1::2].count(0.0) / len(rows)
    figures = (
        f"{name}: {len(rows)} rows, official solution accepted {accepted:.2%}, "
        f"perturbed \\boxed{{answer+1}} rejected {rejected:.2%} ({seconds:.1f} s, 2 processes)"
    )
    print(figures)
    assert accepted >= 0.995, figures
    assert rejected >= 0.995, figures
