"""The run's reward: a weighted sum of reward functions, each logged on its own (`reward/<name>`).

    r_i = Σ_k w_k · f_k(o_i, a_i, row_i)        o_i the completion's text, a_i its gold answer, row_i its dataset row

A reward function is any callable f(completion: str, answer: str, row: dict) -> float: a built-in (BUILTINS, by
name) or one named on the command line as `module:function` or `path/to/file.py:function` (`--reward accuracy
--reward mypkg.rewards:length_penalty --reward-weights 1 0.1`). It may also declare, by name, any of the facts the
trainer knows about the sample (config.REWARD_FACTS, the fields of `Sample` after the first three), as keyword
parameters, or **kwargs for all of them, e.g.
`def short(completion, answer, row, *, num_tokens): ...`.

Nothing a reward function does stops the run: an exception, a value that is not a finite number, or a call that runs
past the timeout scores 0 for that sample and is counted (`reward_failures/<name>`; the first failure of each
function is printed with its error). The timeout interrupts Python code (a SIGALRM timer in the main thread, where
the trainer calls rewards; a profile hook in other threads); C code that never returns to Python cannot be
interrupted, and a function that sets its own SIGALRM (math-verify does) replaces the timer with its own. The
built-ins are bounded by construction (reward.py) and run without a timer.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

import reward
from config import load_function, reward_facts


@dataclass(frozen=True)
class Sample:
    """One completion as the reward functions see it."""

    completion: str  # text, reasoning ids mapped to their sources; "<think>" prepended when the prompt opened one
    answer: str  # gold answer
    row: dict  # the dataset row it came from (every field of the source)
    num_tokens: int  # completion tokens, EOS included
    truncated: bool  # no EOS within max_new_tokens
    reasoning_tokens: int  # tokens from the reasoning vocabulary's copies (0 without one)
    max_new_tokens: int  # the run's completion limit
    overlong_buffer: int  # the run's --overlong-buffer


# ---------------------------------------------------------------------------------------------------------------------
# Built-in reward functions


def accuracy(completion: str, answer: str, row: dict) -> float:
    """1 when the last boxed answer after </think> equals the gold answer (math-verify; reward.accuracy_reward)."""
    return reward.accuracy_reward(completion, answer)


def well_formed(completion: str, answer: str, row: dict) -> float:
    """1 for one think block (if any) followed by a boxed answer (reward.format_reward)."""
    return reward.format_reward(completion)


def overlong(completion: str, answer: str, row: dict, *, num_tokens: int, max_new_tokens: int,
             overlong_buffer: int) -> float:  # fmt: skip
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) before its weight p (--overlong-penalty), for a
    completion of |o| = num_tokens tokens, L_max = max_new_tokens and L_buf = overlong_buffer:

        R_len(|o|) = 0                                  |o| ≤ L_max − L_buf
                   = −(|o| − (L_max − L_buf)) / L_buf   L_max − L_buf < |o| ≤ L_max        (−1 when truncated)

    L_buf = 0 is off (0)."""
    if overlong_buffer <= 0:
        return 0.0
    return -min(max((num_tokens - (max_new_tokens - overlong_buffer)) / overlong_buffer, 0.0), 1.0)


def reasoning_copies(completion: str, answer: str, row: dict, *, reasoning_tokens: int, num_tokens: int) -> float:
    """The share of the completion's tokens drawn from the reasoning vocabulary's copies (0 without one): a negative
    weight makes it a penalty on private-language use, a positive one a bonus."""
    return reasoning_tokens / max(num_tokens, 1)


BUILTINS = {"accuracy": accuracy, "format": well_formed, "overlong": overlong, "reasoning_copies": reasoning_copies}


@dataclass(frozen=True)
class Reward:
    name: str  # logged as reward/<name>
    fn: object  # f(completion, answer, row, **facts) -> float
    weight: float
    facts: tuple[str, ...]  # the config.REWARD_FACTS fn takes
    bounded: bool  # a built-in: no timer needed


def reward_list(entries: list[tuple[str, float]]) -> list[Reward]:
    """The run's rewards from (spec, weight) pairs (config.reward_entries): a BUILTINS name or `module:function` /
    `file.py:function` (config.load_function). Logged names are the built-in's or the function's (the whole spec when
    two would clash)."""
    names = [spec if spec in BUILTINS else spec.rpartition(":")[2] for spec, _ in entries]
    rewards = []
    for (spec, weight), name in zip(entries, names, strict=True):
        fn = BUILTINS.get(spec) or load_function(spec, "reward")
        facts = reward_facts(fn) or ()
        rewards.append(Reward(name if names.count(name) == 1 else spec, fn, float(weight), facts, spec in BUILTINS))
    return rewards


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    total: list[float]  # r_i = Σ_k w_k f_k, per sample
    parts: dict[str, list[float]]  # name → f_k per sample (unweighted)
    accuracy: list[float]  # the verifier's, per sample (the accuracy metric and pass@k)
    failures: dict[str, int]  # name → samples it scored 0 by failing


def scorer(entries=(("accuracy", 1.0),), verifier=None, timeout: float = 10.0):
    """samples → Scores for (reward function, weight) pairs (config.reward_entries): `score` bound to them."""
    return functools.partial(score, rewards=reward_list(list(entries)), verifier=verifier, timeout=timeout)


def joined(a: Scores, b: Scores) -> Scores:
    """The scores of two batches of samples, one after the other (dynamic sampling's further rounds)."""
    return Scores(a.total + b.total, {k: v + b.parts[k] for k, v in a.parts.items()}, a.accuracy + b.accuracy,
                  {k: v + b.failures[k] for k, v in a.failures.items()})  # fmt: skip


class RewardTimeout(BaseException):
    """A reward function ran out of time (a BaseException, so a function's own `except Exception` cannot eat it)."""


_reported: set[str] = set()  # reward names whose first failure has been printed (once per process)


def score(samples: list[Sample], rewards: list[Reward], verifier=None, timeout: float = 10.0) -> Scores:
    """Every reward function on every sample, and their weighted sum. `verifier(completions, answers)` → (rewards,
    accuracies) replaces the accuracy built-in (toy tasks, tests): its rewards are the `accuracy` part, its
    accuracies the metric; without it, the accuracy metric is the built-in's (run even when it is not a reward)."""
    texts, answers = [s.completion for s in samples], [s.answer for s in samples]
    if verifier is not None:
        verified, accuracy_ = (list(map(float, x)) for x in verifier(texts, answers))
    parts, failures = {}, {}
    for rw in rewards:
        if rw.fn is accuracy and verifier is not None:
            parts[rw.name], failures[rw.name] = verified, 0
            continue
        values = [call_reward(rw, s, timeout) for s in samples]
        parts[rw.name] = [0.0 if v is None else v for v in values]
        failures[rw.name] = sum(v is None for v in values)
    if verifier is None:
        built_in = next((parts[rw.name] for rw in rewards if rw.fn is accuracy), None)
        accuracy_ = (
            built_in if built_in is not None else [accuracy(t, a, {}) for t, a in zip(texts, answers, strict=True)]
        )
    total = [sum(rw.weight * parts[rw.name][i] for rw in rewards) for i in range(len(samples))]
    return Scores(total, parts, list(accuracy_), failures)


def call_reward(rw: Reward, s: Sample, timeout: float) -> float | None:
    """rw on one sample: a finite float, or None when it raised, timed out or returned something else (reported once
    per function)."""
    facts = {name: getattr(s, name) for name in rw.facts}
    try:
        if rw.bounded:
            value = rw.fn(s.completion, s.answer, s.row, **facts)
        else:
            value = with_deadline(timeout, rw.fn, s.completion, s.answer, s.row, **facts)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError(f"returned {value!r}, not a finite number")
        return float(value)
    except (Exception, RewardTimeout) as e:
        if rw.name not in _reported:
            _reported.add(rw.name)
            print(f"[reward] {rw.name} failed ({type(e).__name__}: {e}): scored 0; failures are counted in "
                  f"reward_failures/{rw.name} (reported once)", file=sys.stderr, flush=True)  # fmt: skip
        return None


def with_deadline(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs), raising RewardTimeout once it has run `seconds`: by a SIGALRM timer in the main thread,
    otherwise by a profile hook at the first function call past the deadline (a profiler already set: no deadline)."""
    if threading.current_thread() is threading.main_thread():

        def expire(signum, frame):
            raise RewardTimeout(f"ran past its {seconds:g} s timeout (--reward-timeout)")

        previous = signal.signal(signal.SIGALRM, expire)
        outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # a timer already running: resumed after
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
            if outer:
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-6))
    return reward.call_with_deadline(seconds, RewardTimeout(f"ran past its {seconds:g} s timeout (--reward-timeout)"),
                                     fn, *args, **kwargs)  # fmt: skip
