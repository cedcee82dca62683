"""Per-row sampling noise is a function of (seed, token index, column) alone, uniform on [0, 1), on either path: the
CPU's reseeded generators and the GPU's one Philox kernel (run here by Triton's interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

import noise

ROOT = Path(__file__).resolve().parents[1]

# The GPU kernel on CPU tensors under TRITON_INTERPRET=1 (read when the kernel is defined: a fresh process).
KERNEL_CHECK = """
import json, torch as th, noise
seeds = noise.row_seeds([0, 7, 2**70 + 3, 123456789], "cpu")
steps = th.tensor([0, 1, 5000, 2])
u = noise.philox_uniforms(seeds, steps, 3000, block=1024)  # V not a multiple of the block: the tail is masked
again = noise.philox_uniforms(seeds.flip(0), steps.flip(0), 3000, block=512).flip(0)  # other batch order and block
next_step = noise.philox_uniforms(seeds, steps + 1, 3000, block=1024)
print(json.dumps({"first": u[0, 0].item(), "same": th.equal(u, again), "min": u.min().item(), "max": u.max().item(),
                  "mean": u.mean().item(), "var": u.var().item(), "filled": bool((u >= 0).all()),
                  "corr_step": th.corrcoef(th.stack([u.flatten(), next_step.flatten()]))[0, 1].item(),
                  "corr_row": th.corrcoef(u[:2])[0, 1].item()}))
"""


def test_row_noise_depends_only_on_seed_step_and_column():
    seeds, steps = noise.row_seeds([3, 11, 2**64 + 5, 3], "cpu"), th.tensor([0, 4, 9, 1])
    u = noise.row_uniforms(seeds, steps, 5000)
    shuffled = noise.row_uniforms(seeds[[2, 0, 3, 1]], steps[[2, 0, 3, 1]], 5000)
    assert th.equal(shuffled, u[[2, 0, 3, 1]])  # a row's noise does not depend on its batch or position in it
    assert not th.equal(u[0], u[3])  # the same stream at another token index draws afresh
    assert th.equal(noise.row_uniforms(seeds[:1], steps[:1], 5000), u[:1])
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


@pytest.mark.skipif(noise.triton is None, reason="Triton is not installed (a CPU-only torch build)")
def test_gpu_noise_kernel_is_philox_keyed_by_the_seed_at_step_times_v_plus_column():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Philox4x32-10's known answer (Random123's test vector: key 0, counter 0 → 0x6627e8d5) as Triton's uniform.
    assert r["first"] == pytest.approx(0x6627E8D5 * 4.6566127342e-10, rel=1e-6)
    assert r["same"] and r["filled"] and 0 <= r["min"] and r["max"] < 1
    assert abs(r["mean"] - 0.5) < 0.01 and abs(r["var"] - 1 / 12) < 0.005
    assert abs(r["corr_step"]) < 0.02 and abs(r["corr_row"]) < 0.06
