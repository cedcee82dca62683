"""The run directory's records: a step's metrics (metrics.jsonl, one JSON object per step), samples.jsonl, the console line, Weights &
Biases, and atomic JSON writes (a temporary file, then os.replace)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch as th
import torch.nn.functional as F

import vocab as rvocab
from distributed import all_gather_cat, all_reduce_sum, world
from policy import CLASSES, LogitAdjust
from rollout import decode


def step_metrics(step: int, out: dict, group_size: int, model, adjust: LogitAdjust, drift: bool) -> dict:
    """The step's metrics over the global batch (every rank's rollouts), from grpo.grpo_step's `out`; with a
    reasoning vocabulary its usage and, if `drift`, the embedding drift of the copies."""
    r, stats, device = out["rollout"], out["stats"], out["rewards"].device
    lengths = all_gather_cat(r.completion_mask.sum(-1).float())
    rewards = all_gather_cat(out["rewards"])
    accuracy = all_gather_cat(th.tensor(out["accuracy"], dtype=th.float32, device=device))
    truncated = all_gather_cat(r.truncated.float())
    entropy_sum = all_reduce_sum((r.entropy * r.completion_mask).sum().reshape(1).float())
    uniform = all_gather_cat(out["uniform"].float()).bool()  # (num_prompts,) over every rank: grpo.uniform_groups
    in_loss = all_reduce_sum(
        out["loss_mask"].view(-1, group_size, out["loss_mask"].shape[1]).any(-1).any(-1).sum().reshape(1)
    )
    m = {
        "step": step,
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "accuracy": float(accuracy.mean()),
        **reward_metrics(out["reward_parts"], out["reward_failures"], device),
        "frac_reward_zero_std": float(uniform.float().mean()),
        "groups_informative": float((~uniform).sum()),
        "groups_in_loss": float(in_loss),
        "resample_rounds": float(out["resample_rounds"]),
        "loss": stats["loss"],
        "kl": stats["kl"],
        "clip_frac": stats["clip_frac_low"] + stats["clip_frac_high"],
        "clip_frac_low": stats["clip_frac_low"],
        "clip_frac_high": stats["clip_frac_high"],
        "ratio": stats["ratio"],
        "completion_len": float(lengths.mean()),
        "completion_len_max": float(lengths.max()),
        "truncated_frac": float(truncated.mean()),
        "entropy": float(entropy_sum / lengths.sum().clamp(min=1)),
        "sampler_kl": stats["sampler_kl"],
        "sampler_dlogp_max": stats["sampler_dlogp_max"],
        "grad_norm": stats["grad_norm"],
        "skipped_update": stats["skipped"],
        "rollout_s": out["rollout_s"],
        "update_s": out["update_s"],
        "tokens_per_s": float(lengths.sum()) / (time.perf_counter() - out["t0"]),
    }
    vocab = adjust.vocab
    if vocab is not None:
        local = vocab.stats(r.completion_ids, r.completion_mask, adjust.inside(r.completion_ids, r.start_inside))
        keys = ("reasoning_frac", "reasoning_outside", "think_len")
        summed = all_reduce_sum(th.tensor([local[k] for k in keys], device=device))
        world_size = world()[1]
        m.update(reasoning_frac=float(summed[0]) / world_size, reasoning_outside=float(summed[1]),
                 think_len=float(summed[2]) / world_size)  # fmt: skip
        if drift:
            m.update(rvocab.embed_drift(model, vocab))
    if out.get("classes") is not None:
        m.update(class_metrics(out, stats["by_class"]))
    return m


def merged_stats(stats: list[dict]) -> dict:
    """One pass's update statistics over its K mini-batch steps: means, except by_class (summed), the largest
    sampler_dlogp_max and the number of skipped steps."""
    if len(stats) == 1:
        return stats[0]
    merged = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0] if k not in ("by_class", "skipped")}
    merged["sampler_dlogp_max"] = max(s["sampler_dlogp_max"] for s in stats)
    merged["skipped"] = sum(s["skipped"] for s in stats)
    merged["by_class"] = sum(s["by_class"] for s in stats) if stats[0]["by_class"] is not None else None
    return merged


def reward_metrics(parts: dict[str, list[float]], failures: dict[str, int], device) -> dict[str, float]:
    """reward/NAME (each reward function's mean, before its weight) and reward_failures/NAME (completions it scored 0
    by failing) over every rank's completions."""
    m = {}
    for name, values in parts.items():
        m[f"reward/{name}"] = float(all_gather_cat(th.tensor(values, dtype=th.float32, device=device)).mean())
        m[f"reward_failures/{name}"] = float(all_reduce_sum(th.tensor([failures[name]], device=device)))
    return m


def class_metrics(out: dict, by_class: th.Tensor) -> dict[str, float]:
    """The reasoning-vocabulary diagnostics, per token class (policy.CLASSES: think standard ids, think reasoning ids,
    outside think) over every rank's completions: `_tokens` (count), `_entropy` (mean, over text), `_abs_adv` (Σ|A|
    over the class's tokens: the policy-gradient weight it received), and over the tokens in the loss `_clip_low`,
    `_clip_high` (fractions) and `_ratio` (mean ρ) from update's sums."""
    r, classes = out["rollout"], out["classes"]
    mask = r.completion_mask.bool()
    onehot = F.one_hot(classes, len(CLASSES)) * mask[..., None]  # (B, T, K)
    adv = out["advantages"].abs()[:, None, None]  # (B, 1, 1)
    sums = all_reduce_sum(th.stack([onehot.sum((0, 1)), (onehot * r.entropy[..., None]).sum((0, 1)),
                                    (onehot * adv).sum((0, 1))], -1).float())  # (K, 3)  # fmt: skip
    m = {}
    for k, name in enumerate(CLASSES):
        n, in_loss = float(sums[k, 0]), max(float(by_class[k, 0]), 1.0)
        m.update({f"{name}_tokens": n, f"{name}_entropy": float(sums[k, 1]) / max(n, 1.0),
                  f"{name}_abs_adv": float(sums[k, 2]), f"{name}_clip_low": float(by_class[k, 1]) / in_loss,
                  f"{name}_clip_high": float(by_class[k, 2]) / in_loss, f"{name}_ratio": float(by_class[k, 3]) / in_loss})  # fmt: skip
    return m


def copy_usage(r, vocab) -> th.Tensor:
    """(n_r,) how often each reasoning copy was sampled in this step's completions, summed over ranks."""
    ids = r.completion_ids[r.completion_mask.bool()]
    ids = ids[ids >= vocab.standard_size] - vocab.standard_size
    return all_reduce_sum(th.bincount(ids, minlength=vocab.size).float()).long()


def sample_records(step: int, batch: list, out: dict, tokenizer, vocab, group_size: int) -> list[dict]:
    """One sample from each of the first 4 groups, reasoning tokens ⟦marked⟧, for samples.jsonl."""
    r = out["rollout"]
    return [
        {"step": step, "problem": batch[i // group_size].problem, "answer": out["answers"][i],
         "reward": float(out["rewards"][i]),
         "completion": decode(tokenizer, vocab, r.completion_ids[i][r.completion_mask[i].bool()].tolist(), mark=True)}
        for i in range(0, min(len(r.texts), 4 * group_size), group_size)
    ]  # fmt: skip


def log_step(output_dir: Path, m: dict, steps: int, run) -> None:
    """Append the step's metrics to metrics.jsonl, print its line, and log it to wandb (`run`, or None)."""
    with (output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(m) + "\n")
    if "reward" in m:  # the step-0 line holds only the evaluation (printed by itself)
        print(
            f"step {m['step']:>4}/{steps} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | "
            f"len {m['completion_len']:.0f} | kl {m['kl']:.4f} | ent {m['entropy']:.2f} | "
            f"rollout {m['rollout_s']:.1f}s + update {m['update_s']:.1f}s"
            + (" | SKIPPED non-finite update" if m["skipped_update"] else ""),
            flush=True,
        )
    if run is not None:
        run.log(m, step=m["step"])


def log_samples(output_dir: Path, samples: list[dict], run) -> None:
    """Append sample completions to samples.jsonl, print the first, and log them to wandb as a table."""
    with (output_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    print(f"  sample (reward {samples[0]['reward']:.2f}): {samples[0]['completion'][:200]!r}", flush=True)
    if run is not None:
        import wandb  # only with --wandb online/offline

        cols = ["step", "problem", "answer", "reward", "completion"]
        run.log({"samples": wandb.Table(columns=cols, data=[[s[c] for c in cols] for s in samples])}, step=samples[0]["step"])  # fmt: skip


def truncate_logs(output_dir: Path, step: int) -> None:
    """Make the run directory's logs agree with the checkpoint resumed from: drop the lines of metrics.jsonl and
    samples.jsonl past `step` (written after it, before a crash; a line cut short by the crash too) and the eval
    records of later steps, atomically."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        if (path := output_dir / name).exists():
            _write_atomic(path, "".join(s + "\n" for s in path.read_text().splitlines() if _step_of_line(s) <= step))
    for path in (output_dir / "eval").glob("step_*.jsonl"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()


def _step_of_line(line: str) -> float:
    """A log line's step; infinity (dropped) for a blank or torn line."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place."""
    _write_atomic(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def write_json(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
