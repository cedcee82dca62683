"""Speed and memory benchmarks of the trainer, each a ratio measured side by side in one run (issue 6).

    uv run --extra demo --extra bench python bench.py   # prints the table (CPU, ~8 minutes on 2 cores)
    uv run --extra demo --extra bench python bench.py --json out.json   # also writes the figures
    python bench.py --device cuda [--json out.json]     # the GPU sections (a few minutes)

Keys: `logprob_mem_ratio` (chunked log-prob + loss forward/backward peak memory ÷ a naive full log_softmax),
`mask_overhead` and `mask_speedup_vs_text_processor` (the reasoning-vocabulary gate), `rollout_speedup_vs_hf`
(`grpo.sample` ÷ HF `generate`), `step_speedup_vs_trl` (one GRPO step ÷ TRL's GRPOTrainer's, bench_trl.py) and
`update_scaling` (one `grpo.update` against completion length and group size). On CPU, memory is the peak resident
set (`ru_maxrss`) of a fresh subprocess minus its resident set just before the measured computation; on GPU, the
peak allocated memory. `--device cuda` measures the same ratios on a Qwen3-0.6B-shaped model and the largest
rollout batch for 8,192-token completions with the vocabulary doubled.
"""

from __future__ import annotations

import os

for _name, _value in [("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")]:
    os.environ.setdefault(_name, _value)

import argparse  # noqa: E402
import copy  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch as th  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import grpo  # noqa: E402
import vocab as rvocab  # noqa: E402

QWEN3_ROWS, QWEN3_TOKENS, QWEN3_BASE = 151_936, 151_669, 151_643  # embedding rows, tokenizer size, regular tokens
THINK_ID, END_THINK_ID = 151_667, 151_668
DOUBLED = 2 * QWEN3_ROWS  # 303,872: Qwen3's vocabulary with every row copied
QWEN3_TOKENIZER = Path(__file__).resolve().parent.parent / "shared" / "tokenizers" / "qwen3"
REPEATS = 3

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": th.get_num_threads(),
        "torch": th.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def random_qwen3(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 1,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    device: str = "cpu",
) -> Qwen3ForCausalLM:
    """A random-init Qwen3-shaped decoder (tied embeddings, fp32): the head and the vocabulary are what is measured."""
    th.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads,
        intermediate_size=intermediate or 3 * hidden,
        max_position_embeddings=16384,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    with th.device(device):
        return Qwen3ForCausalLM(cfg).eval()


QWEN3_06B = dict(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072)  # Qwen3-0.6B's shape


def doubled_vocab() -> rvocab.ReasoningVocab:
    """Every one of Qwen3's 151,936 rows copied once (V = 303,872); tags are never copied, so rows ≥ 151,643 copy
    low ids instead (their content does not matter for timing or memory)."""
    src = th.arange(QWEN3_ROWS) % QWEN3_BASE
    return rvocab.ReasoningVocab(QWEN3_ROWS, src, THINK_ID, END_THINK_ID)


def qwen3_adjust(V: int, vocab: rvocab.ReasoningVocab | None, temperature: float = 1.0) -> grpo.LogitAdjust:
    return grpo.LogitAdjust(temperature, grpo.padding_bias(V, QWEN3_TOKENS, QWEN3_ROWS), vocab)


def median_time(fn, repeats: int = REPEATS, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_mib() -> float:
    """Current resident set of this process (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_child(task: str, **kwargs) -> dict:
    """Run `task` in a fresh interpreter so that its peak resident set is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"task": task, **kwargs})]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {task} {kwargs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def top_profile(fn, n: int = 6) -> list[tuple[float, int, str]]:
    """The n entries with the most own time in one call of fn (cProfile): (share of the total, calls, name)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # tottime
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [(v[2] / total, v[1], f"{name[2]} ({Path(name[0]).name}:{name[1]})") for name, v in rows]


def random_rollout(B: int, T: int, device: str = "cpu", P: int = 16) -> grpo.Rollout:
    """B completions of exactly T random tokens after P-token prompts ending in <think>."""
    g = th.Generator().manual_seed(T + B)
    prompt = th.randint(0, QWEN3_BASE, (B, P), generator=g)
    prompt[:, -1] = THINK_ID
    ids = th.randint(0, QWEN3_BASE, (B, T), generator=g)
    r = grpo.Rollout(
        prompt_ids=prompt,
        prompt_mask=th.ones_like(prompt),
        completion_ids=ids,
        completion_mask=th.ones_like(ids),
        truncated=th.zeros(B, dtype=th.bool),
        logp=th.zeros(B, T),
        entropy=th.zeros(B, T),
        start_inside=th.ones(B, dtype=th.bool),
    )
    return grpo.Rollout(**{k: None if v is None else v.to(device) for k, v in vars(r).items()})


def logprob_step(model, r: grpo.Rollout, adjust: grpo.LogitAdjust, chunk: int | None, autocast: bool = False):
    """Log-probs + loss, forward and backward, of one rollout: grpo.sequence_logprobs in chunks of `chunk`, or (None)
    the naive way, every position's (B, T, V) fp32 logits at once, then log_softmax."""
    with th.autocast(r.prompt_ids.device.type, dtype=th.bfloat16, enabled=autocast):
        if chunk:
            logp = grpo.sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                          adjust, r.start_inside, chunk)  # fmt: skip
        else:
            P = r.prompt_ids.shape[1]
            ids = th.cat([r.prompt_ids, r.completion_ids], 1)
            mask = th.cat([r.prompt_mask, th.ones_like(r.completion_mask)], 1)  # as grpo.sequence_logprobs
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, P - 1 : -1]
            z = adjust(grpo.lm_head_fp32(model, hidden), adjust.inside(r.completion_ids, r.start_inside))
            logp = z.log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    adv = th.ones(r.completion_ids.shape[0], device=logp.device)
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, adv, r.completion_mask, eps_low=0.2, eps_high=0.28,
                               beta=0.0, loss_type="token")  # fmt: skip
    loss.backward()
    model.zero_grad(set_to_none=True)


def share(profile: list[tuple[float, int, str]], needle: str) -> float:
    return sum(s for s, _, name in profile if needle in name)


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


def bench_mask_overhead(model=None, B: int = 8, P: int = 32, N: int = 32, device: str = "cpu") -> dict:
    """grpo.sample on the same V = 303,872 model (by default a small random one), with the gate (prompts end in
    <think>) and without it; on CUDA under bf16 autocast, as training samples."""
    model = model if model is not None else random_qwen3(DOUBLED, hidden=128, layers=2)
    g = th.Generator().manual_seed(1)
    prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g)
    prompts[:, -1] = THINK_ID
    prompts = prompts.tolist()
    with_mask, without = qwen3_adjust(DOUBLED, doubled_vocab()), qwen3_adjust(DOUBLED, None)
    with_mask.bias, without.bias = with_mask.bias.to(device), without.bias.to(device)

    def run(adjust):
        gen = th.Generator(device).manual_seed(0)
        with th.autocast(device, dtype=th.bfloat16, enabled=device == "cuda"):
            grpo.sample(model, prompts, adjust, max_new_tokens=N, eos_ids=[-1], pad_id=0, generator=gen)

    times = {"mask": [], "none": []}
    run(with_mask), run(without)  # warm-up
    for _ in range(REPEATS):  # interleaved, so that drift hits both alike
        for name, adjust in (("mask", with_mask), ("none", without)):
            times[name].append(seconds(lambda a=adjust: run(a), device))
    t_mask, t_none = statistics.median(times["mask"]), statistics.median(times["none"])
    return {"B": B, "N": N, "V": DOUBLED, "mask_s": t_mask, "none_s": t_none, "mask_overhead": t_mask / t_none - 1}


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
# 3. Rollouts: grpo.sample vs HF generate


def bench_rollout(model, V: int, adjust: grpo.LogitAdjust, B: int, P: int, N: int, pad_id: int, low: int) -> dict:
    g = th.Generator().manual_seed(3)
    prompts = th.randint(low, min(V, QWEN3_BASE), (B, P), generator=g).tolist()
    ids, mask = grpo.left_pad(prompts, pad_id)
    gc_ = copy.deepcopy(model.generation_config)
    gc_.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=0)
    gc_.eos_token_id, gc_.pad_token_id, gc_.bos_token_id = None, pad_id, None  # never stops early: EOS disabled

    def ours():
        gen = th.Generator().manual_seed(0)
        r = grpo.sample(model, prompts, adjust, max_new_tokens=N, eos_ids=[-1], pad_id=pad_id, generator=gen)
        assert r.completion_ids.shape == (B, N)

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
    gguf = grpo._smollm2_gguf()
    if Path(gguf).exists():
        model, tok = grpo.load_model_and_tokenizer(gguf, th.device("cpu"))
        model.eval()
        V = model.get_output_embeddings().weight.shape[0]
        adjust = grpo.LogitAdjust(1.0, th.zeros(V), None)
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
    cfg = grpo.Config(micro_batch_size=micro, max_new_tokens=T)

    def step(r):
        advantages = th.linspace(-1, 1, r.completion_ids.shape[0])
        grpo.update(model, opt, r, advantages, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                    cfg=cfg)  # fmt: skip

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
# 6. On a GPU (--device cuda): the same ratios on a Qwen3-0.6B-shaped model, and long rollouts at full vocabulary

# Peak HBM bandwidth (bytes/s) by device name, from the vendors' data sheets; the bench also measures a copy.
HBM_PEAK = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.039e12,
            "A100 80GB PCIe": 1.935e12, "A100-SXM4-40GB": 1.555e12, "L40S": 0.864e12}  # fmt: skip


DEV = "cuda"  # the GPU sections' device; "cpu" only for a dry run of their code


def seconds(fn, device: str | None = None) -> float:
    """Wall time of fn(), the device's queued work included (device: DEV by default)."""
    device = device or DEV
    if device == "cuda":
        th.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        th.cuda.synchronize()
    return time.perf_counter() - t0


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
    """A should_stop for grpo.sample that ends the rollout at its `checks`-th stop check (8 decode steps each)."""
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        return calls[0] >= checks

    return should_stop


def gpu_rollout(model, B: int, P: int = 64, N: int = 128) -> dict:
    """grpo.sample (growing cache, and static cache + CUDA graph) vs HF generate, bf16 autocast, EOS disabled."""
    dev = DEV
    g = th.Generator().manual_seed(3)
    prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g).tolist()
    ids, mask = (x.to(dev) for x in grpo.left_pad(prompts, QWEN3_BASE))
    adjust = grpo.LogitAdjust(1.0, grpo.padding_bias(QWEN3_ROWS, QWEN3_TOKENS, QWEN3_ROWS).to(dev), None)
    gen_cfg = copy.deepcopy(model.generation_config)
    gen_cfg.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=0)
    gen_cfg.eos_token_id, gen_cfg.pad_token_id, gen_cfg.bos_token_id = None, QWEN3_BASE, None

    def ours(static: bool, n: int = N):
        gen = th.Generator(dev).manual_seed(0)
        r = grpo.sample(model, prompts, adjust, max_new_tokens=n, eos_ids=[-1], pad_id=QWEN3_BASE, generator=gen,
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

    def rollout(B: int, checks: int):
        g = th.Generator().manual_seed(B)
        prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g)
        prompts[:, -1] = THINK_ID
        gen = th.Generator(DEV).manual_seed(0)
        with th.autocast(DEV, dtype=th.bfloat16):
            grpo.sample(model, prompts.tolist(), adjust, max_new_tokens=N, eos_ids=[-1], pad_id=0, generator=gen,
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
            rollout(B, 1)
            fitted = B
        except th.OutOfMemoryError:
            tries.append(B)
        if fitted is None:  # outside the except block, whose traceback would keep the failed cache alive
            gc.collect()
            th.cuda.empty_cache()
            B = int(B * 0.9) // 8 * 8
    if fitted is None:
        return {"error": "no batch of 8 fits"}
    long, short = seconds(lambda: rollout(fitted, 8)), seconds(lambda: rollout(fitted, 1))
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
                        cfg=cfg, autocast=True)  # fmt: skip

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


# ---------------------------------------------------------------------------------------------------------------------
# Report

TARGETS = {  # key: (comparison, target)
    "logprob_mem_ratio": ("<=", 0.25),
    "mask_overhead": ("<=", 0.05),
    "mask_speedup_vs_text_processor": (">=", 50.0),
    "rollout_speedup_vs_hf": (">=", 3.0),
    "step_speedup_vs_trl": (">=", 2.0),
}


def met(key: str, value) -> str:
    if value is None:
        return "skipped"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"{'met' if ok else 'NOT met'} (target {op} {target:g})"


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), torch {m['torch']}, "
        f"transformers {m['transformers']}, python {m['python']}; memory = peak RSS (ru_maxrss) of a fresh "
        "subprocess minus its RSS before the measured step",
        "",
        "| key | value | target | detail |",
        "|---|---|---|---|",
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
            f"grpo.sample B = {mo['B']}, {mo['N']} tokens, V = {mo['V']:,}: {mo['mask_s']:.2f} s vs "
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
    if ro:
        for name, r in ro.items():
            if name != "draw_ms" and r is not None:
                lines += ["", f"profile, {name} (share of own time, cProfile):", "  grpo.sample:"]
                lines += [f"    {s:5.1%} {c:>6} calls  {x}" for s, c, x in r["profile_ours"]]
                lines += ["  HF generate:"] + [f"    {s:5.1%} {c:>6} calls  {x}" for s, c, x in r["profile_hf"]]
    return "\n".join(lines + ["", "notes:"] + [f"- {x}" for x in notes(results)])


def notes(results: dict) -> list[str]:
    """Why a target is missed, from the figures of this run."""
    out = []
    lp = results.get("logprob")
    if lp and lp["logprob_mem_ratio"] is not None and lp["logprob_mem_ratio"] > TARGETS["logprob_mem_ratio"][1]:
        c = lp["default_chunk"]
        one = c * lp["V"] * 4 / 2**20  # MiB of one fp32 (chunk, V) block
        out.append(
            f"logprob_mem_ratio: the peak grows with the chunk, not with T (chunk 256 gives "
            f"{lp['ratio_by_chunk'].get(256, float('nan')):.3f}), but at the default chunk {c} the peak is "
            f"{lp['chunked_mib'][c] / one:.1f} fp32 (chunk, V) blocks: LogitAdjust and adjust_logits build z / T, "
            "+ bias, the where() bias and the sum out of place, so several (chunk, V) copies are alive at once. "
            "In-place ops there, or a smaller default chunk, would meet the target."
        )
    mt = results.get("mask_vs_text")
    if mt and mt["mask_speedup_vs_text_processor"] < TARGETS["mask_speedup_vs_text_processor"][1]:
        out.append(
            f"mask_speedup_vs_text_processor: tracking the think state is {mt['state_only_speedup']:.0f}x faster "
            f"than decoding to text, but both variants then add the gate's (B, V) bias, which at V = {DOUBLED:,} "
            f"costs {mt['grpo_full_s'] - mt['grpo_state_s']:.2f} s over {mt['L']} steps and dominates the ratio. "
            "The gate itself is needed by both designs; only the state tracking differs."
        )
    ro = results.get("rollout") or {}
    for name, r in ro.items():
        if name == "draw_ms" or r is None or r["speedup"] >= TARGETS["rollout_speedup_vs_hf"][1]:
            continue
        lin = share(r["profile_hf"], "linear")
        draw_ours = share(r["profile_ours"], "uniform_") + share(r["profile_ours"], "log_")
        draw_hf = share(r["profile_hf"], "multinomial")
        out.append(
            f"rollout_speedup_vs_hf ({name}): on CPU the model's matmuls (decoder and lm_head, the same in both: "
            f"grpo.sample runs the HF decoder body) take {lin:.0%} of HF generate's time, so even with nothing else "
            f"left the bound is {1 / lin:.1f}x. The rest is mostly the random draw over V: the race's uniform_ + log "
            f"take {draw_ours:.0%} of grpo.sample, HF's multinomial {draw_hf:.0%} of generate; generate's own "
            "per-step Python overhead is small at these sizes."
        )
    tr = results.get("trl")
    if tr and tr["step_speedup_vs_trl"] < TARGETS["step_speedup_vs_trl"][1]:
        t, o = tr["trl"], tr["ours"]
        out.append(
            f"step_speedup_vs_trl: rollout {t['rollout_s']:.1f} s vs {o['rollout_s']:.1f} s "
            f"({t['rollout_s'] / o['rollout_s']:.1f}x: HF generate's softmax + multinomial vs the race, as above), "
            f"update {t['update_s']:.1f} s vs {o['update_s']:.1f} s ({t['update_s'] / o['update_s']:.1f}x). On CPU "
            "both trainers are bounded by the same matmuls: the decoder and the V = 151,936 head, forward and "
            "backward (ours also recomputes each head chunk in backward, the price of flat memory)."
        )
    if "draw_ms" in ro:
        d = ro["draw_ms"]
        out.append(
            f"one draw over (8, {QWEN3_ROWS:,}) on this CPU: exponential_ {d['exponential_']:.1f} ms, −log th.rand "
            f"(the same Exp(1) law) {d['rand_log']:.1f} ms, softmax + multinomial {d['softmax_multinomial']:.1f} ms: "
            "the sampler draws its Exp(1) noise as −log U for this reason."
        )
    mo = results.get("mask_overhead")
    if mo and mo["mask_overhead"] < 0:
        out.append(
            "mask_overhead < 0 is run-to-run noise: the gate adds one (B, V) bias per step, below the noise of a "
            "decode step here."
        )
    sc = results.get("update_scaling")
    if sc and len(sc["length"]) >= 2:
        a, b = sc["length"][-2], sc["length"][-1]
        out.append(
            f"update scaling: from {a['T']} to {b['T']} completion tokens the step time grows "
            f"{b['seconds'] / a['seconds']:.1f}x (the head's FLOPs are linear in T) and the peak memory "
            f"{b['peak_mib'] / a['peak_mib']:.2f}x: flat once T exceeds one chunk, so the loss's memory does not "
            "grow with V×T."
        )
    if sc and len(sc["group"]) >= 2:
        a, b = sc["group"][0], sc["group"][-1]
        out.append(
            f"group size: from G = {a['G']} to {b['G']} the step time grows {b['seconds'] / a['seconds']:.1f}x "
            f"(linear in G·T) and the peak memory {b['peak_mib'] / a['peak_mib']:.2f}x: micro-batches bound it."
        )
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
                f"{r['hf_tok_s']:.0f} tok/s, grpo.sample {r['dynamic_tok_s']:.0f} (growing cache), "
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU sections")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args(argv)
    if args.child:
        th.set_num_threads(2)
        spec = json.loads(args.child)
        task = spec.pop("task")
        fn = {"logprob_memory": child_logprob_memory, "update": child_update, "trl": child_trl}[task]
        print(json.dumps(fn(**spec)))
        return {}

    t0 = time.perf_counter()
    results: dict = {"machine": machine()}
    if args.device == "cuda":
        if not th.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        results["gpu"] = bench_gpu()
        results["seconds"] = time.perf_counter() - t0
        print(gpu_report(results["gpu"]))
        print(f"\ntotal {results['seconds']:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        return results

    th.set_num_threads(2)
    sections = [
        ("logprob", bench_logprob_memory),
        ("mask_overhead", bench_mask_overhead),
        ("mask_vs_text", bench_mask_vs_text),
        ("rollout", bench_rollouts),
        ("update_scaling", bench_update_scaling),
        ("trl", bench_trl),
    ]
    for name, fn in sections:
        t = time.perf_counter()
        results[name] = fn()
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    results["seconds"] = time.perf_counter() - t0
    lp, mo, mt, ro = (results.get(k) for k in ("logprob", "mask_overhead", "mask_vs_text", "rollout"))
    speedups = [r["speedup"] for k, r in (ro or {}).items() if k != "draw_ms" and r is not None]
    results["keys"] = {
        "logprob_mem_ratio": lp["logprob_mem_ratio"] if lp else None,
        "mask_overhead": mo["mask_overhead"] if mo else None,
        "mask_speedup_vs_text_processor": mt["mask_speedup_vs_text_processor"] if mt else None,
        "rollout_speedup_vs_hf": min(speedups) if speedups else None,  # the worse of the two models
        "step_speedup_vs_trl": results["trl"]["step_speedup_vs_trl"] if results.get("trl") else None,
    }
    print(report(results))
    print(f"\ntotal {results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
