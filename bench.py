"""Speed and memory benchmarks of the trainer, each a ratio measured side by side in one run (issue 6).

    uv run --extra demo --extra bench python bench.py   # prints the table (CPU, ~15 minutes on 2 cores)
    uv run --extra demo --extra bench python bench.py --json out.json   # also writes the figures
    uv run --extra demo python bench.py --only engine --json out.json   # the engine's section alone (~8 minutes)
    uv run --extra demo python bench.py --only packed     # packed update, gather-free decode, the plan (~4 minutes)
    uv run python bench.py --only fsdp                    # one rank's holdings under 2-way FSDP vs DDP (~1 minute)
    python bench.py --device cuda [--json out.json]     # the GPU sections

Keys: `logprob_mem_ratio` (chunked log-prob + loss forward/backward peak memory ÷ a naive full log_softmax),
`mask_overhead` and `mask_speedup_vs_text_processor` (the reasoning-vocabulary gate), `rollout_speedup_vs_hf` (the
engine ÷ HF `generate`, fixed lengths), `engine_speedup_vs_hf` and `engine_speedup_vs_no_refill` (a GRPO-like
variable-length workload), `step_speedup_vs_trl` (one GRPO step ÷ TRL's GRPOTrainer's, bench_trl.py) and
`update_scaling` (one `grpo.update` against completion length and group size), and bench_packed.py's
`update_speedup_packed`, `update_mem_ratio_packed`, `decode_gather_free_speedup`, `plan_update_error` and
`plan_kv_error`, and bench_fsdp.py's `fsdp_param_mem_ratio`. On CPU, memory is the peak resident set (`ru_maxrss`)
of a fresh subprocess minus its resident set just before the measured computation; on GPU, the peak allocated
memory. `--device cuda` (bench_gpu.py) measures the engine on a Qwen3-0.6B-shaped model against HF `generate` at B =
64, host syncs per decode step, and one real-shaped GRPO step as training runs it (the memory plan vs the measured
peak, decode tokens/s at up to 8,192 tokens as a fraction of the HBM bound, the time split).
"""

from __future__ import annotations

import os

for _name, _value in [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")]:
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch as th  # noqa: E402

import bench_fsdp  # noqa: E402
import bench_gpu  # noqa: E402
import bench_packed  # noqa: E402
import checkpoints  # noqa: E402
import config  # noqa: E402
import engine  # noqa: E402
import grpo  # noqa: E402
import policy  # noqa: E402
import rollout  # noqa: E402
from bench_common import (  # noqa: E402
    DOUBLED,
    END_THINK_ID,
    QWEN3_BASE,
    QWEN3_ROWS,
    QWEN3_TOKENIZER,
    REPEATS,
    THINK_ID,
    bench_mask_overhead,
    doubled_vocab,
    hf_sampling_config,
    in_child,
    logprob_step,
    machine,
    median_time,
    met,
    peak_mib,
    qwen3_adjust,
    random_qwen3,
    random_rollout,
    rss_mib,
    top_profile,
)

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


# ---------------------------------------------------------------------------------------------------------------------
# 1. Log-prob memory: chunked (grpo.sequence_logprobs) vs a naive full log_softmax


def child_logprob_memory(variant: str, T: int, chunk: int) -> dict:
    """Peak extra memory of log-probs + loss, forward and backward, for one completion of T tokens at V = 303,872."""
    model = random_qwen3(DOUBLED)
    adjust = qwen3_adjust(DOUBLED, doubled_vocab())
    r = random_rollout(1, T)
    adjust.vocab.biases("cpu")  # the gate's cached biases belong to the model, not to the measured step
    gc.collect()
    base = rss_mib()
    t0 = time.perf_counter()
    logprob_step(model, r, adjust, chunk if variant == "chunked" else None)
    return {"peak_mib": peak_mib() - base, "seconds": time.perf_counter() - t0}


def bench_logprob_memory(T: int = 2048, chunks=(256,)) -> dict:
    naive = in_child("logprob_memory", variant="naive", T=T, chunk=0)
    rows = {c: in_child("logprob_memory", variant="chunked", T=T, chunk=c) for c in chunks}
    default = grpo.Config().logprob_chunk
    return {
        "T": T,
        "V": DOUBLED,
        "naive_mib": naive["peak_mib"],
        "chunked_mib": {c: r["peak_mib"] for c, r in rows.items()},
        "ratio_by_chunk": {c: r["peak_mib"] / naive["peak_mib"] for c, r in rows.items()},
        "default_chunk": default,
        "logprob_mem_ratio": rows[default]["peak_mib"] / naive["peak_mib"] if default in rows else None,
    }


# ---------------------------------------------------------------------------------------------------------------------
# 2. The reasoning mask: its cost in sampling, and vs a decode-to-text logits processor


def bench_mask_vs_text(B: int = 8, P: int = 64, L: int = 1024) -> dict | None:
    """Per-step masking work over L decode steps, both given the same ids and the same (B, V) logits.

    grpo: `step_state` (one where over B) + `adjust_logits`. Text processor (the earlier design): decode each row's
    whole sequence to text every step, inside = last "<think>" after the last "</think>", then the same
    `adjust_logits`."""
    if not QWEN3_TOKENIZER.exists():
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    vocab = doubled_vocab()
    g = th.Generator().manual_seed(2)
    prompt = th.randint(0, QWEN3_BASE, (B, P), generator=g)
    prompt[:, -1] = THINK_ID
    gen = th.randint(0, QWEN3_BASE, (B, L), generator=g)
    gen[th.arange(B), th.randint(L // 2, L, (B,), generator=g)] = END_THINK_ID  # each row closes its think block
    seqs = th.cat([prompt, gen], 1)
    rows = seqs.tolist()
    z = th.randn(B, DOUBLED, generator=g)
    vocab.biases("cpu")

    def grpo_way(with_logits: bool):
        states = []
        inside = th.ones(B, dtype=th.bool)
        for t in range(L):
            if with_logits:
                vocab.adjust_logits(z, inside)
            states.append(inside)
            inside = vocab.step_state(inside, gen[:, t])
        return th.stack(states, 1)

    def text_way(with_logits: bool):
        states = []
        for t in range(L):
            flags = []
            for row in rows:
                text = tok.decode(row[: P + t])
                flags.append(text.rfind("<think>") > text.rfind("</think>"))
            inside = th.tensor(flags)
            if with_logits:
                vocab.adjust_logits(z, inside)
            states.append(inside)
        return th.stack(states, 1)

    if not th.equal(grpo_way(False), text_way(False)):
        raise AssertionError("the two think-state trackers disagree")
    t = {
        "grpo_state": median_time(lambda: grpo_way(False)),
        "text_state": median_time(lambda: text_way(False), warmup=0),
        "grpo_full": median_time(lambda: grpo_way(True), warmup=0),
        "text_full": median_time(lambda: text_way(True), warmup=0),
    }
    return {
        "B": B,
        "L": L,
        **{f"{k}_s": v for k, v in t.items()},
        "state_only_speedup": t["text_state"] / t["grpo_state"],
        "mask_speedup_vs_text_processor": t["text_full"] / t["grpo_full"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# 3. Rollouts: the engine vs HF generate, fixed lengths


def bench_rollout(model, V: int, adjust: policy.LogitAdjust, B: int, P: int, N: int, pad_id: int, low: int) -> dict:
    g = th.Generator().manual_seed(3)
    prompts = th.randint(low, min(V, QWEN3_BASE), (B, P), generator=g).tolist()
    ids, mask = rollout.left_pad(prompts, pad_id)
    gc_ = hf_sampling_config(model, N, None, pad_id)  # never stops early: EOS disabled

    def ours():
        seeds = list(range(B))
        ids = engine.generate(model, prompts, seeds, adjust, max_new_tokens=N, eos_ids=[-1], pad_id=pad_id, slots=B)[0]
        assert ids.shape == (B, N)

    def hf():
        th.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_)
        assert out.shape == (B, P + N), out.shape

    times = {"ours": [], "hf": []}
    ours(), hf()
    for _ in range(REPEATS):
        for name, fn in (("ours", ours), ("hf", hf)):
            t0 = time.perf_counter()
            with th.inference_mode():
                fn()
            times[name].append(time.perf_counter() - t0)
    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    return {
        "B": B,
        "P": P,
        "N": N,
        "V": V,
        "ours_tok_s": B * N / t_ours,
        "hf_tok_s": B * N / t_hf,
        "speedup": t_hf / t_ours,
        "profile_ours": top_profile(ours),
        "profile_hf": top_profile(hf),
    }


def bench_draws(B: int = 8, V: int = QWEN3_ROWS) -> dict:
    """ms per random draw over a (B, V) block: the race's exponential_, −log of th.rand (the same Exp(1) law), and
    HF's softmax + multinomial."""
    z = th.randn(B, V)
    fns = {
        "exponential_": lambda: th.empty_like(z).exponential_(),
        "rand_log": lambda: th.rand_like(z).log_().neg_(),
        "softmax_multinomial": lambda: th.multinomial(z.softmax(-1), 1),
    }
    return {k: 1e3 * median_time(lambda f=f: [f() for _ in range(10)], repeats=REPEATS) / 10 for k, f in fns.items()}


def bench_rollouts() -> dict:
    out = {"draw_ms": bench_draws()}
    model = random_qwen3(QWEN3_ROWS, hidden=128, layers=2)
    out["qwen3_random_v151936"] = bench_rollout(
        model, QWEN3_ROWS, qwen3_adjust(QWEN3_ROWS, None), B=8, P=32, N=48, pad_id=QWEN3_BASE, low=0
    )
    del model
    gguf = config.smollm2_gguf()
    if Path(gguf).exists():
        model, tok = checkpoints.load_model_and_tokenizer(gguf, th.device("cpu"))
        model.eval()
        V = model.get_output_embeddings().weight.shape[0]
        adjust = policy.LogitAdjust(1.0, th.zeros(V), None)
        out["smollm2_135m"] = bench_rollout(model, V, adjust, B=8, P=32, N=48, pad_id=tok.pad_token_id, low=100)
    else:
        out["smollm2_135m"] = None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# 4. One grpo.update against completion length


def child_update(T: int, G: int = 1, micro: int = 1) -> dict:
    """Time and peak extra memory of one grpo.update (one group of G completions of T tokens, AdamW, micro-batches
    of `micro`) on a 1-layer, hidden-64 model with Qwen3's 151,936-row vocabulary (the doubled one would double an
    already long CPU run)."""
    model = random_qwen3(QWEN3_ROWS)
    model.train()
    adjust = qwen3_adjust(QWEN3_ROWS, None)
    opt = th.optim.AdamW(model.parameters(), lr=1e-6)
    cfg = grpo.Config(micro_batch_size=micro, micro_batch_tokens=0, max_new_tokens=T)  # padded, as first measured

    def step(r):
        advantages = th.linspace(-1, 1, r.completion_ids.shape[0])
        grpo.update(model, opt, r, advantages, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                    **grpo.update_options(cfg))  # fmt: skip

    step(random_rollout(1, 256))  # warm-up; also allocates AdamW's state, which then counts in the baseline
    r = random_rollout(G, T)
    gc.collect()
    base = rss_mib()
    repeats = REPEATS if G * T < 1024 else 1  # long steps vary little; the whole bench must stay under 10 minutes
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(r)
        times.append(time.perf_counter() - t0)
    return {"T": T, "G": G, "seconds": statistics.median(times), "peak_mib": peak_mib() - base}


def bench_update_scaling(lengths=(256, 1024, 4096), groups=(2, 8, 16), group_T: int = 64) -> dict:
    """One grpo.update against completion length (G = 1) and against group size (T = group_T, micro-batches of 4)."""
    return {
        "length": [in_child("update", T=T) for T in lengths],
        "group": [in_child("update", T=group_T, G=G, micro=4) for G in groups],
    }


# ---------------------------------------------------------------------------------------------------------------------
# 5. One GRPO step against TRL's GRPOTrainer (bench_trl.py; the optional extra `bench`)


def child_trl() -> dict:
    import bench_trl

    th.set_num_threads(2)
    r = bench_trl.run()
    return {k: v for k, v in r.items() if k not in ("all_steps_cpu_s",)}


def bench_trl() -> dict | None:
    import importlib.util

    if importlib.util.find_spec("trl") is None or not QWEN3_TOKENIZER.exists():
        return None
    return in_child("trl")


# ---------------------------------------------------------------------------------------------------------------------
# 6. The engine on a GRPO-like workload: long-tailed lengths, some truncated; vs HF generate and vs no refill


def engine_contest(model, prompts: list[list[int]], adjust, eos_ids: list[int], pad_id: int, N: int, S: int,
                   repeats: int = 1) -> dict:  # fmt: skip
    """Real completion tokens per second of HF `generate` (batches of S, each until its longest row ends), the
    engine (S slots, refilled) and the engine without refill, on the same jobs, EOS ids and length limit N."""
    gen_cfg = hf_sampling_config(model, N, eos_ids, pad_id)
    eos = th.tensor(eos_ids)

    def hf() -> list[int]:
        lengths = []
        for s in range(0, len(prompts), S):
            ids, mask = rollout.left_pad(prompts[s : s + S], pad_id)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1] :]
            ended = th.isin(new, eos)  # a row's real tokens: up to and including its first EOS
            first = th.where(ended.any(-1), ended.int().argmax(-1) + 1, th.full((len(new),), new.shape[1]))
            lengths += first.tolist()
        return lengths

    def ours(refill: bool) -> list[int]:
        seeds = list(range(len(prompts)))
        mask = engine.generate(model, prompts, seeds, adjust, max_new_tokens=N, eos_ids=eos_ids, pad_id=pad_id,
                               slots=S, refill=refill)[1]  # fmt: skip
        return mask.sum(-1).tolist()

    runs = {"hf": hf, "engine": lambda: ours(True), "no_refill": lambda: ours(False)}
    rates, lengths = {k: [] for k in runs}, {}
    with th.inference_mode():
        for _ in range(repeats):  # interleaved, so that drift hits every contender alike
            for name, fn in runs.items():
                t0 = time.perf_counter()
                lengths[name] = fn()
                rates[name].append(sum(lengths[name]) / (time.perf_counter() - t0))
    tok_s = {k: statistics.median(v) for k, v in rates.items()}
    print(f"[engine contest] {json.dumps(tok_s)}", file=sys.stderr, flush=True)
    own = sorted(lengths["engine"])
    # Static batches of S decode S × (their longest) row-steps: the most that refill can gain on this workload.
    batches = [lengths["engine"][s : s + S] for s in range(0, len(prompts), S)]
    bound = sum(len(b) * max(b) for b in batches) / sum(lengths["engine"])
    return {"jobs": len(prompts), "slots": S, "max_new_tokens": N, **{f"{k}_tok_s": v for k, v in tok_s.items()},
            "speedup_vs_hf": tok_s["engine"] / tok_s["hf"], "speedup_vs_no_refill": tok_s["engine"] / tok_s["no_refill"],
            "mean_len": {k: sum(v) / len(v) for k, v in lengths.items()}, "median_len": own[len(own) // 2],
            "max_len": own[-1], "truncated_frac": sum(n == N for n in own) / len(own), "refill_bound": bound}  # fmt: skip


def bench_engine(jobs: int = 64, slots: int = 8, N: int = 160) -> dict:
    """The random Qwen3-shaped model (V = 151,936) with an EOS hazard — a set of EOS ids holding ~1/48 of its nearly
    flat distribution, so lengths are geometric with mean ~48, a tail to N and a few truncated — and SmolLM2-135M
    answering arithmetic questions with its own EOS (lengths 10 to N, a fifth truncated). The same jobs and limits
    for every contender."""
    g = th.Generator().manual_seed(6)
    out = {}
    model = random_qwen3(QWEN3_ROWS, hidden=128, layers=2)
    eos_ids = th.randperm(QWEN3_BASE, generator=g)[: QWEN3_ROWS // 48].tolist()
    lens = th.randint(16, 49, (jobs,), generator=g).tolist()
    prompts = [th.randint(0, QWEN3_BASE, (n,), generator=g).tolist() for n in lens]
    prompts = [[t for t in p if t not in set(eos_ids)] or [0] for p in prompts]
    out["qwen3_random_v151936"] = engine_contest(model, prompts, qwen3_adjust(QWEN3_ROWS, None), eos_ids, QWEN3_BASE,
                                                 N, slots)  # fmt: skip
    del model
    gguf = config.smollm2_gguf()
    if Path(gguf).exists():
        model, tok = checkpoints.load_model_and_tokenizer(gguf, th.device("cpu"))
        model.eval()
        adjust = policy.model_adjust(model, tok, None, 1.0)
        problems = [
            f"What is {a} + {b}? Put your final answer in \\boxed{{}}."
            for a, b in th.randint(1, 99, (jobs, 2), generator=g).tolist()
        ]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in problems]  # fmt: skip
        prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
        out["smollm2_135m"] = engine_contest(model, prompts, adjust, rollout.eos_token_ids(model, tok),
                                             tok.pad_token_id, N, slots)  # fmt: skip
    else:
        out["smollm2_135m"] = None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report


TABLE_HEAD = ["", "| key | value | target | detail |", "|---|---|---|---|"]


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}, python {m['python']}; memory = peak RSS (ru_maxrss) of a fresh "
        "subprocess minus its RSS before the measured step",
        *TABLE_HEAD,
    ]
    lp = results.get("logprob")
    if lp:
        per = ", ".join(f"chunk {c}: {r:.3f}" for c, r in lp["ratio_by_chunk"].items())
        lines.append(
            f"| logprob_mem_ratio | {lp['logprob_mem_ratio']:.3f} | {met('logprob_mem_ratio', lp['logprob_mem_ratio'])}"
            f" | T = {lp['T']}, V = {lp['V']:,}, chunk {lp['default_chunk']} (default); naive {lp['naive_mib']:.0f}"
            f" MiB; ratio by chunk: {per} |"
        )
    mo = results.get("mask_overhead")
    if mo:
        lines.append(
            f"| mask_overhead | {mo['mask_overhead']:+.3f} | {met('mask_overhead', mo['mask_overhead'])} | "
            f"engine B = {mo['B']}, {mo['N']} tokens, V = {mo['V']:,}: {mo['mask_s']:.2f} s vs "
            f"{mo['none_s']:.2f} s |"
        )
    mt = results.get("mask_vs_text")
    if mt:
        v = mt["mask_speedup_vs_text_processor"]
        lines.append(
            f"| mask_speedup_vs_text_processor | {v:.1f} | {met('mask_speedup_vs_text_processor', v)} | "
            f"B = {mt['B']}, L = {mt['L']}, state + adjust_logits (V = {DOUBLED:,}): {mt['grpo_full_s']:.2f} s vs "
            f"{mt['text_full_s']:.2f} s; think-state tracking alone: {mt['state_only_speedup']:.0f}× "
            f"({mt['grpo_state_s'] * 1e3:.1f} ms vs {mt['text_state_s']:.2f} s) |"
        )
    elif "mask_vs_text" in results:
        lines.append(f"| mask_speedup_vs_text_processor | — | skipped | no Qwen3 tokenizer at {QWEN3_TOKENIZER} |")
    ro = results.get("rollout")
    if ro:
        for name, r in ro.items():
            if name == "draw_ms":
                continue
            if r is None:
                lines.append(f"| rollout_speedup_vs_hf ({name}) | — | skipped | model not installed |")
                continue
            lines.append(
                f"| rollout_speedup_vs_hf ({name}) | {r['speedup']:.2f} | {met('rollout_speedup_vs_hf', r['speedup'])}"
                f" | B = {r['B']}, P = {r['P']}, {r['N']} new tokens, V = {r['V']:,}: {r['ours_tok_s']:.0f} vs "
                f"{r['hf_tok_s']:.0f} tokens/s |"
            )
    tr = results.get("trl")
    if tr:
        v = tr["step_speedup_vs_trl"]
        lines.append(
            f"| step_speedup_vs_trl | {v:.2f} | {met('step_speedup_vs_trl', v)} | {tr['model']}; {tr['setting']}: TRL "
            f"{tr['trl_step_s']:.1f} s (rollout {tr['trl']['rollout_s']:.1f} + update {tr['trl']['update_s']:.1f}) vs "
            f"{tr['ours_step_s']:.1f} s (rollout {tr['ours']['rollout_s']:.1f} + update {tr['ours']['update_s']:.1f}) |"
        )
    elif "trl" in results:
        lines.append("| step_speedup_vs_trl | — | skipped | needs the `bench` extra (TRL) and the Qwen3 tokenizer |")
    for name, r in (results.get("engine") or {}).items():
        if r is None:
            lines.append(f"| engine_speedup_vs_hf ({name}) | — | skipped | model not installed |")
            continue
        for key, value in (("engine_speedup_vs_hf", r["speedup_vs_hf"]), ("engine_speedup_vs_no_refill",
                                                                          r["speedup_vs_no_refill"])):  # fmt: skip
            lines.append(
                f"| {key} ({name}) | {value:.2f} | {met(key, value)} | {r['jobs']} jobs, {r['slots']} slots, up to "
                f"{r['max_new_tokens']} tokens (mean {r['mean_len']['engine']:.0f}, median {r['median_len']}, "
                f"{r['truncated_frac']:.0%} truncated): engine {r['engine_tok_s']:.0f}, no refill "
                f"{r['no_refill_tok_s']:.0f}, HF {r['hf_tok_s']:.0f} tokens/s; refill can gain at most "
                f"{r['refill_bound']:.2f}× here (static batches' row-steps ÷ real tokens) |"
            )
    if lines[-len(TABLE_HEAD) :] == TABLE_HEAD:  # no key of the table's was measured (e.g. --only fsdp)
        del lines[-len(TABLE_HEAD) :]
    sc = results.get("update_scaling")
    if sc:
        chunk = grpo.Config().logprob_chunk
        lines += [
            "",
            f"one grpo.update (AdamW, chunk {chunk}, V = 151,936, 1 layer, hidden 64), against length (G = 1):",
        ]
        lines += ["", "| completion tokens | step s | peak extra MiB |", "|---|---|---|"]
        lines += [f"| {r['T']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |" for r in sc["length"]]
        T = sc["group"][0]["T"]
        lines += ["", f"against group size (T = {T}, micro-batches of 4):", ""]
        lines += ["| group size G | step s | peak extra MiB |", "|---|---|---|"]
        lines += [f"| {r['G']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} |" for r in sc["group"]]
    if results.get("packed"):
        lines += ["", *bench_packed.packed_report(results["packed"])]
    if results.get("fsdp"):
        lines += ["", *bench_fsdp.fsdp_report(results["fsdp"])]
    if ro:
        for name, r in ro.items():
            if name != "draw_ms" and r is not None:
                lines += ["", f"profile, {name} (share of own time, cProfile):", "  engine:"]
                lines += [f"    {s:5.1%} {c:>6} calls  {x}" for s, c, x in r["profile_ours"]]
                lines += ["  HF generate:"] + [f"    {s:5.1%} {c:>6} calls  {x}" for s, c, x in r["profile_hf"]]
    return "\n".join(lines + ["", "Why a target is missed, with profiles: docs/benchmarks.md."])


SECTIONS = {
    "logprob": bench_logprob_memory,
    "mask_overhead": bench_mask_overhead,
    "mask_vs_text": bench_mask_vs_text,
    "rollout": bench_rollouts,
    "update_scaling": bench_update_scaling,
    "trl": bench_trl,
    "engine": bench_engine,
    "packed": bench_packed.bench_packed,
    "fsdp": bench_fsdp.bench_fsdp,
}


PACKED_KEYS = ("update_speedup_packed", "update_mem_ratio_packed", "decode_gather_free_speedup", "plan_update_error",
               "plan_kv_error")  # fmt: skip  # bench_packed.py


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU sections")
    parser.add_argument("--only", choices=list(SECTIONS), nargs="+", help="run just these CPU sections")
    parser.add_argument("--rollout-limit-s", type=float, default=240.0,
                        help="--device cuda: stop the real-shaped step's rollout after this many seconds")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args(argv)
    if args.child:
        th.set_num_threads(2)
        spec = json.loads(args.child)
        task = spec.pop("task")
        fn = {"logprob_memory": child_logprob_memory, "update": child_update, "trl": child_trl,
              "packed": bench_packed.child_packed, "kv": bench_packed.child_kv,
              "fsdp_memory": bench_fsdp.child_fsdp_memory}[task]  # fmt: skip
        if (result := fn(**spec)) is not None:  # None: a rank other than 0
            print(json.dumps(result))
        return {}

    t0 = time.perf_counter()
    results: dict = {"machine": machine()}
    if args.device == "cuda":
        if not th.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        results["gpu"] = bench_gpu.bench_gpu(rollout_limit_s=args.rollout_limit_s)
        results["seconds"] = time.perf_counter() - t0
        print(bench_gpu.gpu_report(results["gpu"]))
        print(f"\ntotal {results['seconds']:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return results

    th.set_num_threads(2)
    for name in args.only or SECTIONS:
        t = time.perf_counter()
        results[name] = SECTIONS[name]()
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - t0
    lp, mo, mt, ro, en = (results.get(k) for k in ("logprob", "mask_overhead", "mask_vs_text", "rollout", "engine"))
    speedups = [r["speedup"] for k, r in (ro or {}).items() if k != "draw_ms" and r is not None]
    contests = [r for r in (en or {}).values() if r is not None]
    results["keys"] = {
        "logprob_mem_ratio": lp["logprob_mem_ratio"] if lp else None,
        "mask_overhead": mo["mask_overhead"] if mo else None,
        "mask_speedup_vs_text_processor": mt["mask_speedup_vs_text_processor"] if mt else None,
        "rollout_speedup_vs_hf": min(speedups) if speedups else None,  # the worse of the two models
        "step_speedup_vs_trl": results["trl"]["step_speedup_vs_trl"] if results.get("trl") else None,
        # the worse of the two models, each a GRPO-like long-tailed workload
        "engine_speedup_vs_hf": min(r["speedup_vs_hf"] for r in contests) if contests else None,
        "engine_speedup_vs_no_refill": min(r["speedup_vs_no_refill"] for r in contests) if contests else None,
        **{k: results["packed"][k] for k in PACKED_KEYS if results.get("packed")},
        "fsdp_param_mem_ratio": results["fsdp"]["fsdp_param_mem_ratio"] if results.get("fsdp") else None,
    }
    results["keys"] = {k: v for k, v in results["keys"].items() if v is not None or args.only is None}
    print(report(results))
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
