"""bench.py's `fsdp` section: what one rank holds for the policy under 2-way FSDP (--shard fsdp) ÷ under DDP, after an
optimizer step: its parameters, gradients and AdamW state (the local shards' bytes), and its peak resident set."""

from __future__ import annotations

import torch as th
from torch.distributed.tensor import DTensor

import sharding
from bench_common import in_child, peak_mib, random_qwen3, rss_mib
from distributed import setup_distributed, teardown_distributed, world


def local_mib(tensors) -> float:
    """Bytes this rank holds of `tensors` (a sharded one's local shard), in MiB."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def child_fsdp_memory(shard: str, vocab: int = 16384, hidden: int = 256, layers: int = 4) -> dict | None:
    """One AdamW step of a random tied Qwen3 on this rank (under torchrun for 'fsdp'); rank 0 returns its holdings."""
    device = setup_distributed("cpu")
    before = rss_mib()
    model = random_qwen3(vocab, hidden=hidden, layers=layers, heads=4, kv_heads=2).train()
    if shard == "fsdp":
        sharding.shard(model, device, bf16=False)
    opt = th.optim.AdamW(model.parameters(), lr=1e-4)
    ids = th.randint(0, vocab, (4, 128), generator=th.Generator().manual_seed(0))
    model(input_ids=ids).logits.logsumexp(-1).mean().backward()
    opt.step()
    params = list(model.parameters())
    held = {"params_mib": local_mib(params), "grads_mib": local_mib(p.grad for p in params),
            "optim_mib": local_mib(v for s in opt.state.values() for v in s.values() if v.dim() > 0)}  # fmt: skip
    out = {
        "shard": shard,
        "ranks": world()[1],
        **held,
        "held_mib": sum(held.values()),
        "peak_rss_mib": peak_mib() - before,
    }
    teardown_distributed()
    return out if world()[0] == 0 else None


def bench_fsdp() -> dict:
    ddp = in_child("fsdp_memory", shard="ddp")  # a DDP rank holds what one process does
    fsdp = in_child("fsdp_memory", ranks=2, shard="fsdp")
    return {"ddp": ddp, "fsdp": fsdp, "fsdp_param_mem_ratio": fsdp["held_mib"] / ddp["held_mib"],
            "fsdp_peak_rss_ratio": fsdp["peak_rss_mib"] / ddp["peak_rss_mib"]}  # fmt: skip


def fsdp_report(f: dict) -> list[str]:
    d, s = f["ddp"], f["fsdp"]
    return [
        f"fsdp: one rank's parameters + gradients + AdamW state after a step, 2-way FSDP {s['held_mib']:.1f} MiB "
        f"({s['params_mib']:.1f} + {s['grads_mib']:.1f} + {s['optim_mib']:.1f}) vs DDP {d['held_mib']:.1f} MiB "
        f"({d['params_mib']:.1f} + {d['grads_mib']:.1f} + {d['optim_mib']:.1f}) → fsdp_param_mem_ratio "
        f"{f['fsdp_param_mem_ratio']:.2f} (target ≤ 0.6); peak resident set {s['peak_rss_mib']:.0f} vs "
        f"{d['peak_rss_mib']:.0f} MiB ({f['fsdp_peak_rss_ratio']:.2f}: the model is built whole before it is sharded)",
    ]
