"""The command line a TRL user types: TRL's option names and values read as ours, errors naming the option as typed,
`--preset trl-defaults` with TRL GRPOConfig's defaults (each difference in docs/trl.md), and a `--help` that reads
as prose: each option's text one paragraph, no empty defaults, no pointers to text it does not show."""

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import cli
import grpo
from config import PRESETS, Config

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model", "m", "--dataset", "arithmetic"]


def test_trl_names_equal_ours():
    """The acceptance pair: --num-generations 4 --max-completion-length 64 --loss-type dapo is
    --group-size 4 --max-new-tokens 64 --loss-type token."""
    trl = cli.parse_args([*BASE, "--num-generations", "4", "--max-completion-length", "64", "--loss-type", "dapo"])
    ours = cli.parse_args([*BASE, "--group-size", "4", "--max-new-tokens", "64", "--loss-type", "token"])
    assert trl == ours and ours.group_size == 4 and ours.max_new_tokens == 64


@pytest.mark.parametrize(
    "trl, ours",
    [
        (["--loss-type", "grpo"], {"loss_type": "sequence"}),
        (["--loss_type=dr_grpo"], {"loss_type": "dr_grpo"}),
        (["--epsilon", "0.3"], {"eps_low": 0.3, "eps_high": 0.3}),  # TRL: epsilon_high defaults to epsilon
        (["--epsilon", "0.3", "--epsilon-high", "0.4"], {"eps_low": 0.3, "eps_high": 0.4}),
        (["--epsilon-high", "0.4", "--epsilon=0.1"], {"eps_low": 0.1, "eps_high": 0.4}),
        (["--beta", "0.04"], {"beta": 0.04}),
        (["--scale-rewards", "batch"], {"adv_scale": "batch"}),
        (["--scale_rewards", "False"], {"adv_scale": "none"}),
        (["--mask-truncated-completions"], {"drop_truncated": True}),
        (["--mask_truncated_completions", "true"], {"drop_truncated": True}),
        (["--importance-sampling-level", "sequence"], {"ratio_level": "sequence"}),
        (["--use_bias_correction_kl", "True"], {"kl_ratio_weight": True}),
        (["--learning_rate", "3e-6", "--max_steps", "7"], {"lr": 3e-6, "steps": 7}),
        # TRL's max_steps counts optimizer steps: 12 of them, 2 × 3 per rollout, are 2 rollouts
        (["--max-steps", "12", "--steps-per-rollout", "2", "--num-iterations", "3"], {"steps": 2}),
        (["--steps", "12", "--steps-per-rollout", "2", "--num-iterations", "3"], {"steps": 12}),
        (["--reward-funcs", "accuracy", "format"], {"reward": ("accuracy", "format")}),
        (["--group_size", "4", "--top_k", "20", "--min_p", "0.05"], {"group_size": 4, "top_k": 20, "min_p": 0.05}),
        (["--mask-truncated-completions=false"], {"drop_truncated": False}),
        (
            ["--reward", "accuracy", "--reward", "format", "--reward=overlong"],
            {"reward": ("accuracy", "format", "overlong")},
        ),
        (["--preset=trl-defaults"], {"preset": "trl-defaults", "max_new_tokens": 512}),
    ],
)
def test_trl_option(trl, ours):
    cfg = cli.parse_args([*BASE, *trl])
    assert {name: getattr(cfg, name) for name in ours} == ours


def test_an_error_names_the_option_as_typed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.cli_config([*BASE, "--output-dir", str(tmp_path / "o"), "--num-generations", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --num-generations 1: must be ≥ 2")
    with pytest.raises(SystemExit):
        cli.cli_config([*BASE, "--output-dir", str(tmp_path / "o"), "--top-k", "-1"])
    assert "error: --top-k -1: must be ≥ 0 (0 = off)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.cli_config([*BASE, "--output-dir", str(tmp_path / "o"), "--group_size", "1"])
    assert capsys.readouterr().err.startswith("error: --group_size 1: must be ≥ 2")


def test_a_trl_name_that_means_otherwise_is_refused_saying_what_to_give(tmp_path, capsys):
    for argv, said in [
        (["--steps-per-generation", "4"], "error: --steps-per-generation: TRL's counts micro-batches"),
        (
            ["--max_steps", "9", "--steps-per-rollout", "2"],
            "error: --max_steps 9: counts optimizer steps (as TRL's), 2",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.cli_config([*BASE, "--output-dir", str(tmp_path / "o"), *argv])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(said)


def test_trl_defaults_preset_has_trls_values_and_the_table_says_each_difference():
    cfg = cli.parse_args(["--preset", "trl-defaults", *BASE])
    trl = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_new_tokens": 512, "eps_low": 0.2,
           "eps_high": 0.2, "beta": 0.0, "loss_type": "token", "adv_scale": "group", "num_iterations": 1,
           "steps_per_rollout": 1, "lr": 1e-6, "lr_schedule": "linear", "warmup_steps": 0, "weight_decay": 0.0,
           "max_grad_norm": 1.0, "drop_truncated": False, "ratio_level": "token",
           "kl_ratio_weight": True}  # TRL 1.16.0  # fmt: skip
    assert {name: getattr(cfg, name) for name in trl} == trl
    assert cli.parse_args([*BASE, "--lr", "2e-6", "--preset", "trl-defaults"]).lr == 2e-6  # anywhere; flags win
    table = (ROOT / "docs" / "trl.md").read_text()
    differs = [f.name for f in fields(Config) if getattr(PRESETS["trl-defaults"], f.name) != getattr(Config(), f.name)]
    for name in differs:
        if name not in ("preset", "output_dir"):
            assert f"`--{name.replace('_', '-')}`" in table, name


def test_evaluate_takes_the_reward_list_whole_or_not_at_all(tmp_path):
    trained = {"reward": ["accuracy", "format"], "reward_weights": [1.0, 0.1], "overlong_buffer": 4096, "top_k": 20}
    (tmp_path / "trainer_config.json").write_text(json.dumps(trained))
    taken = cli.with_training_options(cli.EvalConfig(model=str(tmp_path)), set())
    assert (taken.reward, taken.reward_weights, taken.overlong_buffer, taken.top_k) == (("accuracy", "format"),
                                                                                         (1.0, 0.1), 4096, 20)  # fmt: skip
    mine = cli.with_training_options(cli.EvalConfig(model=str(tmp_path), reward=("accuracy",)), {"reward"})
    assert (mine.reward, mine.reward_weights, mine.overlong_buffer, mine.top_k) == (("accuracy",), (), 0, 20)


def test_lr_schedules():
    linear = grpo.lr_lambda(2, "linear", 10)
    assert [linear(s) for s in (0, 1, 2, 6, 10, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    cosine = grpo.lr_lambda(0, "cosine", 4)
    assert [round(cosine(s), 6) for s in (0, 2, 4)] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("script, cls", [("grpo.py", "Config"), ("evaluate.py", "EvalConfig")])
def test_help_reads_as_prose(script, cls):
    env = {**os.environ, "COLUMNS": "2000"}  # wide: each option's help on one line unless the text itself breaks
    text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert "(default: )" not in text and "see notes" not in text and "must come first" not in text
    lines = [re.sub(r"^[│\s]*|[│\s]*$", "", line) for line in text.splitlines()]
    for f in fields(getattr(cli, cls)):
        flag = f"--{f.name.replace('_', '-')}"
        at = next(i for i, line in enumerate(lines) if line.startswith(flag))
        help_line = lines[at] if "(default" in lines[at] or "(required)" in lines[at] else lines[at + 1]
        assert "(default" in help_line or "(required)" in help_line, (flag, lines[at : at + 3])
        assert help_line.count("(default") <= 1, help_line  # one default, not evaluate.py's and tyro's
        options = {g.name for g in fields(getattr(cli, cls)) if "_" in g.name}  # named as flags, not as fields
        assert not [n for n in options if re.search(rf"(?<![-\w.]){n}(?!\w)", help_line)], help_line
