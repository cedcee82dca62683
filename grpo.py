"""GRPO with verifiable rewards, from scratch. One optimizer step (`grpo_step`), for a batch of prompts q, each
sampled G times (a *group*):

    1. rollout     o_1 … o_G ~ π_old(·|q)                      rollout.rollout (the policy π: policy.LogitAdjust)
    2. reward      r_i = Σ_k w_k f_k(o_i, gold)                 scoring.score (the verifier: reward.py)
    3. advantage   A_i = r_i relative to its group             group_advantages
    4. loss        clipped ratio π_θ/π_old times A, + β·KL     policy_loss, on packing.packed_logprobs
    5. update      AdamW steps over micro-batches and ranks     update (μ passes of K mini-batches: grpo_step)

Each equation is written once, in the docstring of the function that computes it. `train` is the loop around
`grpo_step`: the data order, periodic evaluation (evaluate.py), metrics (logs.py), checkpoints and resume
(checkpoints.py), torchrun and SLURM preemption (distributed.py).

    python grpo.py --help             # every option
    python grpo.py --preset demo      # a small model on CPU, offline
    torchrun --nproc_per_node 4 grpo.py --lr 3e-6
"""

from __future__ import annotations

import os

from cli import cli_config, exit_on_usage_error
from config import Config, check_config, reward_entries

if __name__ == "__main__":  # the command line first, before the heavy imports below: --help and errors in ~1 s
    CLI_CONFIG = cli_config()
    if CLI_CONFIG.plan:  # the memory plan from the model's config alone, then exit
        import memory

        raise SystemExit(exit_on_usage_error(memory.print_plan, CLI_CONFIG))
    # Before CUDA initialises: the run's one KV cache and the update's activations then do not fragment each other.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import dataclasses
import json
import math
import random
import re
import time
import warnings
from functools import partial
from pathlib import Path

import torch as th
import torch.nn.functional as F

import data
import evaluate
import memory
import packing
import scoring
import vocab as rvocab
from checkpoints import (
    decoder_checkpointing,
    find_resume,
    frozen_copy,
    load_model_and_tokenizer,
    restore_trainer_state,
    save_checkpoint,
)
from distributed import (
    all_reduce_grads,
    all_reduce_max,
    all_reduce_sum,
    catch_preemption,
    preempted,
    setup_distributed,
    stop_requested,
    teardown_distributed,
    world,
)
from engine import new_cache, slot_count
from logs import copy_usage, log_samples, log_step, merged_stats, sample_records, step_metrics, truncate_logs
from policy import CLASSES, LogitAdjust, model_adjust, token_classes, token_logprobs
from rollout import (
    Rollout,
    concat_rollouts,
    copy_weights,
    positions,
    reward_samples,
    rollout,
    sample_seed,
    sampling_policy,
    take_rows,
    uses_bf16,
)
from sharding import forward_call, full, is_sharded, shard

# ---------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: advantages, loss, training log-probs, update, one step


def group_advantages(
    rewards: th.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, reduce=lambda t: t
) -> th.Tensor:
    """A_i = (r_i − mean_g(r)) / (std + ε) for rewards (num_prompts · G,), group-major.

    mean_g is the mean of the sample's own group; std is the group's ("group", GRPO), the whole batch's over every
    rank ("batch"; `reduce` sums across ranks), or 1 with no ε ("none", Dr.GRPO). std is Bessel-corrected (as TRL),
    ε = 1e-4. A group whose rewards are all equal gets A = 0: it carries no learning signal."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size ≥ 2 (a one-sample group has no std)")
    r = rewards.float().view(-1, group_size)  # (num_prompts, G)
    # Exactly 0 where a group's rewards are equal (0.3 − mean(0.3, …) is not 0 in float32): no step on rounding noise.
    centered = th.where(uniform_groups(rewards, group_size)[:, None], 0.0, r - r.mean(-1, keepdim=True))
    if scale == "group":
        centered = centered / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":  # from every rank's count, Σr and Σr² (float64)
        d = r.double()
        n, s1, s2 = reduce(th.stack([d.new_tensor(d.numel()), d.sum(), (d * d).sum()])).tolist()
        centered = centered / (math.sqrt(max(s2 - s1 * s1 / n, 0) / (n - 1)) + eps) if n > 1 else centered * 0
    return centered.view(-1)


def uniform_groups(rewards: th.Tensor, group_size: int) -> th.Tensor:
    """(num_prompts,) bool: the groups whose rewards are all equal (A = 0 for each of their samples). DAPO's dynamic
    sampling leaves them out of the loss and its normaliser, where they would only dilute the step."""
    r = rewards.view(-1, group_size)
    return r.max(-1).values == r.min(-1).values


def policy_loss(
    logp: th.Tensor,
    old_logp: th.Tensor,
    ref_logp: th.Tensor | None,
    advantages: th.Tensor,
    mask: th.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    kl_ratio_weight: bool = False,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    max_len: int | None = None,
    sampler_logp: th.Tensor | None = None,
    correction: str = "none",
    cap: float = 2.0,
    ratio_level: str = "token",
    classes: th.Tensor | None = None,
) -> tuple[th.Tensor, dict]:
    """Clipped policy-gradient loss with optional KL to a reference policy, optionally corrected for the sampler.

        ρ_t  = exp(log π_θ(o_t) − log π_old(o_t))
        ℓ_t  = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β · KL_t
        KL_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1          (k3 estimator, ≥ 0)
    On tokens from π_θ, ∇KL_t is in expectation the gradient of the forward KL(π_ref‖π_θ) (GRPO's loss); with
    kl_ratio_weight the term is β · ρ_t · KL_t, whose gradient is the reverse KL(π_θ‖π_ref)'s (TRL's default).

    ratio_level "sequence" (GSPO, Zheng et al. 2025) replaces ρ_t by one ratio per completion i, the geometric mean
    of its token ratios, so clipping keeps or drops a whole completion:
        s_i  = exp( Σ_t m_it (log π_θ(o_it) − log π_old(o_it)) / Σ_t m_it )

    The tokens were drawn from the sampler's π_s (the engine's bf16 copy), not exactly from π_old. With
    δ_t = log π_old(o_t) − log π_s(o_t) (sampler_logp = log π_s), the policy-gradient term of each ℓ_t (not the KL
    term, as in TRL) is multiplied by the constant w:
        "tis"            w_t = min(exp δ_t, C)                                truncated importance sampling, per token
                                                                              (Yao et al. 2025; TRL token_truncate)
        "sequence_mask"  w_i = 1[1/C ≤ exp(mean_t δ_it) ≤ C]                  drop completions whose sampler strayed
        "none"           w = 1
    With identical log-probs (δ = 0) every correction is a no-op.

    Aggregation over the completion tokens m_it (mask) of the optimizer step:
        "token"    (DAPO)     L = Σ_it m_it ℓ_it / N_tok                    N_tok = num_tokens (default Σ m)
        "sequence" (GRPO)     L = Σ_i (Σ_t m_it ℓ_it / Σ_t m_it) / N_seq    N_seq = num_sequences (default B)
        "dr_grpo"  (Dr.GRPO)  L = Σ_it m_it ℓ_it / (N_seq · L_max)          L_max = max_len (default T)
    Pass the whole step's N_tok / N_seq when the step runs as micro-batches (or ranks): the gradient is then the same.

    Shapes: logp, old_logp, ref_logp, mask (B, T); advantages (B,). Returns the loss and detached statistics; with
    `classes` (B, T), indices into policy.CLASSES, also stats["by_class"], (len(CLASSES), 4) sums over each class's
    tokens of [1, low clip, high clip, ρ] (the reasoning-vocabulary diagnostics)."""
    B, T = logp.shape
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp  # (B, T)
    if ratio_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = log_ratio.exp()  # (B, T) or (B, 1)
    A = advantages[:, None].to(logp.dtype)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -th.min(ratio * A, clipped_ratio * A)
    if correction != "none" and sampler_logp is not None:
        per_token = per_token * sampler_weight(old_logp.detach(), sampler_logp, mask, correction, cap)
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta ≠ 0 needs ref_logp")
        d = ref_logp - logp
        kl = d.exp() - d - 1
        per_token = per_token + beta * (kl * ratio if kl_ratio_weight else kl)

    if loss_type == "token":
        loss = (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    elif loss_type == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_seq.sum() / (num_sequences if num_sequences is not None else B)
    elif loss_type == "dr_grpo":
        n_seq = num_sequences if num_sequences is not None else B
        loss = (per_token * mask).sum() / (n_seq * (max_len if max_len is not None else T))
    else:
        raise ValueError(f"loss_type must be 'token', 'sequence' or 'dr_grpo', got {loss_type!r}")

    with th.no_grad():
        n = mask.sum().clamp(min=1)
        low, high = ((ratio < 1 - eps_low) & (A < 0)) * mask, ((ratio > 1 + eps_high) & (A > 0)) * mask  # (B, T)
        stats = {
            "clip_frac_low": float(low.sum() / n),
            "clip_frac_high": float(high.sum() / n),
            "ratio": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
        }
        if classes is not None:
            counted = th.stack([mask, low, high, ratio * mask], -1)  # (B, T, 4)
            stats["by_class"] = th.einsum("btk,btf->kf", F.one_hot(classes, len(CLASSES)).to(mask.dtype), counted)
        if sampler_logp is not None:  # how far the sampler is from the trainer: k3 estimate of KL(π_s ‖ π_old)
            d = old_logp.detach() - sampler_logp
            stats["sampler_kl"] = float(((d.exp() - d - 1) * mask).sum() / n)
            stats["sampler_dlogp_max"] = float((d.abs() * mask).max()) if mask.numel() else 0.0
    return loss, stats


def sampler_weight(old_logp: th.Tensor, sampler_logp: th.Tensor, mask: th.Tensor, correction: str, cap: float):
    """The (B, T) or (B, 1) weight w of `policy_loss`'s sampler correction (no gradient)."""
    delta = (old_logp - sampler_logp) * mask
    if correction == "tis":
        return delta.exp().clamp(max=cap)
    if correction == "sequence_mask":
        mean = delta.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return ((mean >= -math.log(cap)) & (mean <= math.log(cap))).to(old_logp.dtype)
    raise ValueError(f"correction must be 'tis', 'sequence_mask' or 'none', got {correction!r}")


def sequence_logprobs(
    model,
    prompt_ids: th.Tensor,
    prompt_mask: th.Tensor,
    completion_ids: th.Tensor,
    completion_mask: th.Tensor,
    adjust: LogitAdjust,
    start_inside: th.Tensor | None = None,
    chunk: int = 256,
) -> th.Tensor:
    """log π(o_t | q, o_<t) for every completion token of a padded block (left-padded prompts (B, P), completions
    (B, T)): (B, T) fp32, zero where completion_mask is 0. packing.packed_logprobs is the padding-free twin.

    Logits at position t predict token t+1, so the hidden states of positions P−1 … P+T−2 score the completion;
    only completion tokens go through the output layer (policy.token_logprobs: memory-flat in B × T × V)."""
    P = prompt_ids.shape[1]
    ids = th.cat([prompt_ids, completion_ids], 1)
    mask = th.cat([prompt_mask, th.ones_like(completion_mask)], 1)  # as the sampler attended: post-EOS pads are unseen
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    hidden = hidden.last_hidden_state
    hidden = hidden[:, P - 1 : -1]  # (B, T, H)
    inside = adjust.inside(completion_ids, start_inside)
    keep = completion_mask.bool()
    flags = inside[keep] if inside is not None else None
    logp = th.zeros(completion_ids.shape, dtype=th.float32, device=ids.device)
    return logp.masked_scatter(keep, token_logprobs(model, adjust, hidden[keep], completion_ids[keep], flags, chunk))


def micro_batches(r: Rollout, loss_mask: th.Tensor, size: int, tokens: int) -> list:
    """The step's micro-batches, this rank's share, as rows of `r`: packed (`tokens` > 0, packing.pack) — the rows
    with a loss token, first-fit into rows of at most `tokens` prompt + completion tokens — or padded, `size`
    consecutive rows at a time (slices). Every rank gets as many (all-reduced; empty ones are one-token padding passes
    of zero weight), so ranks run the same number of forward/backward passes: collectives inside a pass (sharded
    weights gathered in forward, gradient hooks) would otherwise wait on a rank that has none left."""
    if not isinstance(tokens, int):
        raise ValueError(
            f"micro_batch_tokens must be a number of tokens ('auto' is resolved by `planned`), got {tokens!r}"
        )
    B = r.completion_ids.shape[0]
    if tokens <= 0:
        batches = [slice(s, min(s + size, B)) for s in range(0, B, size)]
    else:
        lengths, has_loss = th.stack(
            [r.prompt_mask.sum(-1) + r.completion_mask.sum(-1), loss_mask.sum(-1) > 0]
        ).tolist()
        rows = [i for i in range(B) if has_loss[i]]
        batches = [[rows[j] for j in b] for b in packing.pack([lengths[i] for i in rows], tokens)]
    count = int(all_reduce_max(th.tensor([len(batches)], device=r.completion_ids.device)).item())
    return batches + [[]] * (count - len(batches))


def micro_batch_logprobs(model, r: Rollout, rows, adjust: LogitAdjust, chunk: int) -> tuple[th.Tensor, int]:
    """(b, T) log-probs of the rows of one micro-batch (`micro_batches`) and T, its longest completion."""
    if isinstance(rows, list):
        return forward_call(model, packing.packed_logprobs, model, r, rows, adjust, chunk)
    cm = r.completion_mask[rows]
    T = max(int(cm.sum(-1).max()), 1)  # cut to the micro-batch's own longest completion
    start = r.start_inside[rows] if r.start_inside is not None else None
    c = r.completion_ids[rows, :T]
    args = (model, r.prompt_ids[rows], r.prompt_mask[rows], c, cm[:, :T], adjust, start, chunk)
    return forward_call(model, sequence_logprobs, *args), T


def batched_logprobs(model, r: Rollout, adjust: LogitAdjust, batches: list, chunk: int,
                     autocast: bool = False) -> th.Tensor:  # fmt: skip
    """No-grad (B, T) log-probs of a whole rollout (old and reference policies) over the update's micro-batches and
    under its autocast, so that ρ and the KL start from the same numerics as the trained log-probs."""
    out = th.zeros_like(r.logp)
    with th.no_grad(), th.autocast(r.logp.device.type, dtype=th.bfloat16, enabled=autocast):
        for rows in batches:
            logp, T = micro_batch_logprobs(model, r, rows, adjust, chunk)
            if rows != []:
                out[rows, :T] = logp
    return out


STAT_KEYS = ("clip_frac_low", "clip_frac_high", "ratio", "kl", "sampler_kl")


def update(
    model,
    optimizer: th.optim.Optimizer,
    r: Rollout,
    advantages: th.Tensor,
    adjust: LogitAdjust,
    *,
    loss_mask: th.Tensor,
    old_logp: th.Tensor | None,
    ref_logp: th.Tensor | None,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    max_len: int,
    kl_ratio_weight: bool = False,
    micro_batch_size: int,
    micro_batch_tokens: int = 0,
    batches: list | None = None,
    sampler_correction: str = "none",
    sampler_cap: float = 2.0,
    ratio_level: str = "token",
    logprob_chunk: int = 256,
    max_grad_norm: float = 1.0,
    autocast: bool = False,
    classes: th.Tensor | None = None,
    in_batch: th.Tensor | None = None,
) -> dict:
    """One optimizer step (none when the gradient is non-finite or exactly 0): gradients accumulated over micro-batches
    (and summed over ranks), with the loss normalised by the token and sequence counts of the whole step on all ranks
    (N_seq counts the rows in_batch (B,), by default those with a loss token), so the update equals one process's on
    the global batch. eps_low, eps_high, beta, loss_type, kl_ratio_weight, max_len and ratio_level are
    `policy_loss`'s; the sampler correction weighs by the rollout's own log-probs (r.logp, the sampler's). With
    `classes` (B, T) (policy.token_classes) the result has "by_class", policy_loss's sums over the whole step.

    Micro-batches (`micro_batches`): packed rows of at most `micro_batch_tokens` tokens (packing.py), or with 0
    padded blocks of `micro_batch_size` sequences; `batches` passes ones already made (the same for μ > 1). Either
    way the loss and gradient are the same: the normalisers come from loss_mask, not from the micro-batches.

    old_logp None means one update per rollout: π_old is the detached current policy (ρ = 1 in value)."""
    device = r.completion_ids.device
    counts = th.tensor([loss_mask.sum(), (loss_mask.any(-1) if in_batch is None else in_batch).sum()], device=device)
    num_tokens, num_sequences = all_reduce_sum(counts)
    num_tokens, num_sequences = max(float(num_tokens), 1.0), max(float(num_sequences), 1.0)
    optimizer.zero_grad(set_to_none=True)
    totals = th.zeros(1 + len(STAT_KEYS), device=device)  # loss, then STAT_KEYS (token-weighted sums)
    dlogp_max = th.zeros(1, device=device)
    by_class = th.zeros(len(CLASSES), 4, device=device)
    if batches is None:
        batches = micro_batches(r, loss_mask, micro_batch_size, micro_batch_tokens)
    for rows in batches:
        with th.autocast(device.type, dtype=th.bfloat16, enabled=autocast):
            logp, T = micro_batch_logprobs(model, r, rows, adjust, logprob_chunk)
        if rows == []:  # a padding pass: this rank has fewer micro-batches than another
            with packing.attention_for(model, rows):
                logp.sum().backward()
            continue
        old = old_logp[rows, :T] if old_logp is not None else logp.detach()
        ref = ref_logp[rows, :T] if ref_logp is not None else None
        loss, stats = policy_loss(logp, old, ref, advantages[rows], loss_mask[rows, :T], eps_low=eps_low,
                                  eps_high=eps_high, beta=beta, loss_type=loss_type, kl_ratio_weight=kl_ratio_weight,
                                  num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len,
                                  sampler_logp=r.logp[rows, :T], correction=sampler_correction, cap=sampler_cap,
                                  ratio_level=ratio_level,
                                  classes=classes[rows, :T] if classes is not None else None)  # fmt: skip
        if not loss.requires_grad:  # no completion token in the micro-batch: a zero backward all the same (FSDP)
            loss = loss + 0 * logp.sum()
        with packing.attention_for(model, rows):  # checkpointed layers recompute with the forward's attention
            loss.backward()
        weight = float(loss_mask[rows].sum()) / num_tokens
        totals += th.tensor([loss.item(), *(stats[k] * weight for k in STAT_KEYS)], device=device)
        dlogp_max = dlogp_max.clamp(min=stats["sampler_dlogp_max"])
        if classes is not None:
            by_class += stats["by_class"]
    params = [q for q in model.parameters() if q.requires_grad]
    if not is_sharded(model):  # FSDP reduce-scattered the gradients (sums) in backward
        all_reduce_grads(params)
    totals = all_reduce_sum(totals)
    dlogp_max = all_reduce_max(dlogp_max)
    by_class = all_reduce_sum(by_class) if classes is not None else None
    grad_norm = float(full(th.nn.utils.clip_grad_norm_(params, max_grad_norm)))  # the same on every rank
    # A NaN/inf never reaches the weights. A zero gradient (all rewards equal, β = 0) leaves the weights and AdamW's
    # state (its decoupled weight decay too) as they are: AdamW would still move them along its momentum.
    skipped = not math.isfinite(grad_norm)
    if skipped or grad_norm == 0.0:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return {"loss": float(totals[0]), "grad_norm": grad_norm, "skipped": float(skipped), "by_class": by_class,
            "sampler_dlogp_max": float(dlogp_max), **{k: float(v) for k, v in zip(STAT_KEYS, totals[1:], strict=True)}}  # fmt: skip


def update_options(cfg: Config) -> dict:
    """The run's options that `update` takes (the loss's, micro-batching, clipping)."""
    same = ("eps_low", "eps_high", "beta", "kl_ratio_weight", "loss_type", "micro_batch_size", "micro_batch_tokens",
            "sampler_correction", "sampler_cap", "ratio_level", "logprob_chunk", "max_grad_norm")  # fmt: skip
    return {"max_len": cfg.max_new_tokens, **{name: getattr(cfg, name) for name in same}}


def grpo_step(cfg: Config, model, sampler, head, ref_model, optimizer, tokenizer, adjust: LogitAdjust,
              batch: list[data.Example], step: int, scorer, autocast: bool, more_prompts=None,
              cache: list | None = None) -> dict | None:  # fmt: skip
    """One GRPO step on this rank's `batch` of prompts: rollout → reward → advantages → μ updates. `sampler` and
    `head` are what the rollout decodes with (`sampling_policy`: `model` itself or a copy, refreshed here after the
    update, and the fp32 output layer);
    more_prompts(round_=k) is this rank's k-th further batch for dynamic sampling (--resample-rounds); `cache` the run's
    KV cache (engine.new_cache; its slots bound the rollout's). Returns the rollout,
    prompts, rewards, advantages, accuracies, update statistics and timings; None if preempted during the rollout
    (the weights are then still those of the last completed step)."""
    t0 = time.perf_counter()
    G = cfg.group_size
    # 1–2. Rollout and rewards; dynamic sampling draws further prompts while too few groups (all ranks) are informative.
    scored = rollout_and_score(cfg, sampler, head, tokenizer, adjust, batch, step, scorer, cache=cache)
    rounds = 0
    while scored is not None and rounds < cfg.resample_rounds:
        informative = all_reduce_sum((~uniform_groups(scored[1], G)).sum().reshape(1).float())
        if informative.item() >= cfg.prompts_per_step:
            break
        rounds += 1
        extra = more_prompts(round_=rounds)
        more = rollout_and_score(cfg, sampler, head, tokenizer, adjust, extra, step, scorer, rounds, cache)
        batch, scored = batch + extra, None if more is None else (
            concat_rollouts([scored[0], more[0]], tokenizer.pad_token_id), th.cat([scored[1], more[1]]),
            scoring.joined(scored[2], more[2]))  # fmt: skip
    if scored is None:
        return None
    r, rewards, scores = scored
    advantages = group_advantages(rewards, G, cfg.adv_scale, reduce=all_reduce_sum)
    loss_mask = r.completion_mask.clone()
    uniform = uniform_groups(rewards, G)  # (num_prompts,)
    if cfg.skip_uniform_groups or cfg.resample_rounds:  # dynamic sampling: these groups leave the batch
        loss_mask[uniform.repeat_interleave(G)] = 0
    in_batch = loss_mask.any(-1)  # (B,) the rows N_seq counts: a dropped truncation stays in it (its loss is 0), as TRL
    if cfg.drop_truncated:
        loss_mask[r.truncated] = 0
    classes = token_classes(r.completion_ids, r.start_inside, adjust)  # (B, T) | None: the diagnostics' classes
    t1 = time.perf_counter()

    # 3. Policy updates: μ passes over the rollout, each K mini-batch optimizer steps.
    stats = policy_updates(cfg, model, ref_model, optimizer, r, advantages, loss_mask, classes, adjust, autocast,
                           in_batch)  # fmt: skip
    if sampler is not model:
        copy_weights(sampler, model, head)
    return {"rollout": r, "batch": batch, "answers": [ex.answer for ex in batch for _ in range(G)],
            "rewards": rewards, "advantages": advantages, "uniform": uniform, "accuracy": scores.accuracy,
            "reward_parts": scores.parts, "reward_failures": scores.failures, "stats": merged_stats(stats),
            "classes": classes, "loss_mask": loss_mask, "resample_rounds": rounds,
            "rollout_s": t1 - t0, "update_s": time.perf_counter() - t1, "t0": t0}  # fmt: skip


def policy_updates(cfg: Config, model, ref_model, optimizer, r: Rollout, advantages: th.Tensor, loss_mask: th.Tensor,
                   classes: th.Tensor | None, adjust: LogitAdjust, autocast: bool = False,
                   in_batch: th.Tensor | None = None) -> list[dict]:  # fmt: skip
    """μ = num_iterations passes over the rollout, each K = steps_per_rollout optimizer steps (`update`) on
    consecutive mini-batches of its rows (whole groups when G divides B/K), against old and reference log-probs
    computed once before the first (real old log-probs when K · μ > 1; with K = μ = 1, π_old is the detached policy).
    Each mini-batch's loss is normalised by its own token and sequence counts (`update`'s in_batch). Returns the last
    pass's statistics, one dict per mini-batch."""
    model.train()
    K = cfg.steps_per_rollout
    splits = th.arange(r.completion_ids.shape[0]).tensor_split(K) if K > 1 else [None]
    minis = [take_rows(r, rows, advantages, loss_mask, classes, in_batch) for rows in splits]
    runs = []  # per mini-batch: its micro-batches (the same for every pass), old and reference log-probs
    for part, _, mask, _, _ in minis:
        batches = micro_batches(part, mask, cfg.micro_batch_size, cfg.micro_batch_tokens)
        logprobs = partial(batched_logprobs, r=part, adjust=adjust, batches=batches, chunk=cfg.logprob_chunk,
                           autocast=autocast)  # fmt: skip
        runs.append((batches, logprobs(model) if K * cfg.num_iterations > 1 else None,
                     logprobs(ref_model) if ref_model is not None else None))  # fmt: skip
    for _ in range(cfg.num_iterations):
        stats = [update(model, optimizer, part, adv, adjust, loss_mask=mask, old_logp=old, ref_logp=ref,
                        autocast=autocast, classes=cls, batches=batches, in_batch=rows, **update_options(cfg))
                 for (part, adv, mask, cls, rows), (batches, old, ref) in zip(minis, runs, strict=True)]  # fmt: skip
    return stats


def rollout_and_score(cfg: Config, sampler, head, tokenizer, adjust: LogitAdjust, batch: list[data.Example],
                      step: int, scorer, round_: int = 0, cache: list | None = None):  # fmt: skip
    """G completions of each prompt in `batch` from the current policy and their rewards (`scorer`: samples →
    scoring.Scores): (rollout, rewards (B,), scores), or None if preempted. Each sample has its own seed (see
    rollout.sample_seed); dynamic sampling's round k numbers its samples from k·G."""
    G = cfg.group_size
    prompts = [ex.prompt_ids for ex in batch for _ in range(G)]
    seeds = [sample_seed(cfg.seed, step, ex.index, round_ * G + j) for ex in batch for j in range(G)]
    per_slot = cfg.max_prompt_len + cfg.max_new_tokens
    slots = len(cache[0][0]) if cache else slot_count(sampler, cfg.rollout_batch_size, len(prompts), cfg.rollout_kv_gib,
                                                      per_slot)  # fmt: skip
    r = rollout(sampler, tokenizer, prompts, seeds, adjust, max_new_tokens=cfg.max_new_tokens, slots=slots,
                cache=cache, head=head, should_stop=stop_requested,
                progress_every=30.0 if world()[0] == 0 else 0.0)  # fmt: skip
    if preempted():
        return None
    examples = [ex for ex in batch for _ in range(G)]
    scores = scorer(reward_samples(r, examples, adjust.vocab, cfg.max_new_tokens, cfg.overlong_buffer))
    return r, th.tensor(scores.total, dtype=th.float32, device=r.completion_ids.device), scores


# ---------------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: Config, score_fn=None) -> Path:
    """Run GRPO as configured; returns the output directory (metrics.jsonl, samples.jsonl, config.json,
    checkpoints/, eval/). Under torchrun each rank samples its own share of the prompts; rank 0 alone writes.

    The reward is cfg's list (--reward, --reward-weights; scoring.py). score_fn(completions, answers) → (rewards,
    accuracies) replaces its accuracy function, the math verifier (toy tasks, tests), in the rollouts and in the
    periodic evaluation alike."""
    check_config(cfg)
    device = setup_distributed(cfg.device, cfg.dist_timeout)
    rank, world_size = world()
    main_rank = rank == 0
    autocast = uses_bf16(device, cfg.bf16)
    output_dir = Path(cfg.output_dir)
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[grpo] outputs → {output_dir.resolve()}  (device {device}, {world_size} rank(s))", flush=True)
    catch_preemption()

    # Model (from the latest checkpoint when resuming), reasoning vocabulary, the policy's logit rule, reference.
    random.seed(cfg.seed)
    th.manual_seed(cfg.seed)
    resume_from = find_resume(cfg.resume, output_dir)
    model, tokenizer, vocab = load_policy(cfg, resume_from, device)
    cfg = planned(cfg, model, device)  # before the sampling copy, reference, optimizer state and KV cache exist
    adjust = model_adjust(model, tokenizer, vocab, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    ref_model = frozen_copy(model) if cfg.beta != 0 else None  # 0 loads no reference model
    sampler, head = sampling_policy(model, autocast, cfg.shard)
    if cfg.shard == "fsdp":  # after the vocabulary, checkpointing and the copies: they need the whole model
        shard(model, device, bf16=autocast)
        if ref_model is not None:
            shard(ref_model, device, bf16=autocast)
    score = scoring.scorer(reward_entries(cfg), verifier=score_fn, timeout=cfg.reward_timeout)
    examples = load_prompts(cfg, tokenizer, cfg.dataset, cfg.split, cfg.max_samples,
                            prompt_field=cfg.prompt_field, answer_field=cfg.answer_field)  # fmt: skip
    eval_examples = None
    if cfg.eval_every > 0:
        eval_split = cfg.eval_split or evaluate.default_split(cfg.eval_dataset)
        eval_examples = load_prompts(cfg, tokenizer, cfg.eval_dataset, eval_split, cfg.eval_max_problems)
    optimizer = th.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = th.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.lr_schedule, cfg.steps))
    step = 0
    usage = th.zeros(vocab.size, dtype=th.long) if vocab is not None else None  # (n_r,) per-copy sample counts
    if resume_from is not None:
        step = restore_trainer_state(resume_from, model, optimizer, scheduler, usage)
        if main_rank:
            print(f"[grpo] resumed from {resume_from} at step {step}", flush=True)
            truncate_logs(output_dir, step)
    save = partial(save_checkpoint, output_dir, model=model, tokenizer=tokenizer, vocab=vocab, optimizer=optimizer,
                   scheduler=scheduler, config=dataclasses.asdict(cfg), keep_last=cfg.keep_last, final_step=cfg.steps,
                   usage=usage)  # fmt: skip
    saved_step = step if resume_from is not None else None  # the same on every rank (no filesystem race)
    if resume_from is None and cfg.save_every > 0:
        save(0)
        saved_step = 0
    run = None
    if main_rank and cfg.wandb != "disabled":
        import wandb  # only with --wandb online/offline

        run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg),
                         dir=os.environ.get("WANDB_DIR") or output_dir)  # fmt: skip
    # One KV cache for the run, at the planned size: every rollout and evaluation decodes in it.
    eval_len = cfg.eval_max_new_tokens or cfg.max_new_tokens
    jobs = max(cfg.prompts_per_step // world_size * cfg.group_size, cfg.eval_samples * len(eval_examples or []))
    per_slot = memory.tokens_per_slot(cfg)
    kv_cache = new_cache(sampler, slot_count(sampler, cfg.rollout_batch_size, jobs, cfg.rollout_kv_gib, per_slot),
                         per_slot)  # fmt: skip
    run_eval = partial(evaluate.during_training, sampler, tokenizer, eval_examples, adjust, samples=cfg.eval_samples,
                       max_new_tokens=eval_len, batch_size=len(kv_cache[0][0]), seed=cfg.seed,
                       head=head, scorer=score, overlong_buffer=cfg.overlong_buffer, output_dir=output_dir,
                       steps=cfg.steps, should_stop=stop_requested, cache=kv_cache)  # fmt: skip
    # The starting point, or an evaluation a stop interrupted, on a line of its own.
    if eval_examples is not None and evaluate.due_at_start(cfg, output_dir, step, fresh=resume_from is None):
        m = {"step": step, **run_eval(step)}
        if main_rank and len(m) > 1:
            log_step(output_dir, m, cfg.steps, run)

    while step < cfg.steps:
        batches = partial(data.prompt_batch, examples, step, cfg.prompts_per_step, seed=cfg.seed, rank=rank,
                          world_size=world_size)  # round_=k: dynamic sampling's further batches  # fmt: skip
        out = grpo_step(cfg, model, sampler, head, ref_model, optimizer, tokenizer, adjust, batches(), step, score,
                        autocast, more_prompts=batches, cache=kv_cache)  # fmt: skip
        if out is None:  # preempted during the rollout
            break
        lr = scheduler.get_last_lr()[0]
        with warnings.catch_warnings():  # a first step with a zero gradient took no optimizer step: the order is right
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        step += 1
        if usage is not None:  # how often each reasoning copy has been sampled, over the run
            usage += copy_usage(out["rollout"], vocab).cpu()

        # Log (global figures, gathered from every rank) and checkpoint.
        drift = bool(cfg.sample_every) and step % cfg.sample_every == 0
        m = {**step_metrics(step, out, cfg.group_size, model, adjust, drift), "lr": lr}
        if eval_examples is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            m.update(run_eval(step))
        if main_rank:
            log_step(output_dir, m, cfg.steps, run)
            if cfg.sample_every and step % cfg.sample_every == 0:
                log_samples(output_dir, sample_records(step, out["batch"], out, tokenizer, vocab, cfg.group_size), run)
        if step == cfg.steps or (cfg.save_every > 0 and step % cfg.save_every == 0):
            save(step)
            saved_step = step
        elif preempted():
            break

    if step < cfg.steps:  # preempted: keep what is done, exit cleanly so the requeued job resumes here
        if saved_step != step:
            save(step)
        if main_rank:
            print(f"[grpo] preempted after step {step}: checkpoint written; rerun to resume", flush=True)
    if run is not None:
        run.finish()
    teardown_distributed()
    return output_dir


def load_policy(cfg: Config, resume_from: Path | None, device: th.device):
    """(model, tokenizer, reasoning vocabulary or None): from the checkpoint when resuming, else cfg.model expanded
    by cfg.reasoning_vocab_size copies."""
    model, tokenizer = load_model_and_tokenizer(
        str(resume_from or cfg.model), device, "resume" if resume_from else "model"
    )
    vocab = rvocab.load(resume_from) if resume_from else None
    if cfg.add_think_tags:  # a no-op when resuming: the checkpoint's tokenizer has them
        rvocab.add_think_tags(model, tokenizer)
    if vocab is None and cfg.reasoning_vocab_size != 0:
        vocab = rvocab.add_reasoning_vocab(model, tokenizer, cfg.reasoning_vocab_size, offset=cfg.reasoning_offset)
    return model, tokenizer, vocab


def planned(cfg: Config, model, device: th.device) -> Config:
    """cfg with its 'auto' memory options chosen by the memory plan (memory.py) for the loaded model on this device
    (free memory now plus what the model holds), and the model's decoder checkpointing set as planned; the plan is
    printed. A step that cannot fit stops here with a one-line error naming the option."""
    params = sum(p.numel() for p in model.parameters())
    free = memory.free_memory(device) + (th.cuda.memory_reserved(device) if device.type == "cuda" else 4 * params)
    free = -float(all_reduce_max(th.tensor([-free], dtype=th.float64, device=device)))  # the tightest rank's: one plan
    plan = memory.memory_plan(memory.model_shape(model.config, params=params), cfg, device.type, free_bytes=free,
                              world_size=world()[1])  # fmt: skip
    if world()[0] == 0:
        print(f"[grpo] memory plan ({device.type}, {free / memory.GiB:.1f} GiB free):\n{memory.format_plan(plan)}",
              flush=True)  # fmt: skip
    decoder_checkpointing(model, plan.checkpointing)
    return dataclasses.replace(cfg, rollout_kv_gib=plan.kv_gib, micro_batch_tokens=plan.update_tokens,
                               gradient_checkpointing="on" if plan.checkpointing else "off")  # fmt: skip


def load_prompts(cfg: Config, tokenizer, source: str, split: str, max_samples: int | None, **fields):
    """A dataset's problems as prompts built with the run's prompt options (data.load_examples)."""
    return data.load_examples(source, tokenizer, split=split, system_prompt=cfg.system_prompt,
                              instruction=cfg.instruction, few_shot=cfg.few_shot, enable_thinking=cfg.enable_thinking,
                              max_prompt_len=cfg.max_prompt_len, max_samples=max_samples, seed=cfg.seed,
                              skip_bad_rows=cfg.skip_bad_rows, **fields)  # fmt: skip


def lr_lambda(warmup_steps: int, schedule: str, steps: int):
    """The learning-rate factor: linear warmup, then constant, or a cosine or linear decay to 0 at `steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(1, steps - warmup_steps), 1.0)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


if __name__ == "__main__":
    exit_on_usage_error(train, CLI_CONFIG)
