"""Rewards as plug-ins (scoring.py): a weighted sum of built-in and importable reward functions, each logged on its
own; a function that raises, hangs or returns something other than a number scores 0, is counted, and never stops
the run; bad --reward options are refused before anything loads."""

import json
import threading

import pytest

import cli
import grpo
import scoring
from config import BUILTIN_REWARDS, EvalConfig, UsageError, check_eval_config, reward_entries
from tests.test_grpo import run_cfg

PLUGINS = "tests/rewards_for_tests.py"


def sample(completion="x", answer="3", num_tokens=4, truncated=False, reasoning_tokens=0, row=None):
    return scoring.Sample(completion, answer, row if row is not None else {"answer": answer}, num_tokens, truncated,
                          reasoning_tokens, max_new_tokens=8, overlong_buffer=4)  # fmt: skip


def test_weighted_sum_of_rewards_hand_computed():
    samples = [sample("\\boxed{3}", num_tokens=2), sample("\\boxed{4}", num_tokens=6), sample("no box", num_tokens=8)]
    entries = [("accuracy", 1.0), (f"{PLUGINS}:short_bonus", 0.5), ("overlong", 2.0), ("format", -0.25)]
    s = scoring.score(samples, scoring.reward_list(entries))
    assert s.parts["accuracy"] == [1.0, 0.0, 0.0]
    assert s.parts["short_bonus"] == [1 - 2 / 8, 1 - 6 / 8, 0.0]
    assert s.parts["overlong"] == [0.0, -0.5, -1.0]  # L_max 8, buffer 4: the ramp covers 5 … 8 tokens
    assert s.parts["format"] == [1.0, 1.0, 0.0]
    assert s.total == pytest.approx([1 + 0.5 * 0.75 - 0.25, 0.5 * 0.25 - 1.0 - 0.25, -2.0])
    assert s.accuracy == [1.0, 0.0, 0.0] and s.failures == dict.fromkeys(s.parts, 0)


def test_overlong_curve():
    lengths = [1, 12, 16, 17, 18, 19, 20]  # L_max 20, buffer 4: the ramp covers lengths 17 … 20
    ramp = [scoring.overlong("", "", {}, num_tokens=n, max_new_tokens=20, overlong_buffer=4) for n in lengths]
    assert ramp == [0, 0, 0, -0.25, -0.5, -0.75, -1.0]
    assert scoring.overlong("", "", {}, num_tokens=20, max_new_tokens=20, overlong_buffer=0) == 0.0  # off


def test_reasoning_copies_is_the_share_of_copy_tokens():
    s = scoring.score([sample(num_tokens=8, reasoning_tokens=6), sample(num_tokens=0)],
                      scoring.reward_list([("reasoning_copies", -1.0)]))  # fmt: skip
    assert s.parts["reasoning_copies"] == [0.75, 0.0] and s.total == [-0.75, 0.0]


def test_functions_see_the_row_and_the_facts_they_name():
    rewards = scoring.reward_list([(f"{PLUGINS}:gold_in_row", 1.0), (f"{PLUGINS}:every_fact", 1.0)])
    s = scoring.score([sample(answer="3", row={"answer": 3}), sample(answer="3", row={"answer": "4"})], rewards)
    assert s.parts["gold_in_row"] == [1.0, 0.0]
    assert s.parts["every_fact"] == [5.0, 5.0]  # **facts: all of config.REWARD_FACTS


def test_builtins_are_the_configs_names():
    assert set(scoring.BUILTINS) == set(BUILTIN_REWARDS)


@pytest.mark.parametrize("name", ["raises", "not_a_number", "nan", "spins"])
def test_a_failing_reward_scores_zero_is_counted_and_reported_once(name, capsys):
    rewards = scoring.reward_list([("accuracy", 1.0), (f"{PLUGINS}:{name}", 1.0)])
    s = scoring.score([sample("\\boxed{3}"), sample("\\boxed{5}")], rewards, timeout=0.2)
    assert s.parts[name] == [0.0, 0.0] and s.failures[name] == 2
    assert s.total == [1.0, 0.0]  # the other rewards stand
    assert capsys.readouterr().err.count(f"[reward] {name} failed") <= 1  # once per process


def test_timeout_outside_the_main_thread():
    rw = scoring.reward_list([(f"{PLUGINS}:calls_forever", 1.0)])
    out = []
    worker = threading.Thread(target=lambda: out.append(scoring.score([sample()], rw, timeout=0.2)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive() and out[0].failures == {"calls_forever": 1}


def test_the_verifier_hook_replaces_the_accuracy_function():
    def verifier(texts, answers):
        return [0.5] * len(texts), [1.0] * len(texts)

    s = scoring.score([sample()], scoring.reward_list([("accuracy", 2.0), ("format", 1.0)]), verifier=verifier)
    assert s.parts == {"accuracy": [0.5], "format": [0.0]} and s.total == [1.0] and s.accuracy == [1.0]


def test_legacy_flags_join_the_list():
    cfg = run_cfg(".", ".", format_weight=0.5, overlong_buffer=2, overlong_penalty=0.3)
    assert reward_entries(cfg) == [("accuracy", 1.0), ("format", 0.5), ("overlong", 0.3)]
    cfg = run_cfg(".", ".", reward=("accuracy", "format"), reward_weights=(1.0, 0.1), format_weight=0.0)
    assert reward_entries(cfg) == [("accuracy", 1.0), ("format", 0.1)]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "accuracy", "length"], "--reward accuracy length: must be a built-in"),
        (["--reward", "no_such_module_xyz:f"], "importing no_such_module_xyz failed (ModuleNotFoundError"),
        (["--reward", f"{PLUGINS}:nope"], f"--reward {PLUGINS}:nope: {PLUGINS} has no function nope"),
        (["--reward", "tests/none.py:f"], "--reward tests/none.py:f: no such file tests/none.py"),
        (["--reward", f"{PLUGINS}:two_arguments"], "must take (completion, answer, row)"),
        (["--reward", "accuracy", "format", "--reward-weights", "1"], "one weight per --reward (2)"),
        (["--reward", "accuracy", "format", "--format-weight", "0.5"], "0 when --reward lists format"),
        (["--reward", "overlong"], "--overlong-buffer 0: must be > 0 when --reward lists overlong"),
        (["--reward-timeout", "0"], "--reward-timeout 0.0: must be > 0"),
        (["--reward", "accuracy", "format", "--reward-weights", "1", "nan"], "--reward-weights nan: must be a finite"),
        (["--reward", "overlong", "--overlong-buffer", "2", "--overlong-penalty", "0.5"], "left at 1 when --reward"),
    ],
)
def test_bad_reward_options_are_one_line_before_anything_loads(flags, message, tmp_path, tiny_model_dir, capsys):
    base = ["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        cli.cli_config([*base, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_run_logs_each_reward_and_their_weighted_sum(tmp_path, tiny_model_dir):
    """--reward accuracy --reward FILE:text_length --reward-weights 1 0.5: both logged (in training and in the periodic
    evaluation), and the reward is their weighted sum."""
    argv = ["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "run"),
            "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "6", "--max-prompt-len", "256",
            "--rollout-batch-size", "6", "--steps", "2", "--save-every", "0", "--device", "cpu",
            "--eval-every", "2", "--eval-dataset", "arithmetic", "--eval-max-problems", "3", "--eval-samples", "2",
            "--reward", "accuracy", "--reward", f"{PLUGINS}:text_length", "--reward-weights", "1", "0.5"]  # fmt: skip
    out = grpo.train(cli.cli_config(argv))
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["reward/text_length"] > 0 and m["reward_failures/text_length"] == 0
        assert m["reward"] == pytest.approx(m["reward/accuracy"] + 0.5 * m["reward/text_length"], abs=1e-6)
    evals = [m for m in lines if "eval_reward" in m]
    assert [m["step"] for m in evals] == [0, 2]
    for m in evals:
        assert m["eval_reward/text_length"] > 0
        assert m["eval_reward"] == pytest.approx(m["eval_reward/accuracy"] + 0.5 * m["eval_reward/text_length"])
    with pytest.raises(UsageError):  # what evaluate.py checks too
        check_eval_config(EvalConfig(model=str(tiny_model_dir), reward=("nope",)))
