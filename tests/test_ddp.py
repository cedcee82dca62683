"""Data parallelism: `torchrun --nproc_per_node 2` makes the same update as one process on the same global batch, also
with dynamic sampling (its further rounds are decided on every rank's groups, so every rank draws the same rounds) and
with advantages scaled by the batch's reward std (the std of every rank's rewards)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

import checkpoints
from tests.conftest import weights_of

ROOT = Path(__file__).resolve().parents[1]

# Runs the trainer with a toy reward (the letter "e" in the completion) so that every step has a learning signal; with
# dynamic sampling, problems with an even answer score 1 for every sample (uniform groups) so that rounds are needed.
SCRIPT = """
import json, sys
from dataclasses import replace
import grpo

def letter_e(completions, answers):
    hits = [float("e" in c) for c in completions]
    return hits, hits

def even_is_solved(completions, answers):
    hits = [1.0 if int(a) % 2 == 0 else float("e" in c) for c, a in zip(completions, answers)]
    return hits, hits

cfg = replace(grpo.Config(), **json.loads(sys.argv[1]))
grpo.train(cfg, score_fn=even_is_solved if cfg.resample_rounds else letter_e)
"""


def run(args: list[str], cfg: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*args, str(script), json.dumps(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "extra", [{}, {"resample_rounds": 2}, {"adv_scale": "batch"}], ids=["plain", "dynamic-sampling", "batch-std"]
)
def test_two_ranks_equal_one_process(tmp_path, tiny_model_dir, extra):
    cfg = dict(model=str(tiny_model_dir), dataset="arithmetic", prompts_per_step=4, group_size=3, max_new_tokens=8,
               max_prompt_len=256, micro_batch_size=4, rollout_batch_size=0, temperature=1.0, lr=1e-4, warmup_steps=0,
               steps=2, save_every=0, device="cpu", **extra)  # fmt: skip
    run([sys.executable], {**cfg, "output_dir": str(tmp_path / "one")}, tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = run(torchrun, {**cfg, "output_dir": str(tmp_path / "two")}, tmp_path)
    assert "2 rank(s)" in ddp.stdout

    m1 = assert_same_training(tmp_path / "one", tmp_path / "two")
    if "resample_rounds" in extra:
        assert any(m["resample_rounds"] > 0 for m in m1)  # further rounds were drawn, the same on both ranks
    w1 = weights_of(checkpoints.checkpoint_dirs(tmp_path / "one")[-1])
    w0 = checkpoints.load_model_and_tokenizer(str(tiny_model_dir), th.device("cpu"))[0].state_dict()
    assert any(not th.equal(w0[k], w1[k]) for k in w1)


def assert_same_training(one: Path, two: Path, tolerance: float = 1e-6, steps=(1, 2)) -> list[dict]:
    """Two runs (one process; several ranks or nodes) made the same updates on the same global batch: final weights
    (within `tolerance`) and every step's metrics agree (0: both exactly); returns the first run's metrics."""
    w1 = weights_of(checkpoints.checkpoint_dirs(one)[-1])
    w2 = weights_of(checkpoints.checkpoint_dirs(two)[-1])
    # Adam divides each gradient by its own scale, so fp32 summation-order noise in a near-zero gradient component
    # moves that weight by up to ~lr × its relative error: at lr 1e-4 the bound below is far above that noise.
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= tolerance, diff
    m1 = [json.loads(s) for s in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(s) for s in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(steps)  # rank 0 alone writes
    for a, b in zip(m1, m2, strict=True):  # the same samples, rewards and loss on the global batch
        for k in ("reward", "reward_std", "completion_len", "loss", "entropy", "grad_norm", "groups_in_loss",
                  "resample_rounds"):  # fmt: skip
            assert abs(a[k] - b[k]) <= (1e-5 if tolerance else 0.0) * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert any(m["reward_std"] > 0 for m in m1)  # the steps had a learning signal
    return m1
