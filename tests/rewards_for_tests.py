"""Reward functions the tests name on the command line (`--reward tests/rewards_for_tests.py:NAME`)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Budget:  # a dataclass under postponed annotations imports only if the file's module is registered
    tokens: int = 8


def short_bonus(completion, answer, row, *, num_tokens, max_new_tokens):
    """1 for an empty completion, falling to 0 at max_new_tokens."""
    return 1.0 - num_tokens / max_new_tokens


def gold_in_row(completion, answer, row):
    """Reads the dataset row: 1 when the row's own answer field is the gold answer it was given."""
    return float(str(row["answer"]) == answer)


def every_fact(completion, answer, row, **facts):
    return float(len(facts))


def raises(completion, answer, row):
    raise RuntimeError("a bug in a reward function")


def not_a_number(completion, answer, row):
    return "1.0"


def nan(completion, answer, row):
    return float("nan")


def spins(completion, answer, row):
    """Never returns, and makes no Python call a profile hook could see: only the SIGALRM timer stops it."""
    while True:
        pass


def calls_forever(completion, answer, row):
    while True:
        time.sleep(0.001)


def two_arguments(completion, answer):
    return 0.0


def text_length(completion, answer, row):
    """A tenth of the completion's characters: never 0 for the tiny model's random text."""
    return len(completion) / 10
