"""Per-row sampling noise as a pure function of (the row's seed, the token's index, the vocabulary column): a job's
draws are the same whatever batch, slot or rank samples it, and a batch of rows takes one kernel, not one per row.

On a GPU (with Triton) one kernel draws the whole (B, V) block: Philox4x32-10 keyed by the row's seed at counter
step·V + column, Triton's `tl.rand`. Elsewhere (the CPU, where a kernel per row costs nothing beside the row's work)
each row takes a generator reseeded from (seed, step). The two devices draw different numbers for the same seed, as
torch's own CPU and CUDA generators do."""

from __future__ import annotations

import torch as th

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build: the per-row path serves every device
    triton = None

MASK63 = (1 << 63) - 1  # seeds are kept to 63 bits: they travel as int64
GOLDEN = 0x9E3779B97F4A7C15  # odd: (seed, step) ↦ seed·GOLDEN + step mod 2^64 is one-to-one in the seed


def row_seeds(seeds: list[int], device) -> th.Tensor:
    """The rows' seeds as an int64 tensor on `device` (any Python int; reduced to 63 bits)."""
    return th.tensor([s & MASK63 for s in seeds], dtype=th.long, device=device)


def row_uniforms(seeds: th.Tensor, steps: th.Tensor, V: int) -> th.Tensor:
    """u (B, V) with u[b, v] ~ U[0, 1), for token `steps[b]` (B,) of the stream `seeds[b]` (B,) (int64 tensors on
    the device the noise is for): a pure function of (seed, step, v), independent across all three."""
    if seeds.is_cuda and triton is not None:
        return philox_uniforms(seeds, steps, V)
    u = th.empty(len(seeds), V, device=seeds.device)
    g = th.Generator(device=seeds.device)
    for row, seed, step in zip(u, seeds.tolist(), steps.tolist(), strict=True):
        row.uniform_(generator=g.manual_seed((seed * GOLDEN + step) % 2**64))
    return u


def philox_uniforms(seeds: th.Tensor, steps: th.Tensor, V: int, block: int = 4096) -> th.Tensor:
    """row_uniforms in one Triton launch (grid: rows × column blocks)."""
    u = th.empty(len(seeds), V, device=seeds.device)
    if len(seeds):
        _philox_kernel[(len(seeds), triton.cdiv(V, block))](seeds, steps, u, V, BLOCK=block)
    return u


if triton is not None:

    @triton.jit
    def _philox_kernel(seed_ptr, step_ptr, out_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seed_ptr + row)
        counter = tl.load(step_ptr + row) * V + cols  # int64: step·V + column, unique per (step, column)
        tl.store(out_ptr + row.to(tl.int64) * V + cols, tl.rand(seed, counter), mask=cols < V)
