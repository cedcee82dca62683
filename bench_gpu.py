"""bench.py --device cuda: the same ratios on a Qwen3-0.6B-shaped model, and long rollouts at full vocabulary.
Each section is guarded, so one failure leaves the others' figures. DEV = "cpu" runs the code as a dry run."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
import warnings

import torch as th

import checkpoints
import engine
import grpo
import memory
import noise
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
        seeds = list(range(B))
        out = engine.generate(bf16, prompts, seeds, adjust, max_new_tokens=n, eos_ids=[-1], pad_id=QWEN3_BASE, slots=B,
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


def gpu_real_step(model, jobs: int = 128, N: int = 8192, mean: int = 2700, rollout_limit_s: float = 240.0) -> dict:
    """One GRPO step at the real shape, run as `train` runs it: the memory plan for this card (every 'auto' option),
    the run's KV cache, the engine on the bf16 copy (128 completions of up to N tokens, geometric lengths with mean
    ~N/3, the gate on), then the packed update (bf16 autocast, the planned token budget and checkpointing) taken
    twice (AdamW's state exists from the first). Planned vs measured peak memory; decode tokens/s and its fraction
    of the HBM bound (every decode step reads the bf16 body, the fp32 head and each live row's KV once); the step's
    time split. The rollout stops after `rollout_limit_s` (reported) so the section fits the bench's budget."""
    cfg = grpo.Config(max_new_tokens=N, reasoning_vocab_size=-1)
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    params = sum(p.numel() for p in model.parameters())
    free = memory.free_memory(th.device(DEV)) + (th.cuda.memory_allocated() if DEV == "cuda" else 4 * params)
    plan = memory.memory_plan(memory.model_shape(model.config, params=params), cfg, DEV, free_bytes=free)
    if DEV == "cuda":
        th.cuda.reset_peak_memory_stats()
    bf16 = rollout.sampling_copy(model)
    cache = engine.new_cache(bf16, plan.slots, cfg.max_prompt_len + N)
    checkpoints.decoder_checkpointing(model, plan.checkpointing)
    opt = th.optim.AdamW(model.parameters(), lr=1e-7)
    prompts, eos = hazard_jobs(jobs, mean, DOUBLED, seed=1)
    steps, t0 = [0], time.perf_counter()

    def count_steps() -> bool:  # polled every 8 decode steps
        steps[0] += 8
        return time.perf_counter() - t0 > rollout_limit_s

    seeds = list(range(jobs))
    out = []
    t_rollout = seconds(lambda: out.append(rollout.generate(bf16, prompts, seeds, adjust, max_new_tokens=N, eos_ids=eos,
                        pad_id=0, slots=plan.slots, cache=cache, should_stop=count_steps,
                        head=model.get_output_embeddings())))  # fmt: skip
    r = out[0]
    lengths = r.completion_mask.sum(-1).tolist()
    rollout_peak = th.cuda.max_memory_allocated() if DEV == "cuda" else 0
    c = model.config
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # bytes per cached token, bf16
    body = 2 * sum(p.numel() for n, p in bf16.named_parameters() if "embed" not in n)
    head = 4 * model.get_output_embeddings().weight.numel()
    kv_read = kv_token * sum(len(p) * n + n * n / 2 for p, n in zip(prompts, lengths, strict=True))
    bound_s = (steps[0] * (body + head) + kv_read) / hbm_peak()
    model.train()
    options = grpo.update_options(dataclasses.replace(cfg, micro_batch_tokens=plan.update_tokens))
    adv = th.linspace(-1, 1, jobs, device=DEV)
    update = lambda: grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None,  # noqa: E731
                                 ref_logp=None, autocast=DEV == "cuda", **options)  # fmt: skip
    t_first = seconds(update)
    t_update = seconds(update)
    t_refresh = seconds(lambda: rollout.copy_weights(bf16, model))
    model.eval()
    checkpoints.decoder_checkpointing(model, False)
    return {"planned_peak_gib": plan.peak / 2**30, "measured_peak_gib": th.cuda.max_memory_allocated() / 2**30
            if DEV == "cuda" else 0.0, "rollout_peak_gib": rollout_peak / 2**30, "plan": memory.format_plan(plan),
            "slots": plan.slots, "update_tokens": plan.update_tokens, "checkpointing": plan.checkpointing,
            "jobs": jobs, "N": N, "finished": t_rollout < rollout_limit_s,
            "tokens": sum(lengths), "mean_len": sum(lengths) / jobs, "rollout_s": t_rollout,
            "decode_tok_s": sum(lengths) / t_rollout, "hbm_fraction": bound_s / t_rollout, "update_first_s": t_first,
            "update_s": t_update, "refresh_s": t_refresh, "update_tok_s": int(r.completion_mask.sum()) / t_update}  # fmt: skip


def gpu_decode_syncs(model, jobs: int = 32, N: int = 128) -> dict:
    """Host–device syncs per decode step of the engine (torch.cuda.set_sync_debug_mode counts each one as a warning;
    EOS off, so every step decodes every row; the prefill's are counted too)."""
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    adjust.bias = adjust.bias.to(DEV)
    bf16 = rollout.sampling_copy(model)
    prompts = th.randint(0, QWEN3_BASE, (jobs, 64), generator=th.Generator().manual_seed(5)).tolist()
    seeds = list(range(jobs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if DEV == "cuda":
            th.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate(bf16, prompts, seeds, adjust, max_new_tokens=N, eos_ids=[-1], pad_id=0, slots=jobs,
                            head=model.get_output_embeddings())  # fmt: skip
        finally:
            if DEV == "cuda":
                th.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return {"jobs": jobs, "decode_steps": N - 1, "syncs": len(syncs), "syncs_per_step": len(syncs) / (N - 1),
            "kinds": sorted({m.split("\n")[0][:120] for m in syncs})[:8]}  # fmt: skip


def gpu_noise(B: int = 128, V: int = DOUBLED) -> dict:
    """One decode step's sampling noise for B rows: noise.row_uniforms (one kernel for the batch) vs a generator per
    row (one uniform_ kernel each, the engine before it), and Philox's known answer drawn on the device."""
    seeds, steps = noise.row_seeds(list(range(B)), DEV), th.zeros(B, dtype=th.long, device=DEV)
    gens = [th.Generator(DEV).manual_seed(i) for i in range(B)]
    u = th.empty(B, V, device=DEV)

    def per_row():
        for row, g in zip(u, gens, strict=True):
            row.uniform_(generator=g)

    runs = {"per_row": per_row, "batched": lambda: noise.row_uniforms(seeds, steps, V)}
    for fn in runs.values():
        fn()  # warm-up (the kernel's compilation)
    t = {k: min(seconds(fn) for _ in range(20)) for k, fn in runs.items()}
    first = noise.row_uniforms(seeds[:1], steps[:1], 1)[0, 0].item()  # seed 0, counter 0: Philox → 0x6627e8d5
    # The engine and the reference loop draw the same noise on the device: the same completions (a tiny fp32 model,
    # EOS likely so that rows end apart and 3 slots are refilled).
    tiny = random_qwen3(64, hidden=32, layers=2, device=DEV)
    bias = policy.padding_bias(64, 60, 64).to(DEV)
    bias[1] += 3.0
    small, prompts = policy.LogitAdjust(0.9, bias), [[5, 6, 7], [8, 9], [3], [4, 4, 4, 4], [2], [7, 7]]
    kw = dict(max_new_tokens=20, eos_ids=[1], pad_id=0)
    ref = rollout.sample(tiny, prompts, small, seeds=list(range(6)), **kw).completion_ids
    ids = engine.generate(tiny, prompts, list(range(6)), small, slots=3, **kw)[0]
    T = min(ids.shape[1], ref.shape[1])
    return {"B": B, "V": V, "per_row_ms": t["per_row"] * 1e3, "batched_ms": t["batched"] * 1e3,
            "speedup": t["per_row"] / t["batched"], "philox_known_answer": abs(first - 0x6627E8D5 * 4.6566127342e-10) < 1e-6,
            "engine_matches_reference": float((ids[:, :T] == ref[:, :T]).float().mean()) if ids.shape == ref.shape else 0.0}  # fmt: skip


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


def bench_gpu(shape: dict = QWEN3_06B, step_n: int = 8192, step_jobs: int = 128, rollout_limit_s: float = 240.0,
              only: tuple[str, ...] = (), noise_v: int = DOUBLED) -> dict:  # fmt: skip
    """Every GPU section, each guarded so that one failure leaves the others' figures (about 7 minutes on an H200,
    most of it the real step's rollout, which stops after `rollout_limit_s`)."""
    bandwidth = copy_bandwidth(2**30 if DEV == "cuda" else 2**20)
    out: dict = {"device": device_name(), "hbm_peak_tb_s": hbm_peak() / 1e12, "copy_tb_s": bandwidth / 1e12}
    base = random_qwen3(QWEN3_ROWS, **shape, device=DEV)
    doubled = random_qwen3(DOUBLED, **shape, device=DEV)
    sections = [
        ("decode_syncs", lambda: gpu_decode_syncs(doubled)),
        ("noise", lambda: gpu_noise(V=noise_v)),
        ("rollout_b64", lambda: gpu_rollout(base, 64)),
        ("mask_overhead", lambda: bench_mask_overhead(doubled, B=64, P=64, N=64, device=DEV)),
        ("logprob", lambda: gpu_logprob_memory(doubled)),
        ("real_step", lambda: gpu_real_step(doubled, jobs=step_jobs, N=step_n, rollout_limit_s=rollout_limit_s)),
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
    if not failed("noise"):
        m = g["noise"]
        lines.append(
            f"| noise_speedup_batched | {m['speedup']:.1f} | — | one decode step's noise, B = {m['B']}, V = {m['V']:,}: "
            f"one kernel {m['batched_ms']:.3f} ms vs a generator per row {m['per_row_ms']:.3f} ms; Philox's known "
            f"answer {'drawn' if m['philox_known_answer'] else 'NOT drawn'} on the device; the engine's tokens equal the "
            f"reference loop's: {m['engine_matches_reference']:.0%} |"
        )
    if not failed("decode_syncs"):
        m = g["decode_syncs"]
        lines.append(
            f"| host syncs per decode step | {m['syncs_per_step']:.2f} | target 1 (the EOS check) | {m['jobs']} rows, "
            f"{m['decode_steps']} decode steps, EOS off, {m['syncs']} syncs in all (prefill included): "
            f"{'; '.join(m['kinds'])[:200]} |"
        )
    if not failed("real_step"):
        m = g["real_step"]
        lines.append(
            f"| peak memory, one real-shaped GRPO step | {m['measured_peak_gib']:.1f} GiB measured | planned "
            f"{m['planned_peak_gib']:.1f} GiB | Qwen3-0.6B-shaped, V = {DOUBLED:,}, {m['slots']} slots, update rows of "
            f"{m['update_tokens']:,} tokens, checkpointing {'on' if m['checkpointing'] else 'off'}; rollout peak "
            f"{m['rollout_peak_gib']:.1f} GiB |"
        )
        lines.append(
            f"| decode tokens/s, {m['jobs']} jobs up to {m['N']:,} tokens | {m['decode_tok_s']:,.0f} "
            f"({m['hbm_fraction']:.0%} of the HBM bound) | ≥ 50 % of the bound | mean length {m['mean_len']:.0f}, "
            f"{'finished' if m['finished'] else 'stopped at the time limit'} after {m['rollout_s']:.0f} s |"
        )
        lines.append(
            f"| one GRPO step's time split | rollout {m['rollout_s']:.0f} s, update {m['update_s']:.1f} s "
            f"({m['update_tok_s']:,.0f} completion tokens/s; first {m['update_first_s']:.1f} s), refresh of the bf16 "
            f"copy {m['refresh_s']:.2f} s | — | {m['tokens']:,} completion tokens |"
        )
        lines += ["", "the plan it ran with:", "", "```", m["plan"], "```"]
    return "\n".join(lines)
