"""bench.py --device cuda: the same ratios on a Qwen3-0.6B-shaped model, and long rollouts at full vocabulary.
Each section is guarded, so one failure leaves the others' figures. DEV = "cpu" runs the code as a dry run."""

from __future__ import annotations

import gc
import json
import sys
import time

import torch as th

import checkpoints
import engine
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
    hf_sampling_config,
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
    """B short completions, EOS off: the engine (bf16 copy, fp32 head) vs HF generate on the same bf16 copy, and the
    old sampler (fp32 weights under autocast, static cache + CUDA graph) for the before/after."""
    g = th.Generator().manual_seed(3)
    prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g).tolist()
    ids, mask = (x.to(DEV) for x in rollout.left_pad(prompts, QWEN3_BASE))
    adjust = policy.LogitAdjust(1.0, policy.padding_bias(QWEN3_ROWS, QWEN3_TOKENS, QWEN3_ROWS).to(DEV), None)
    bf16 = rollout.sampling_copy(model)
    gen_cfg = hf_sampling_config(model, N, None, QWEN3_BASE)  # EOS off

    def engine_run(n: int = N):
        gens = [th.Generator(DEV).manual_seed(i) for i in range(B)]
        out = engine.generate(bf16, prompts, gens, adjust, max_new_tokens=n, eos_ids=[-1], pad_id=QWEN3_BASE, slots=B,
                              head=model.get_output_embeddings())  # fmt: skip
        assert out[0].shape == (B, n)

    def old(n: int = N):
        with th.autocast(DEV, dtype=th.bfloat16, enabled=DEV == "cuda"):
            r = rollout.sample(model, prompts, adjust, max_new_tokens=n, eos_ids=[-1], pad_id=QWEN3_BASE,
                               generator=th.Generator(DEV).manual_seed(0), static_cache=True)  # fmt: skip
        assert r.completion_ids.shape == (B, n)

    def hf(n: int = N):
        gen_cfg.max_new_tokens = n
        out = bf16.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        assert out.shape == (B, P + n), out.shape

    runs = {"engine": engine_run, "old_static_graph": old, "hf_bf16": hf}
    with th.inference_mode():
        engine_run(16), old(16), hf(16)  # warm-up
        t = {k: min(seconds(fn) for _ in range(2)) for k, fn in runs.items()}
    return {"B": B, "P": P, "N": N, **{f"{k}_tok_s": B * N / v for k, v in t.items()},
            "speedup": t["hf_bf16"] / t["engine"], "engine_vs_old": t["old_static_graph"] / t["engine"]}  # fmt: skip


def gpu_logprob_memory(model, T: int = 2048) -> dict:
    """Peak GPU memory of log-probs + loss forward and backward (B = 1, bf16 autocast, gradient checkpointing),
    chunked vs naive."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    r = random_rollout(1, T, DEV)

    def run(chunk: int | None):
        logprob_step(model, r, adjust, chunk, autocast=True)

    model.train()
    # As at long T: the body's activations then stay small beside the head's.
    checkpoints.decoder_checkpointing(model, True)
    run(256)  # warm-up
    naive, chunked = cuda_peak_gib(lambda: run(None)), cuda_peak_gib(lambda: run(grpo.Config().logprob_chunk))
    checkpoints.decoder_checkpointing(model, False)
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


def hazard_jobs(n: int, mean: int, V: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n prompts of 64–512 tokens ending in <think>, and EOS ids holding ~1/mean of a random model's nearly flat
    distribution: completion lengths geometric with that mean, a tail to the limit."""
    g = th.Generator().manual_seed(seed)
    eos = th.randperm(QWEN3_BASE, generator=g)[: V // mean].tolist()
    banned = set(eos)
    prompts = []
    for n_tok in th.randint(64, 513, (n,), generator=g).tolist():
        p = [t for t in th.randint(0, QWEN3_BASE, (n_tok,), generator=g).tolist() if t not in banned]
        prompts.append(p + [THINK_ID])
    return prompts, eos


def gpu_long_rollout(model, jobs: int = 128, N: int = 8192, mean: int = 2500, kv_gib: float = 60.0) -> dict:
    """The doubled Qwen3-0.6B-shaped model with the gate: `jobs` completions of up to N tokens (geometric lengths,
    mean ~`mean`), the engine with as many slots as a `kv_gib` KV cache holds. Tokens/s, and that as a fraction of
    the HBM bound: every decode step reads the bf16 body, the fp32 head and each live row's KV once."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    prompts, eos = hazard_jobs(jobs, mean, DOUBLED)
    bf16 = rollout.sampling_copy(model)
    slots = min(jobs, engine.slots_for(bf16, kv_gib, 512 + N, th.bfloat16))
    polls = [0]

    def count_steps() -> bool:
        polls[0] += 1
        return False

    gens = [th.Generator(DEV).manual_seed(i) for i in range(jobs)]
    t = seconds(lambda: engine.generate(bf16, prompts, gens, adjust, max_new_tokens=N, eos_ids=eos, pad_id=0,
                                        slots=slots, head=model.get_output_embeddings(), should_stop=count_steps))  # fmt: skip
    gens = [th.Generator(DEV).manual_seed(i) for i in range(jobs)]  # the same completions again, for their lengths
    mask = engine.generate(bf16, prompts, gens, adjust, max_new_tokens=N, eos_ids=eos, pad_id=0, slots=slots,
                           head=model.get_output_embeddings())[1]  # fmt: skip
    lengths = mask.sum(-1).tolist()
    c = model.config
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bytes per cached token, bf16
    body = 2 * sum(p.numel() for n, p in bf16.named_parameters() if "embed" not in n)
    head = 4 * model.get_output_embeddings().weight.numel()
    steps = 8 * polls[0]
    kv_read = kv_token * sum(len(p) * n + n * n / 2 for p, n in zip(prompts, lengths, strict=True))
    bound_s = (steps * (body + head) + kv_read) / hbm_peak()
    return {"jobs": jobs, "N": N, "slots": slots, "tokens": sum(lengths), "mean_len": sum(lengths) / jobs,
            "truncated_frac": sum(n == N for n in lengths) / jobs, "seconds": t, "decode_tok_s": sum(lengths) / t,
            "steps": steps, "hbm_bound_s": bound_s, "hbm_fraction": bound_s / t}  # fmt: skip


def gpu_grpo_step(model, prompts_per_step: int = 16, G: int = 8, N: int = 1024, mean: int = 300) -> dict:
    """One GRPO step's rollout + update on the doubled Qwen3-0.6B-shaped model (128 completions of up to N tokens,
    mean ~`mean`): before (the old sampler on fp32 weights under autocast, batches of 64) and after (the engine on
    the bf16 copy, 128 slots), and the sampler–trainer mismatch the bf16 copy brings (sampler_kl)."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    prompts, eos = hazard_jobs(prompts_per_step * G, mean, DOUBLED, seed=1)
    opt = th.optim.AdamW(model.parameters(), lr=1e-7)
    options = grpo.update_options(grpo.Config(micro_batch_size=8, max_new_tokens=N))
    out = {}
    for name in ("before", "after"):
        t0 = time.perf_counter()
        gens = [th.Generator(DEV).manual_seed(i) for i in range(len(prompts))]
        if name == "before":
            parts = []
            with th.autocast(DEV, dtype=th.bfloat16, enabled=DEV == "cuda"):
                for s in range(0, len(prompts), 64):
                    parts.append(rollout.sample(model, prompts[s : s + 64], adjust, max_new_tokens=N, eos_ids=eos,
                                                pad_id=0, generator=gens[s : s + 64]))  # fmt: skip
            r = rollout.concat_rollouts(parts, 0)
        else:
            bf16 = rollout.sampling_copy(model)
            r = rollout.generate(bf16, prompts, gens, adjust, max_new_tokens=N, eos_ids=eos, pad_id=0,
                                 slots=len(prompts), head=model.get_output_embeddings())  # fmt: skip
        if DEV == "cuda":
            th.cuda.synchronize()
        t_rollout = time.perf_counter() - t0
        model.train()
        adv = th.linspace(-1, 1, len(prompts), device=DEV)
        t1 = time.perf_counter()
        stats = grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                            autocast=DEV == "cuda", **options)  # fmt: skip
        if name == "after":
            grpo_copy = time.perf_counter()
            rollout.copy_weights(bf16, model)
            stats["refresh_s"] = time.perf_counter() - grpo_copy
            del bf16
        if DEV == "cuda":
            th.cuda.synchronize()
        model.eval()
        out[name] = {"rollout_s": t_rollout, "update_s": time.perf_counter() - t1, "tokens": int(r.completion_mask.sum()),
                     **{k: stats[k] for k in ("sampler_kl", "sampler_dlogp_max", "refresh_s") if k in stats}}  # fmt: skip
    out["step_speedup"] = sum(out["before"][k] for k in ("rollout_s", "update_s")) / sum(
        out["after"][k] for k in ("rollout_s", "update_s")
    )
    return out


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
    checkpoints.decoder_checkpointing(model, True)
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
    checkpoints.decoder_checkpointing(model, False)
    model.eval()
    return out


def bench_gpu(shape: dict = QWEN3_06B, long_n: int = 8192, long_jobs: int = 128, lengths=(1024, 4096, 8192),
              groups=(4, 8, 16), step_prompts: int = 16, step_n: int = 1024, only: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Every GPU section, each guarded so that one failure leaves the others' figures."""
    bandwidth = copy_bandwidth(2**30 if DEV == "cuda" else 2**20)
    out: dict = {"device": device_name(), "hbm_peak_tb_s": hbm_peak() / 1e12, "copy_tb_s": bandwidth / 1e12}
    base = random_qwen3(QWEN3_ROWS, **shape, device=DEV)
    doubled = random_qwen3(DOUBLED, **shape, device=DEV)
    sections = [
        ("rollout_b64", lambda: gpu_rollout(base, 64)),
        ("long_rollout", lambda: gpu_long_rollout(doubled, jobs=long_jobs, N=long_n)),
        ("grpo_step", lambda: gpu_grpo_step(doubled, prompts_per_step=step_prompts, N=step_n)),
        ("mask_overhead", lambda: bench_mask_overhead(doubled, B=64, P=64, N=64, device=DEV)),
        ("logprob", lambda: gpu_logprob_memory(doubled)),
        ("update", lambda: gpu_update(doubled, lengths, groups, group_T=lengths[0])),
    ]
    for name, fn in sections:
        if only and name not in only:
            continue
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
             "weights; sampling from a bf16 copy, training under bf16 autocast", "", "| figure | value | target | setting |", "|---|---|---|---|"]  # fmt: skip

    def failed(name: str) -> bool:
        if "error" in g.get(name, {"error": "not run"}):
            lines.append(f"| {name} | — | failed | {g.get(name, {}).get('error', 'not run')[:300]} |")
            return True
        return False

    if not failed("rollout_b64"):
        r = g["rollout_b64"]
        lines.append(
            f"| engine_speedup_vs_hf, B = {r['B']} | {r['speedup']:.2f} | target ≥ 5 | V = 151,936, {r['N']} new tokens, "
            f"EOS off: engine {r['engine_tok_s']:.0f} tok/s, HF generate (same bf16 weights) {r['hf_bf16_tok_s']:.0f}, "
            f"old sampler (static cache + CUDA graph) {r['old_static_graph_tok_s']:.0f} |"
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
            f"| engine tokens/s, {m['jobs']} jobs up to {m['N']:,} tokens | {m['decode_tok_s']:,.0f} | — | V = "
            f"{DOUBLED:,} with the gate, {m['slots']} slots, mean length {m['mean_len']:.0f}, "
            f"{m['truncated_frac']:.0%} truncated, {m['seconds']:.0f} s |"
        )
        lines.append(
            f"| fraction of the HBM bound | {m['hbm_fraction']:.0%} | target ≥ 50 % | {m['steps']} decode steps, each "
            f"reading the bf16 body, the fp32 head and the live KV: {m['hbm_bound_s']:.1f} s at peak bandwidth |"
        )
    if not failed("grpo_step"):
        s = g["grpo_step"]
        b, a = s["before"], s["after"]
        lines.append(
            f"| GRPO step (128 completions ≤ 1,024 tokens), before → after | {s['step_speedup']:.2f}× | — | rollout "
            f"{b['rollout_s']:.1f} → {a['rollout_s']:.1f} s, update {b['update_s']:.1f} → {a['update_s']:.1f} s; "
            f"bf16 sampler vs trainer: sampler_kl {a['sampler_kl']:.2e}, max |Δ log p| {a['sampler_dlogp_max']:.2f} |"
        )
    if not failed("update"):
        u = g["update"]
        lines += ["", "one grpo.update (V = 303,872, gradient checkpointing, micro-batches of 4):", ""]
        lines += ["| G | completion tokens | step s | peak GiB |", "|---|---|---|---|"]
        lines += [
            f"| {r['G']} | {r['T']} | {r['seconds']:.2f} | {r['peak_gib']:.2f} |" for r in u["length"] + u["group"]
        ]
    return "\n".join(lines)
