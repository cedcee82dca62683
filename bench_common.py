"""What bench.py, bench_gpu.py and bench_trl.py share: the models and inputs they measure (random Qwen3-shaped
decoders, Qwen3's vocabulary doubled), timers, the gate-overhead measurement both devices run, and the targets."""

from __future__ import annotations

import copy
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch as th
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

import engine
import grpo
import policy
import rollout
import vocab as rvocab

QWEN3_ROWS, QWEN3_TOKENS, QWEN3_BASE = 151_936, 151_669, 151_643  # embedding rows, tokenizer size, regular tokens


THINK_ID, END_THINK_ID = 151_667, 151_668


DOUBLED = 2 * QWEN3_ROWS  # 303,872: Qwen3's vocabulary with every row copied


QWEN3_TOKENIZER = Path(__file__).resolve().parent.parent / "shared" / "tokenizers" / "qwen3"


REPEATS = 3


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


def qwen3_adjust(V: int, vocab: rvocab.ReasoningVocab | None, temperature: float = 1.0) -> policy.LogitAdjust:
    return policy.LogitAdjust(temperature, policy.padding_bias(V, QWEN3_TOKENS, QWEN3_ROWS), vocab)


def hf_sampling_config(model, N: int, eos_ids: list[int] | None, pad_id: int):
    """HF `generate`'s settings for the contests: plain sampling at T = 1 (no top-k/top-p) of up to N new tokens,
    stopping at `eos_ids` (None: never early)."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N, min_new_tokens=0)
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = eos_ids, pad_id, None
    return cfg


def median_time(fn, repeats: int = REPEATS, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def random_rollout(B: int, T: int, device: str = "cpu", P: int = 16) -> rollout.Rollout:
    """B completions of exactly T random tokens after P-token prompts ending in <think>."""
    g = th.Generator().manual_seed(T + B)
    prompt = th.randint(0, QWEN3_BASE, (B, P), generator=g)
    prompt[:, -1] = THINK_ID
    ids = th.randint(0, QWEN3_BASE, (B, T), generator=g)
    r = rollout.Rollout(
        prompt_ids=prompt,
        prompt_mask=th.ones_like(prompt),
        completion_ids=ids,
        completion_mask=th.ones_like(ids),
        truncated=th.zeros(B, dtype=th.bool),
        logp=th.zeros(B, T),
        entropy=th.zeros(B, T),
        start_inside=th.ones(B, dtype=th.bool),
    )
    return rollout.Rollout(**{k: None if v is None else v.to(device) for k, v in vars(r).items()})


def logprob_step(model, r: rollout.Rollout, adjust: policy.LogitAdjust, chunk: int | None, autocast: bool = False):
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
            z = adjust(
                policy.lm_head_fp32(model.get_output_embeddings(), hidden),
                adjust.inside(r.completion_ids, r.start_inside),
            )
            logp = z.log_softmax(-1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    adv = th.ones(r.completion_ids.shape[0], device=logp.device)
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, adv, r.completion_mask, eps_low=0.2, eps_high=0.28,
                               beta=0.0, loss_type="token")  # fmt: skip
    loss.backward()
    model.zero_grad(set_to_none=True)


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


def bench_mask_overhead(model=None, B: int = 8, P: int = 32, N: int = 32, device: str = "cpu") -> dict:
    """The engine on the same V = 303,872 model (by default a small random one), with the gate (prompts end in
    <think>) and without it; on CUDA from a bf16 copy with the fp32 head, as training samples."""
    model = model if model is not None else random_qwen3(DOUBLED, hidden=128, layers=2)
    g = th.Generator().manual_seed(1)
    prompts = th.randint(0, QWEN3_BASE, (B, P), generator=g)
    prompts[:, -1] = THINK_ID
    prompts = prompts.tolist()
    with_mask, without = qwen3_adjust(DOUBLED, doubled_vocab()), qwen3_adjust(DOUBLED, None)
    with_mask.bias, without.bias = with_mask.bias.to(device), without.bias.to(device)

    sampler = rollout.sampling_copy(model) if device == "cuda" else model

    def run(adjust):
        seeds = list(range(B))
        engine.generate(sampler, prompts, seeds, adjust, max_new_tokens=N, eos_ids=[-1], pad_id=0, slots=B,
                        head=model.get_output_embeddings())  # fmt: skip

    times = {"mask": [], "none": []}
    run(with_mask), run(without)  # warm-up
    for _ in range(REPEATS):  # interleaved, so that drift hits both alike
        for name, adjust in (("mask", with_mask), ("none", without)):
            times[name].append(seconds(lambda a=adjust: run(a), device))
    t_mask, t_none = statistics.median(times["mask"]), statistics.median(times["none"])
    return {"B": B, "N": N, "V": DOUBLED, "mask_s": t_mask, "none_s": t_none, "mask_overhead": t_mask / t_none - 1}


TARGETS = {  # key: (comparison, target)
    "logprob_mem_ratio": ("<=", 0.25),
    "mask_overhead": ("<=", 0.05),
    "mask_speedup_vs_text_processor": (">=", 50.0),
    "rollout_speedup_vs_hf": (">=", 3.0),
    "step_speedup_vs_trl": (">=", 2.0),
    "engine_speedup_vs_hf": (">=", 2.5),
    "engine_speedup_vs_no_refill": (">=", 2.0),
}


def met(key: str, value) -> str:
    if value is None:
        return "skipped"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return f"{'met' if ok else 'NOT met'} (target {op} {target:g})"


def rss_mib() -> float:
    """Current resident set of this process (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_child(task: str, env: dict | None = None, ranks: int = 1, **kwargs) -> dict:
    """Run `task` in a fresh interpreter (with `env` added to the environment) so that its peak resident set is its
    own; `ranks` > 1: that many under torchrun (rank 0's result)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    cmd = [
        sys.executable,
        *torchrun,
        str(Path(__file__).resolve().with_name("bench.py")),
        "--child",
        json.dumps({"task": task, **kwargs}),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"child {task} {kwargs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
