"""bench.py's `packed` section (`python bench.py --only packed`): the padding-free update against the padded one at
the same token budget, the decode step without K/V gathers against the one with, and the memory plan's own accuracy
on this CPU — each measured side by side in one run.

Keys: `update_speedup_packed` (one grpo.update, padded time ÷ packed time), `update_mem_ratio_packed` (peak extra
memory packed ÷ padded), `decode_gather_free_speedup` (the engine with its running rows kept in slots 0 … B−1 ÷ the
same engine gathering them, same slots), `plan_update_error` and `plan_kv_error` (measured ÷ planned − 1).
"""

from __future__ import annotations

import gc
import statistics
import time

import torch as th

import engine
import grpo
import memory
import rollout
from bench_common import QWEN3_BASE, QWEN3_ROWS, in_child, peak_mib, qwen3_adjust, random_qwen3, rss_mib

# A Qwen3-shaped model whose body costs ~3× its output layer per token, as Qwen3-0.6B's does (440 M body, 156 M head
# parameters), so that the update's time splits between body and head as at the real shape (the head runs on the
# same completion tokens either way; only the body sees padding).
SHAPE = dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=1024)
VOCAB = 5120  # 1.3 M head parameters beside a 3.9 M body


def grpo_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """The engine section's length law: geometric completion lengths with mean about a third of the maximum, capped
    there (a few truncated)."""
    g = th.Generator().manual_seed(seed)
    u = th.rand(n, generator=g)
    p = 3 / max_len
    return [min(max_len, 1 + int(x)) for x in (th.log1p(-u) / th.log1p(th.tensor(-p))).tolist()]


def grpo_like_rollout(n: int, max_len: int, prompt: tuple[int, int], vocab: int, seed: int = 0) -> rollout.Rollout:
    """n completions of `grpo_lengths` after prompts of prompt[0] … prompt[1] tokens (left-padded), random ids."""
    g = th.Generator().manual_seed(seed)
    lengths = grpo_lengths(n, max_len, seed)
    prompts = [th.randint(2, vocab, (int(th.randint(*prompt, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]  # fmt: skip
    ids, pmask = rollout.left_pad(prompts, 0)
    T = max(lengths)
    completion = th.randint(2, vocab, (n, T), generator=g)
    mask = (th.arange(T) < th.tensor(lengths)[:, None]).long()
    return rollout.Rollout(ids, pmask, completion * mask, mask, th.tensor([n == max_len for n in lengths]),
                           th.zeros(n, T), th.zeros(n, T), None)  # fmt: skip


def child_packed(variant: str, n: int = 32, max_len: int = 512, rows: int = 4) -> dict:
    """One grpo.update (AdamW) on n GRPO-like completions: packed rows of at most `rows` × (longest prompt + max_len)
    tokens ("packed"), padded micro-batches of `rows` sequences, the same token budget ("padded_budget"), or padded
    micro-batches of as many sequences as it takes to run as many passes as packed ("padded_passes"). Time (median
    of 2 after a small warm-up) and peak extra resident memory over the weights and AdamW state; the packed child also
    reports the memory plan's figure for its update (gradients + activations of a full row + the output layer's
    chunk)."""
    model = random_qwen3(VOCAB, **SHAPE).train()
    adjust = qwen3_adjust(VOCAB, None)
    adjust.bias = th.zeros(VOCAB)
    opt = th.optim.AdamW(model.parameters(), lr=1e-6)
    r = grpo_like_rollout(n, max_len, (16, 49), VOCAB)  # prompts ~6 % of the longest completion (DeepScaleR: ~2 %)
    budget = rows * (r.prompt_ids.shape[1] + max_len)
    packs = grpo.micro_batches(r, r.completion_mask, rows, budget)
    size = {"packed": rows, "padded_budget": rows, "padded_passes": -(-n // len(packs))}[variant]
    cfg = grpo.Config(micro_batch_size=size, micro_batch_tokens=budget if variant == "packed" else 0,
                      max_new_tokens=max_len, logprob_chunk=256)  # fmt: skip

    def step(r=r):
        adv = th.linspace(-1, 1, r.completion_ids.shape[0])
        grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                    **grpo.update_options(cfg))  # fmt: skip

    step(grpo_like_rollout(2, 16, (8, 9), VOCAB, seed=1))  # warm-up: AdamW's state exists (gradients are freed)
    gc.collect()
    base = rss_mib()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "peak_mib": peak_mib() - base, "budget": budget,
           "real_tokens": int(r.prompt_mask.sum() + r.completion_mask.sum()), "micro_batch_size": size,
           "micro_batches": len(grpo.micro_batches(r, r.completion_mask, size, cfg.micro_batch_tokens))}  # fmt: skip
    if variant == "packed":
        shape = memory.model_shape(model.config, params=sum(p.numel() for p in model.parameters()))
        per_token = memory.activation_bytes(shape, bf16=False, checkpointing=False)
        out["planned_mib"] = (4 * shape.params + budget * per_token + 3 * 4 * cfg.logprob_chunk * VOCAB) / 2**20
    return out


def child_kv(slots: int = 16, tokens: int = 2048) -> dict:
    """The run's KV cache (engine.new_cache) for the engine section's model: resident memory it took vs planned."""
    model = random_qwen3(QWEN3_ROWS, hidden=128, layers=2)
    c = model.config
    gc.collect()
    base = rss_mib()
    cache = engine.new_cache(model, slots, tokens)
    for layer in cache:  # touch every page: zeros may be mapped lazily
        for x in layer:
            x.fill_(1.0)
    planned = slots * tokens * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    return {"measured_mib": rss_mib() - base, "planned_mib": planned / 2**20}


def decode_contest(jobs: int = 64, slots: int = 16, N: int = 160, repeats: int = 2) -> dict:
    """The engine on the engine section's random-Qwen3 workload (EOS hazard: geometric lengths, a tail to N), with
    its running rows kept in slots 0 … B−1 (`compact`, the cache read as a view) and without (rows gathered each
    step); the same jobs, slots and seeds; interleaved repeats, median tokens/s."""
    g = th.Generator().manual_seed(6)
    model = random_qwen3(QWEN3_ROWS, hidden=128, layers=2)
    eos_ids = th.randperm(QWEN3_BASE, generator=g)[: QWEN3_ROWS // 48].tolist()
    banned = set(eos_ids)
    prompts = [[t for t in th.randint(0, QWEN3_BASE, (int(n),), generator=g).tolist() if t not in banned] or [0]
               for n in th.randint(16, 49, (jobs,), generator=g)]  # fmt: skip
    adjust = qwen3_adjust(QWEN3_ROWS, None)
    cache = engine.new_cache(model, slots, max(map(len, prompts)) + N)
    rates: dict[str, list[float]] = {"gather_free": [], "gather": []}
    lengths = {}
    with th.inference_mode():
        for _ in range(repeats):
            for name in rates:
                seeds = list(range(jobs))
                t0 = time.perf_counter()
                mask = engine.generate(model, prompts, seeds, adjust, max_new_tokens=N, eos_ids=eos_ids,
                                       pad_id=QWEN3_BASE, slots=slots, cache=cache, compact=name == "gather_free")[1]  # fmt: skip
                lengths[name] = mask.sum(-1).tolist()
                rates[name].append(sum(lengths[name]) / (time.perf_counter() - t0))
    tok_s = {k: statistics.median(v) for k, v in rates.items()}
    assert lengths["gather"] == lengths["gather_free"]  # the same completions either way
    return {"jobs": jobs, "slots": slots, "max_new_tokens": N, **{f"{k}_tok_s": v for k, v in tok_s.items()},
            "speedup": tok_s["gather_free"] / tok_s["gather"], "mean_len": sum(lengths["gather"]) / jobs}  # fmt: skip


def bench_packed() -> dict:
    # glibc keeps freed heap memory, so a process's peak resident set would count what an earlier micro-batch freed;
    # allocating large blocks with mmap returns them at once, as CUDA's caching allocator reuses them.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    packed, budget, passes = (in_child("packed", env, variant=v) for v in ("packed", "padded_budget", "padded_passes"))
    kv = in_child("kv", env)
    decode = decode_contest()
    return {
        "packed": packed,
        "padded": budget,
        "padded_passes": passes,
        "kv": kv,
        "decode": decode,
        "update_speedup_packed": budget["seconds"] / packed["seconds"],
        "update_mem_ratio_packed": packed["peak_mib"] / passes["peak_mib"],
        "update_mem_ratio_same_budget": packed["peak_mib"] / budget["peak_mib"],
        "decode_gather_free_speedup": decode["speedup"],
        "plan_update_error": packed["peak_mib"] / packed["planned_mib"] - 1,
        "plan_kv_error": kv["measured_mib"] / kv["planned_mib"] - 1,
    }


def packed_report(p: dict) -> list[str]:
    a, b, c, d = p["packed"], p["padded"], p["padded_passes"], p["decode"]
    return [
        f"packed update (one grpo.update, {a['real_tokens']:,} real tokens, rows of ≤ {a['budget']:,} tokens): packed "
        f"{a['seconds']:.2f} s in {a['micro_batches']} micro-batches, {a['peak_mib']:.0f} MiB; padded at the same token "
        f"budget ({b['micro_batch_size']} sequences) {b['seconds']:.2f} s in {b['micro_batches']}, {b['peak_mib']:.0f} "
        f"MiB; padded in as many passes ({c['micro_batch_size']} sequences) {c['seconds']:.2f} s, {c['peak_mib']:.0f} "
        f"MiB → update_speedup_packed {p['update_speedup_packed']:.2f}× (same budget), update_mem_ratio_packed "
        f"{p['update_mem_ratio_packed']:.2f} (same passes; {p['update_mem_ratio_same_budget']:.2f} at the same budget)",
        f"decode without gathers: {d['gather_free_tok_s']:,.0f} vs {d['gather_tok_s']:,.0f} tokens/s with "
        f"({d['slots']} slots, {d['jobs']} jobs, mean length {d['mean_len']:.0f}) → decode_gather_free_speedup "
        f"{p['decode_gather_free_speedup']:.2f}×",
        f"memory plan on this CPU: update peak measured {a['peak_mib']:.0f} MiB vs planned {a['planned_mib']:.0f} MiB "
        f"({p['plan_update_error']:+.0%}); KV cache {p['kv']['measured_mib']:.0f} vs {p['kv']['planned_mib']:.0f} MiB "
        f"({p['plan_kv_error']:+.0%})",
    ]
