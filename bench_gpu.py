"""bench.py --device cuda: the same ratios on a Qwen3-0.6B-shaped model, and long rollouts at full vocabulary.
Each section is guarded, so one failure leaves the others' figures. DEV = "cpu" runs the code as a dry run."""

from __future__ import annotations

import copy
import gc
import json
import sys
import time

import torch as th

import grpo
import policy
import rollout
from bench_common import (
    DEV,
    DOUBLED,
    QWEN3_06B,
    QWEN3_BASE,
    QWEN3_ROWS,
    QWEN3_TOKENS,
    THINK_ID,
    bench_mask_overhead,
    doubled_vocab,
    logprob_step,
    met,
    qwen3_adjust,
    random_qwen3,
    random_rollout,
    seconds,
)

# Peak HBM bandwidth (bytes/s) by device name, from the vendors' data sheets; the bench also measures a copy.
HBM_PEAK = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12,
            "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12, "L40S": 0.864e12}  # fmt: skip


def cuda_peak_gib(fn) -> float:
    """Peak allocated GPU memory during fn, beyond what was allocated before it (0 in a CPU dry run)."""
    gc.collect()
    if DEV != "cuda":
        fn()
        return 0.0
    th.cuda.empty_cache()
    th.cuda.reset_peak_memory_stats()
    base = th.cuda.memory_allocated()
    fn()
    th.cuda.synchronize()
    return (th.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth(numel: int = 2**30) -> float:
    """Achieved device-to-device copy bandwidth (bytes/s): read + write of a 4 GiB buffer."""
    x = th.empty(numel, dtype=th.float32, device=DEV)
    y = th.empty_like(x)
    y.copy_(x)
    t = min(seconds(lambda: y.copy_(x)) for _ in range(5))
    return 2 * x.numel() * 4 / t


def stop_after(checks: int):
    """A should_stop for rollout.sample that ends the rollout at its `checks`-th stop check (8 decode steps each)."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] >= checks

    return should_stop


def gpu_rollout(model, B: int, P: int = 64, N: int = 128) -> dict:
    """rollout.sample (growing cache, and static cache + CUDA graph) vs HF generate, bf16 autocast, EOS disabled."""
    dev = DEV
    g = th.Generator().manual_seed(3)
    prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g).tolist()
    ids, mask = (x.to(dev) for x in rollout.left_pad(prompts, QWEN3_BASE))
    adjust = policy.LogitAdjust(1.0, policy.padding_bias(QWEN3_ROWS, QWEN3_TOKENS, QWEN3_ROWS).to(dev), None)
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=0)
    gen_cfg.eos_token_id, gen_cfg.pad_token_id, gen_cfg.bos_token_id = None, QWEN3_BASE, None

    def ours(static: bool, n: int = N):
        gen = th.Generator(dev).manual_seed(0)
        r = rollout.sample(model, prompts, adjust, max_new_tokens=n, eos_ids=[-1], pad_id=QWEN3_BASE, generator=gen,
                        static_cache=static)  # fmt: skip
        assert r.completion_ids.shape == (B, n)

    def hf(n: int = N):
        gen_cfg.max_new_tokens = n
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        assert out.shape == (B, P + n), out.shape

    runs = {"dynamic": lambda: ours(False), "static_graph": lambda: ours(True), "hf": hf}
    with th.autocast(DEV, dtype=th.bfloat16), th.inference_mode():
        ours(False, 16), ours(True, 16), hf(16)  # warm-up
        t = {k: min(seconds(fn) for _ in range(2)) for k, fn in runs.items()}
    best = min(t["dynamic"], t["static_graph"])
    return {"B": B, "P": P, "N": N, **{f"{k}_tok_s": B * N / v for k, v in t.items()}, "speedup": t["hf"] / best,
            "static_vs_dynamic": t["dynamic"] / t["static_graph"]}  # fmt: skip


def gpu_logprob_memory(model, T: int = 2048) -> dict:
    """Peak GPU memory of log-probs + loss forward and backward (B = 1, bf16 autocast, gradient checkpointing),
    chunked vs naive."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    r = random_rollout(1, T, DEV)

    def run(chunk: int | None):
        logprob_step(model, r, adjust, chunk, autocast=True)

    model.train()
    grpo.decoder_checkpointing(model, True)  # as at long T: the body's activations then stay small beside the head's
    run(256)  # warm-up
    naive, chunked = cuda_peak_gib(lambda: run(None)), cuda_peak_gib(lambda: run(grpo.Config().logprob_chunk))
    grpo.decoder_checkpointing(model, False)
    model.eval()
    return {
        "T": T,
        "V": DOUBLED,
        "naive_gib": naive,
        "chunked_gib": chunked,
        "logprob_mem_ratio": chunked / naive if naive else None,
        # The parameters' gradients (fp32, the same for any loss) are part of both peaks; without them:
        "grads_gib": (grads := sum(p.numel() for p in model.parameters()) * 4 / 2**30),
        "ratio_without_grads": (chunked - grads) / (naive - grads) if naive else None,
    }


def gpu_long_rollout(model, N: int = 8192, P: int = 64) -> dict:
    """The doubled Qwen3-0.6B-shaped model with the gate, 8,192-token completions: the largest rollout batch whose
    static KV cache (allocated whole at the start, so a batch that starts also finishes) fits, its decode tokens/s
    at full length (every step attends over all P + N slots, as the last step of a full-length rollout does) and
    that as a fraction of the HBM bound: (bf16 weights + the KV cache) read once per step at peak bandwidth."""
    cfg = model.config
    kv_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * (P + N)  # bytes per row, bf16
    weights = 2 * sum(p.numel() for p in model.parameters())  # bf16 bytes
    vocab = doubled_vocab()
    adjust = qwen3_adjust(DOUBLED, vocab)
    adjust.bias = adjust.bias.to(DEV)

    def run(B: int, checks: int):
        g = th.Generator().manual_seed(B)
        prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g)
        prompts[:, -1] = THINK_ID
        gen = th.Generator(DEV).manual_seed(0)
        with th.autocast(DEV, dtype=th.bfloat16):
            rollout.sample(model, prompts.tolist(), adjust, max_new_tokens=N, eos_ids=[-1], pad_id=0, generator=gen,
                        static_cache=True, should_stop=stop_after(checks))  # fmt: skip

    gc.collect()
    free = th.cuda.mem_get_info()[0] if DEV == "cuda" else 2**28
    # Per row: the cache; the step's K and V repeated to all query heads (HF's SDPA path with a mask does that, for
    # the eager warm-up step and again in the graph's own pool); a few fp32 (V,) rows of logits, noise and bias.
    repeated = 2 * cfg.num_attention_heads * cfg.head_dim * 2 * (P + N)
    per_row = kv_row + 2 * repeated + 8 * DOUBLED * 4
    B = int(0.92 * free / per_row) // 8 * 8
    fitted, tries = None, []
    while B >= 8 and fitted is None:
        try:
            run(B, 1)
            fitted = B
        except th.OutOfMemoryError:
            tries.append(B)
        if fitted is None:  # outside the except block, whose traceback would keep the failed cache alive
            gc.collect()
            th.cuda.empty_cache()
            B = int(B * 0.9) // 8 * 8
    if fitted is None:
        return {"error": "no batch of 8 fits"}
    long, short = seconds(lambda: run(fitted, 8)), seconds(lambda: run(fitted, 1))
    step_s = (long - short) / 56
    bound_s = (weights + fitted * kv_row) / hbm_peak()
    return {"N": N, "P": P, "largest_batch": fitted, "oom_at": tries, "kv_gib_per_row": kv_row / 2**30,
            "step_ms": 1e3 * step_s, "decode_tok_s": fitted / step_s, "hbm_bound_ms": 1e3 * bound_s,
            "hbm_fraction": bound_s / step_s}  # fmt: skip


def device_name() -> str:
    return th.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)"


def hbm_peak() -> float:
    name = device_name()
    for key, value in HBM_PEAK.items():
        if key in name:
            return value
    return copy_bandwidth(
        2**30 if DEV == "cuda" else 2**20
    )  # unknown card: the achieved copy bandwidth stands in for the peak


def gpu_update(model, lengths=(1024, 4096, 8192), groups=(4, 8, 16), group_T: int = 1024) -> dict:
    """One grpo.update of the doubled Qwen3-0.6B-shaped model (bf16 autocast, fp32 master weights, AdamW, gradient
    checkpointing, micro-batches of 4): time and peak memory against completion length (G = 1) and group size."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    model.train()
    grpo.decoder_checkpointing(model, True)
    opt = th.optim.AdamW(model.parameters(), lr=1e-6)

    def one(G: int, T: int) -> dict:
        cfg = grpo.Config(micro_batch_size=4, max_new_tokens=T)
        r = random_rollout(G, T, DEV)
        adv = th.linspace(-1, 1, G, device=DEV)

        def step():
            grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                        **grpo.update_options(cfg), autocast=True)  # fmt: skip

        peak = cuda_peak_gib(step)
        return {"G": G, "T": T, "seconds": seconds(step), "peak_gib": peak}

    one(1, 256)  # warm-up; allocates AdamW's state, which then counts in the baseline
    out = {"length": [one(1, T) for T in lengths], "group": [one(G, group_T) for G in groups]}
    grpo.decoder_checkpointing(model, False)
    model.eval()
    return out


def bench_gpu(shape: dict = QWEN3_06B, long_n: int = 8192, lengths=(1024, 4096, 8192), groups=(4, 8, 16)) -> dict:
    """Every GPU section, each guarded so that one failure leaves the others' figures."""
    bandwidth = copy_bandwidth(2**30 if DEV == "cuda" else 2**20)
    out: dict = {"device": device_name(), "hbm_peak_tb_s": hbm_peak() / 1e12, "copy_tb_s": bandwidth / 1e12}
    base = random_qwen3(QWEN3_ROWS, **shape, device=DEV)
    doubled = random_qwen3(DOUBLED, **shape, device=DEV)
    sections = [
        ("rollout_b8", lambda: gpu_rollout(base, 8)),
        ("rollout_b64", lambda: gpu_rollout(base, 64)),
        ("mask_overhead", lambda: bench_mask_overhead(doubled, B=64, P=64, N=64, device=DEV)),
        ("logprob", lambda: gpu_logprob_memory(doubled)),
        ("long_rollout", lambda: gpu_long_rollout(doubled, N=long_n)),
        ("update", lambda: gpu_update(doubled, lengths, groups, group_T=lengths[0])),
    ]
    for name, fn in sections:
        t = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 — report it and go on to the next section
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"[gpu {name}: {time.perf_counter() - t:.0f} s] {json.dumps(out[name], default=str)[:400]}",
              file=sys.stderr, flush=True)  # fmt: skip
        gc.collect()
        if DEV == "cuda":
            th.cuda.empty_cache()
    return out


def gpu_report(g: dict) -> str:
    """The GPU figures as markdown tables (sections that failed show their error)."""
    lines = [f"GPU: {g['device']} (peak HBM {g['hbm_peak_tb_s']:.2f} TB/s, measured copy {g['copy_tb_s']:.2f} TB/s), "
             "random Qwen3-0.6B-shaped model (hidden 1024, 28 layers, 16/8 heads, head dim 128), fp32 master "
             "weights, bf16 autocast", "", "| figure | value | target | setting |", "|---|---|---|---|"]  # fmt: skip

    def failed(name: str) -> bool:
        if "error" in g.get(name, {"error": "not run"}):
            lines.append(f"| {name} | — | failed | {g.get(name, {}).get('error', 'not run')[:300]} |")
            return True
        return False

    for name in ("rollout_b8", "rollout_b64"):
        if not failed(name):
            r = g[name]
            lines.append(
                f"| rollout_speedup_vs_hf (B = {r['B']}) | {r['speedup']:.2f} | "
                f"{met('rollout_speedup_vs_hf', r['speedup'])} | V = 151,936, {r['N']} new tokens: HF "
                f"{r['hf_tok_s']:.0f} tok/s, rollout.sample {r['dynamic_tok_s']:.0f} (growing cache), "
                f"{r['static_graph_tok_s']:.0f} (static cache + CUDA graph) |"
            )
    if not failed("mask_overhead"):
        m = g["mask_overhead"]
        lines.append(
            f"| mask_overhead | {m['mask_overhead']:+.3f} | {met('mask_overhead', m['mask_overhead'])} | B = {m['B']}, "
            f"{m['N']} tokens, V = {DOUBLED:,}: {m['mask_s']:.2f} s vs {m['none_s']:.2f} s |"
        )
    if not failed("logprob") and g["logprob"]["logprob_mem_ratio"] is not None:
        m = g["logprob"]
        lines.append(
            f"| logprob_mem_ratio | {m['logprob_mem_ratio']:.3f} | {met('logprob_mem_ratio', m['logprob_mem_ratio'])} "
            f"| T = {m['T']}, V = {m['V']:,}: {m['chunked_gib']:.2f} vs {m['naive_gib']:.2f} GiB, of which "
            f"{m['grads_gib']:.2f} GiB are the parameters' gradients; without them {m['ratio_without_grads']:.3f} |"
        )
    if not failed("long_rollout"):
        m = g["long_rollout"]
        lines.append(
            f"| largest rollout batch, {m['N']:,}-token completions | {m['largest_batch']} | — | V = {DOUBLED:,} with "
            f"the gate; static KV cache {m['kv_gib_per_row']:.2f} GiB per row |"
        )
        lines.append(
            f"| decode tokens/s at that batch, full length | {m['decode_tok_s']:,.0f} | — | {m['step_ms']:.1f} ms per "
            f"step; HBM bound {m['hbm_bound_ms']:.1f} ms: {m['hbm_fraction']:.0%} of the bound |"
        )
    if not failed("update"):
        u = g["update"]
        lines += ["", "one grpo.update (V = 303,872, gradient checkpointing, micro-batches of 4):", ""]
        lines += ["| G | completion tokens | step s | peak GiB |", "|---|---|---|---|"]
        lines += [
            f"| {r['G']} | {r['T']} | {r['seconds']:.2f} | {r['peak_gib']:.2f} |" for r in u["length"] + u["group"]
        ]
    return "\n".join(lines)
