"""Held-out evaluation with the training sampler, masks and reward, so that its numbers compare with training's.

Each problem is sampled k times exactly as a GRPO rollout samples it (`rollout.rollout` with the policy's `LogitAdjust`:
temperature, padding rows, the reasoning-vocabulary gate and offset), decoded with reasoning ids mapped back to their
source tokens, and scored by the training run's reward functions (scoring.py, after the `<think>` a prompt opened):
correctness is the accuracy function's (math-verify), and each reward's mean is reported beside pass@k.
For a problem with n samples of which c are correct:

    pass@1 = c / n                                   mean over the k samples (then over problems)
    pass@k = 1 − C(n − c, k) / C(n, k)               unbiased estimate of P(≥ 1 of k samples correct), Chen et al. 2021
    reasoning share = Σ reasoning ids inside think / Σ tokens inside think      (over all completions)

Every figure is the mean over problems (pass@k) or over completions (mean length, truncation rate). Sample j of
dataset row i is drawn with its own noise stream seeded by (seed, i, j), so results do not depend on the batch size or
the number of ranks, and every evaluation during a training run sees the same noise (differences are the model's).

    python evaluate.py --model runs/rv/checkpoints/step_000100 --datasets HuggingFaceH4/MATH-500 aime.jsonl --samples 8
    torchrun --nproc_per_node 4 evaluate.py --model Qwen/Qwen3-0.6B --samples 16     # problems sharded over ranks

writes <output_dir>/<dataset>.jsonl (one line per problem: its completions, extracted answers, correctness, lengths),
<output_dir>/summary.json ({dataset: summary}) and eval_config.json, and prints a table.
"""

from __future__ import annotations

from cli import eval_cli_config, exit_on_usage_error
from config import EvalConfig, UsageError, check_eval_config, reward_entries

if __name__ == "__main__":  # --help and option errors before the heavy imports below (~1 s)
    CLI_CONFIG = eval_cli_config()

import dataclasses
import math
import re
import time
from pathlib import Path

import torch as th
import torch.distributed as dist

import data
import reward
import scoring
import vocab as rvocab
from checkpoints import load_model_and_tokenizer
from distributed import any_rank, preempted, setup_distributed, teardown_distributed, world
from logs import write_json, write_jsonl
from policy import LogitAdjust, model_adjust
from rollout import reward_samples, rollout, sample_seed, sampling_copy, uses_bf16


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021):

        pass@k = 1 − C(n − c, k) / C(n, k) = 1 − ∏_{i = n − c + 1}^{n} (1 − k / i)

    The product form avoids the huge binomials; it is 1 when n − c < k (every k-subset holds a correct sample)."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n, c, k)):
        raise ValueError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n ≥ 1 samples and 0 ≤ c ≤ n correct, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 ≤ k ≤ n (k of the n samples), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(samples: int) -> list[int]:
    """The k reported for `samples` samples per problem: powers of 2 up to it, and `samples` itself."""
    return sorted({2**i for i in range(samples.bit_length()) if 2**i <= samples} | {samples})


def summarize(records: list[dict], samples: int) -> dict:
    """The summary of per-problem records (see `evaluate`): pass@k for k in pass_ks(samples), mean completion length
    (tokens, EOS included), each reward's mean and the weighted sum's, truncation rate, and the reasoning share (None
    without a reasoning vocabulary)."""
    if not records:
        raise ValueError("summarize: no records")
    correct = [sum(rec["correct"]) for rec in records]
    lengths = [n for rec in records for n in rec["lengths"]]
    truncated = [t for rec in records for t in rec["truncated"]]
    summary = {"num_problems": len(records), "samples": samples}
    for k in pass_ks(samples):
        summary[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / len(records)
    summary["mean_length"] = sum(lengths) / len(lengths)
    if "reward" in records[0]:  # each reward's mean over completions, and their weighted sum's
        summary["reward"] = sum(v for rec in records for v in rec["reward"]) / len(lengths)
        for name in records[0]["rewards"]:
            summary[f"reward/{name}"] = sum(v for rec in records for v in rec["rewards"][name]) / len(lengths)
    summary["truncation_rate"] = sum(truncated) / len(truncated)
    summary["reasoning_share"] = None
    if "think_tokens" in records[0]:  # as vocab.ReasoningVocab.stats: 0 when no token was inside think
        think = sum(n for rec in records for n in rec["think_tokens"])
        summary["reasoning_share"] = sum(n for rec in records for n in rec["reasoning_tokens"]) / max(think, 1)
    return summary


@th.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: list[data.Example],
    adjust: LogitAdjust,
    *,
    samples: int,
    max_new_tokens: int,
    greedy: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    head=None,
    scorer=None,
    overlong_buffer: int = 0,
    should_stop=None,
    progress_every: float = 0.0,
    cache: list | None = None,
) -> tuple[list[dict], dict]:
    """Sample every example `samples` times with the policy `adjust` (its vocab is the reasoning vocabulary, if any)
    and score the completions; returns (records, summary), the same on every rank.

    Under torch.distributed rank r samples examples[r::world] and the records are gathered. One record per example,
    sorted by dataset index: index, problem, gold, opens_think (the prompt opened a think block, so the reward saw
    "<think>" + completion), completions (text, reasoning ids mapped to their sources), answers (the last boxed answer
    after </think>, or None), correct, lengths (tokens, EOS included), truncated (no EOS within max_new_tokens), and
    with a reasoning vocabulary think_tokens and reasoning_tokens (reasoning ids among them), and each sample's reward
    (the weighted sum) and rewards ({name: value}). The summary is `summarize(records, samples)`. scorer(samples) →
    scoring.Scores scores them (default: the accuracy reward alone; overlong_buffer is the run's, for its overlong
    reward); a completion is correct when its accuracy is 1. batch_size (the engine's slots), head, cache (a training
    run's KV cache) and should_stop() go to rollout.rollout, and so does progress_every (> 0: a progress line every
    that many seconds)."""
    if samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need samples, batch_size, max_new_tokens ≥ 1, got {samples}, {batch_size}, {max_new_tokens}")
    if not examples:
        raise ValueError("evaluate: no examples")
    rank, world_size = world()
    mine = examples[rank::world_size]
    records = []
    if mine:  # a rank can have none when there are more ranks than problems
        scorer = scorer or scoring.scorer()
        records = score_records(model, tokenizer, mine, adjust, samples, seed, scorer, overlong_buffer,
                                max_new_tokens=max_new_tokens, greedy=greedy, slots=batch_size, head=head,
                                should_stop=should_stop, progress_every=progress_every, cache=cache)  # fmt: skip
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, records)
        records = [rec for part in gathered for rec in part]
    records.sort(key=lambda rec: rec["index"])
    return records, summarize(records, samples)


def score_records(model, tokenizer, mine: list[data.Example], adjust: LogitAdjust, samples: int, seed: int, scorer,
                  overlong_buffer: int, **sampling) -> list[dict]:  # fmt: skip
    """`evaluate`'s records of this rank's examples (see there); `sampling` goes to rollout.rollout."""
    vocab = adjust.vocab
    jobs = [(ex, j) for ex in mine for j in range(samples)]  # a problem's samples are consecutive
    seeds = [sample_seed(seed, 0, ex.index, j) for ex, j in jobs]
    r = rollout(model, tokenizer, [ex.prompt_ids for ex, _ in jobs], seeds, adjust, **sampling)
    ids, mask = r.completion_ids.cpu(), r.completion_mask.cpu()  # (B, T)
    texts, lengths, truncated = r.texts, mask.sum(-1).tolist(), r.truncated.cpu().tolist()
    inside = adjust.inside(ids, r.start_inside.cpu() if r.start_inside is not None else None)  # (B, T) | None
    if inside is not None:
        think = mask.bool() & inside
        think_tokens = think.sum(-1).tolist()
        reasoning_tokens = (think & (ids >= vocab.standard_size)).sum(-1).tolist()

    # The reward sees the think block a prompt opened, exactly as in training.
    scored = reward_samples(r, [ex for ex, _ in jobs], vocab, sampling["max_new_tokens"], overlong_buffer)
    scores = scorer(scored)
    records = []
    for p, ex in enumerate(mine):
        at = slice(p * samples, (p + 1) * samples)
        rec = {
            "index": ex.index,
            "problem": ex.problem,
            "gold": ex.answer,
            "opens_think": r.opened_think[p * samples],
            "completions": texts[at],
            "answers": [reward.extract_boxed(reward.answer_part(s.completion)) for s in scored[at]],
            "correct": [float(a) == 1.0 for a in scores.accuracy[at]],
            "reward": scores.total[at],
            "rewards": {name: values[at] for name, values in scores.parts.items()},
            "lengths": lengths[at],
            "truncated": truncated[at],
        }
        if vocab is not None:
            rec.update(think_tokens=think_tokens[at], reasoning_tokens=reasoning_tokens[at])
        records.append(rec)
    return records


def due_at_start(cfg, output_dir: Path, step: int, fresh: bool) -> bool:
    """Whether a training run (grpo.Config) starts at a step to evaluate first: step 0 of a `fresh` run, or,
    resuming, an evaluation step that a stop request interrupted (its record is missing; rank 0's files decide, for
    every rank)."""
    if step % cfg.eval_every and step != cfg.steps:
        return False
    if fresh:
        return step == 0
    return any_rank(world()[0] == 0 and not (output_dir / "eval" / f"step_{step:06d}.jsonl").exists())


def during_training(model, tokenizer, examples: list[data.Example], adjust: LogitAdjust, at_step: int, *,
                    output_dir: Path, steps: int, **kwargs) -> dict[str, float]:  # fmt: skip
    """A training run's periodic evaluation at `at_step` (of `steps`): the eval_* metrics (`training_metrics`), with
    rank 0 writing the records to <output_dir>/eval/step_NNNNNN.jsonl and printing a line; kwargs go to `evaluate`.
    Every rank calls it at the same points (it gathers); a preemption during it discards it ({})."""
    t = time.perf_counter()
    records, summary = evaluate(model, tokenizer, examples, adjust, **kwargs)
    if preempted():
        return {}
    m = {**training_metrics(summary), "eval_s": time.perf_counter() - t}
    if world()[0] == 0:
        write_jsonl(Path(output_dir) / "eval" / f"step_{at_step:06d}.jsonl", records)
        k = summary["samples"]
        print(f"eval {at_step:>4}/{steps} | acc {m['eval_accuracy']:.3f} | pass@{k} {m[f'eval_pass@{k}']:.3f} | "
              f"len {m['eval_len']:.0f} | truncated {m['eval_truncated']:.3f} | {m['eval_s']:.1f}s", flush=True)  # fmt: skip
    return m


def training_metrics(summary: dict) -> dict[str, float]:
    """The eval_* keys a training run logs: eval_accuracy (pass@1), eval_pass@k (k = samples), eval_len,
    eval_truncated, eval_reward and eval_reward/NAME, and, with a reasoning vocabulary, eval_reasoning_share."""
    k = summary["samples"]
    m = {
        "eval_accuracy": summary["pass@1"],
        f"eval_pass@{k}": summary[f"pass@{k}"],
        "eval_len": summary["mean_length"],
        "eval_truncated": summary["truncation_rate"],
    }
    if "reward" in summary:
        m["eval_reward"] = summary["reward"]
        m.update({f"eval_{key}": v for key, v in summary.items() if key.startswith("reward/")})
    if summary["reasoning_share"] is not None:
        m["eval_reasoning_share"] = summary["reasoning_share"]
    return m


# ---------------------------------------------------------------------------------------------------------------------
# Files and the command line


LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
PROGRESS_EVERY = 30.0  # seconds between the progress lines of a long evaluation


def dataset_name(source: str) -> str:
    """File name (without .jsonl) of a dataset's records: a local file's stem; a hub id with '/' and ':' as '_'."""
    if Path(source).suffix in LOCAL_SUFFIXES:
        return Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", source)


def default_split(source: str) -> str:
    """'test' for a hub id and for 'arithmetic' (its held-out problems); a local file is one split, which datasets
    calls 'train'."""
    return "train" if Path(source).suffix in LOCAL_SUFFIXES else "test"


def evaluate_datasets(cfg: EvalConfig) -> dict[str, dict]:
    """Evaluate cfg.model on each of cfg.datasets; returns {dataset: summary} and (rank 0) writes the files."""
    check_eval_config(cfg)
    names = [dataset_name(d) for d in cfg.datasets]
    if len(set(names)) < len(names):
        raise UsageError(f"--datasets {' '.join(cfg.datasets)}: would share an output file name: {names}")
    device = setup_distributed(cfg.device)
    rank, world_size = world()
    autocast = uses_bf16(device, cfg.bf16)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    vocab = rvocab.load(cfg.model) if Path(cfg.model).is_dir() else rvocab.load(model)
    adjust = model_adjust(model, tokenizer, vocab, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    scorer = scoring.scorer(reward_entries(cfg), timeout=cfg.reward_timeout)
    sampler = sampling_copy(model) if autocast else model
    out = Path(cfg.output_dir)
    if rank == 0:
        write_json(out / "eval_config.json", dataclasses.asdict(cfg))

    summaries = {}
    for source, name in zip(cfg.datasets, names, strict=True):
        examples = data.load_examples(
            source,
            tokenizer,
            split=cfg.split or default_split(source),
            prompt_field=cfg.prompt_field,
            answer_field=cfg.answer_field,
            system_prompt=cfg.system_prompt,
            instruction=cfg.instruction,
            few_shot=cfg.few_shot,
            enable_thinking=cfg.enable_thinking,
            max_prompt_len=cfg.max_prompt_len,
            max_samples=cfg.max_problems,
            seed=cfg.seed,
            skip_bad_rows=cfg.skip_bad_rows,
        )
        if rank == 0:
            print(f"[eval] {source}: {len(examples)} problems × {cfg.samples} on {world_size} rank(s)", flush=True)
        t0 = time.perf_counter()
        records, summaries[source] = evaluate(sampler, tokenizer, examples, adjust, samples=cfg.samples,
                                              max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy, scorer=scorer,
                                              overlong_buffer=cfg.overlong_buffer, batch_size=cfg.batch_size,
                                              seed=cfg.seed,
                                              head=model.get_output_embeddings(),
                                              progress_every=PROGRESS_EVERY if rank == 0 else 0.0)  # fmt: skip
        if rank == 0:  # after every dataset, so that a crash keeps the finished ones
            write_jsonl(out / f"{name}.jsonl", records)
            write_json(out / "summary.json", summaries)
            print(f"[eval] {source}: done in {time.perf_counter() - t0:.1f}s → {out / name}.jsonl", flush=True)
    if rank == 0:
        print(format_table(summaries), flush=True)
    teardown_distributed()
    return summaries


def format_table(summaries: dict[str, dict]) -> str:
    """A Markdown table: dataset | problems | pass@1 | pass@k | reward | mean len | truncated | reasoning share."""
    lines = ["| dataset | problems | pass@1 | pass@k | reward | mean len | truncated | reasoning share |",
             "|---" * 8 + "|"]  # fmt: skip
    for source, s in summaries.items():
        k = s["samples"]
        share = "—" if s["reasoning_share"] is None else f"{s['reasoning_share']:.3f}"
        lines.append(f"| {source} | {s['num_problems']} | {s['pass@1']:.3f} | {s[f'pass@{k}']:.3f} (k={k}) | "
                     f"{s['reward']:.3f} | {s['mean_length']:.0f} | {s['truncation_rate']:.3f} | {share} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Parse the command line (default: sys.argv[1:]; see cli.eval_cli_config) and evaluate; returns
    {dataset: summary}."""
    return exit_on_usage_error(evaluate_datasets, eval_cli_config(argv))


if __name__ == "__main__":
    exit_on_usage_error(evaluate_datasets, CLI_CONFIG)
