"""The command lines of grpo.py and evaluate.py: tyro over config.py's options, with each option's help reflowed,
TRL's option names read as ours, evaluate.py's options completed from a checkpoint's trainer_config.json, and a bad
option printed as one line (exit status 2). Imports no torch: `--help` and option errors answer in about a second.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from pathlib import Path

import config
from config import PRESETS, Config, EvalConfig, UsageError, check_config, check_eval_config, flag_text


def parse_args(argv: list[str] | None = None) -> Config:
    """grpo.py's command line (default sys.argv[1:]): a `--preset NAME` anywhere picks the defaults; TRL's names are
    read as ours (`trl_names`)."""

    argv = trl_names(sys.argv[1:] if argv is None else argv)
    preset = "none"
    for i, token in enumerate(argv):
        if token == "--preset" or token.startswith("--preset="):
            preset = token.partition("=")[2] if "=" in token else argv[i + 1] if i + 1 < len(argv) else ""
            if preset not in PRESETS:
                raise SystemExit(f"--preset takes one of {sorted(PRESETS)}")
    return trl_max_steps(cli_of(Config, argv, PRESETS[preset]))


# TRL GRPOConfig names read as ours where they mean the same (docs/trl.md), and TRL's values where ours differ.
TRL_NAMES = {"num_generations": "group_size", "max_completion_length": "max_new_tokens", "epsilon": "eps_low",
             "epsilon_high": "eps_high", "scale_rewards": "adv_scale", "mask_truncated_completions": "drop_truncated",
             "importance_sampling_level": "ratio_level", "learning_rate": "lr", "max_steps": "steps",
             "reward_funcs": "reward", "use_bias_correction_kl": "kl_ratio_weight"}  # fmt: skip
TRL_VALUES = {"loss_type": {"dapo": "token", "grpo": "sequence"}, "adv_scale": {"true": "group", "false": "none"}}
# TRL names refused because ours differ in meaning, with what to give instead
TRL_OTHER_MEANING = {
    "steps_per_generation": "TRL's counts micro-batches of per_device_train_batch_size (steps_per_generation / "
    "gradient_accumulation_steps optimizer steps per generation); give --steps-per-rollout K, the optimizer steps per "
    "rollout (docs/trl.md)"
}


def trl_names(argv: list[str]) -> list[str]:
    """argv with TRL's option names and values read as ours (TRL_NAMES, TRL_VALUES; `--x_y` as `--x-y`; `--flag
    true|false` as `--flag` / `--no-flag`), and a repeated --reward (or --reward-weights) as one list; `--epsilon E`
    without --epsilon-high sets both clip ranges, as in TRL. An option typed otherwise than ours is recorded in TYPED,
    so errors name it as typed."""
    config.TYPED.clear()
    flags = {f.name for f in dataclasses.fields(Config) if f.type == "bool"}
    out, option, epsilon, rest = [], None, None, []
    if "--" in argv:  # what follows `--` is not an option
        argv, rest = argv[: argv.index("--")], argv[argv.index("--") :]
    for token in argv:
        if option is not None and not token.startswith("--"):  # a value of the option before it
            if option in flags and token.lower() in ("true", "false"):
                out[-1] = flag_text(option if token.lower() == "true" else "no_" + option)
            else:
                out.append(TRL_VALUES.get(option, {}).get(token.lower(), token))
                epsilon = token if option == "eps_low" and "eps_low" in config.TYPED else epsilon
            continue
        if not token.startswith("--"):
            option = None
            out.append(token)
            continue
        typed, eq, value = token.partition("=")
        name = typed[2:].replace("-", "_")
        if name in TRL_OTHER_MEANING:
            raise UsageError(f"{typed}: {TRL_OTHER_MEANING[name]}")
        negated = name.startswith("no_") and name[3:] in TRL_NAMES
        option = TRL_NAMES.get(name[3:] if negated else name, name[3:] if negated else name)
        spelled = flag_text("no_" + option if negated else option)
        if typed != spelled:
            config.TYPED[option] = typed
        value = TRL_VALUES.get(option, {}).get(value.lower(), value)
        epsilon = value if eq and option == "eps_low" and "eps_low" in config.TYPED else epsilon
        if eq and option in flags and value.lower() in ("true", "false"):
            out.append(flag_text(option if value.lower() == "true" else "no_" + option))
        else:
            out.append(spelled + (eq + value if eq else ""))
    if epsilon is not None and "eps_high" not in given_flags(out):
        out += ["--eps-high", epsilon]
    return merged_repeats(out, ("--reward", "--reward-weights")) + rest


def trl_max_steps(cfg: Config) -> Config:
    """cfg with TRL's --max-steps N, which counts optimizer steps, read as N / (K · μ) rollouts: ours (--steps) are
    rollouts of K · μ optimizer steps each (--steps-per-rollout × --num-iterations)."""
    per_rollout = cfg.steps_per_rollout * cfg.num_iterations
    if config.TYPED.get("steps", "").replace("_", "-") != "--max-steps" or per_rollout == 1 or cfg.steps < 1:
        return cfg
    if cfg.steps % per_rollout:
        raise UsageError(
            f"{config.TYPED['steps']} {cfg.steps}: counts optimizer steps (as TRL's), {per_rollout} per rollout here "
            f"(--steps-per-rollout × --num-iterations): give a multiple of {per_rollout}"
        )
    return dataclasses.replace(cfg, steps=cfg.steps // per_rollout)


def merged_repeats(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv with each of `options` given more than once (`--reward a --reward b`) given once, with every value in
    order (`--reward a b`): tyro would keep only the last."""
    for opt in options:
        out, values, first, i = [], [], None, 0
        while i < len(argv):
            token = argv[i]
            if token != opt and not token.startswith(opt + "="):
                out.append(token)
                i += 1
                continue
            j = i + 1
            while "=" not in token and j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values += [token.partition("=")[2]] if "=" in token else argv[i + 1 : j]
            first = len(out) if first is None else first
            out += [opt] if first == len(out) else []
            i = j
        argv = out if first is None else out[: first + 1] + values + out[first + 1 :]
    return argv


def cli_of(cls, argv: list[str], default):
    """tyro.cli(cls) over argv with `default`, each option's help its docstring reflowed: tyro keeps a docstring's
    line breaks, which its own wrapping then cuts mid-sentence; an empty default shows as 'none', and a docstring's own
    "(default: …)" (evaluate.py's "the checkpoint's") becomes the one default shown, tyro's as its fallback."""
    import ast
    import inspect
    import typing

    import tyro

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {node.target.id: " ".join(inspect.cleandoc(doc.value.value).split())
            for node, doc in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}  # fmt: skip
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        doc, value = docs.get(f.name), getattr(default, f.name, f.default)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
        shown = "none" if value in ((), None) else f"'{shown}'" if " " in shown else shown
        hint = "(default: none)" if value == () else None
        if doc and (own := re.search(r" ?\(default: ([^)]*)\)", doc)):  # evaluate.py's "the checkpoint's": one hint
            doc, hint = doc[: own.start()] + doc[own.end() :], f"(default: {own[1]}; otherwise {shown})"
        fields.append(
            (f.name, typing.Annotated[hints[f.name], tyro.conf.arg(help=doc, help_behavior_hint=hint)], copy.copy(f))
        )
    helped = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))
    helped.__doc__ = " ".join(inspect.cleandoc(cls.__doc__).split())
    return cls(**vars(tyro.cli(helped, args=argv, default=default)))


def given_flags(argv: list[str]) -> set[str]:
    """The option names (max_new_tokens) that a command line sets, --no-X included."""
    names = {token.split("=", 1)[0][2:].replace("-", "_") for token in argv if token.startswith("--")}
    return names | {name[3:] for name in names if name.startswith("no_")}


def cli_config(argv: list[str] | None = None) -> Config:
    """grpo.py's command line, parsed and checked (`check_config`); a bad option exits with its one-line error."""
    return exit_on_usage_error(lambda: check_config(cfg := parse_args(argv)) or cfg)


# evaluate.py's options that a checkpoint's trainer_config.json supplies when not given (same names in Config;
# max_new_tokens comes from the run's eval_max_new_tokens when it set one)
TRAINED_OPTIONS = ("system_prompt", "instruction", "few_shot", "enable_thinking", "max_prompt_len", "temperature",
                   "top_k", "top_p", "min_p", "max_new_tokens", "reward", "reward_weights", "reward_timeout",
                   "format_weight", "overlong_buffer", "overlong_penalty")  # fmt: skip


def eval_cli_config(argv: list[str] | None = None) -> EvalConfig:
    """evaluate.py's command line: parsed, completed from the checkpoint's trainer_config.json (options not given;
    printed), and checked; a bad option exits with its one-line error."""

    argv = sys.argv[1:] if argv is None else argv
    cfg = cli_of(EvalConfig, argv, None)
    return exit_on_usage_error(lambda: check_eval_config(with_training_options(cfg, given_flags(argv))))


REWARD_OPTIONS = ("reward", "reward_weights", "reward_timeout", "format_weight", "overlong_buffer", "overlong_penalty")


def with_training_options(cfg: EvalConfig, given: set[str]) -> EvalConfig:
    """cfg with the TRAINED_OPTIONS not in `given` taken from <model>/trainer_config.json, if --model has one."""
    path = Path(cfg.model) / "trainer_config.json"
    if not path.is_file():
        return cfg
    try:
        trained = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    if trained.get("eval_max_new_tokens"):
        trained["max_new_tokens"] = trained["eval_max_new_tokens"]
    kept = given | set(REWARD_OPTIONS) if given & set(REWARD_OPTIONS) else given  # the reward list: whole or not at all
    taken = {name: tuple(v) if isinstance(v := trained[name], list) else v  # JSON has lists; the config, tuples
             for name in TRAINED_OPTIONS if name not in kept and name in trained}  # fmt: skip
    cfg = dataclasses.replace(cfg, **taken)
    shown = ", ".join(f"{name}={getattr(cfg, name)!r} ({'trainer_config.json' if name in taken else 'given'})"
                      for name in TRAINED_OPTIONS if name in taken or name in given)  # fmt: skip
    print(f"[eval] {cfg.model} is a training checkpoint; options: {shown}", flush=True)
    return cfg


def exit_on_usage_error(fn, *args):
    """fn(*args), with a UsageError printed as one line (`error: …`, exit status 2) instead of a traceback."""
    try:
        return fn(*args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
