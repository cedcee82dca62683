"""--shard fsdp (FSDP2, gloo, two CPU processes) makes the same updates as one process on the same global batch: the
same metrics at every step and the same final weights, with and without a reasoning vocabulary, tied and untied, with
μ > 1 and a KL penalty (the reference model sharded like the policy); its sampling copy is the gathered master after
every update, so its rollouts are DDP's (also on the GPU's bf16 path, run on CPU); a preempted run resumes bitwise,
and checkpoints move between DDP and FSDP and load in plain transformers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th
from transformers import AutoModelForCausalLM

import checkpoints
import vocab as rvocab
from tests.conftest import tiny_model, weights_of
from tests.test_ddp import assert_same_training

ROOT = Path(__file__).resolve().parents[1]

# The trainer with a toy reward (the letter "e"); every copy of the sampling weights is checked against the gathered
# master (and a bf16 copy with an fp32 head, as on GPU, against it rounded), STOP_AFTER=n sends rank 0 a preemption
# signal once step n is logged, and BF16_ON_CPU=1 takes the GPU's --bf16 path on CPU.
SCRIPT = """
import copy, json, os, signal, sys
from dataclasses import replace
import torch as th
import grpo, rollout, sharding

def letter_e(completions, answers):
    hits = [float("e" in c) for c in completions]
    return hits, hits

copy_weights, log_step, copies, dtypes = grpo.copy_weights, grpo.log_step, [], set()

def checked_copy(dst, src, head=None):
    copy_weights(dst, src, head)
    dtypes.add(str(next(dst.parameters()).dtype))
    same = all(th.equal(p, sharding.full(q, p.dtype)) for p, q in zip(dst.parameters(), src.parameters()))
    # The GPU's copy too: bf16 (cast before the gather) with an fp32 head beside it, refreshed from the same master.
    half, half_head = rollout.sampling_copy(dst, th.bfloat16), copy.deepcopy(dst.get_output_embeddings())
    with th.no_grad():
        half_head.weight.zero_()
    copy_weights(half, src, half_head)
    same &= all(th.equal(h, p.to(th.bfloat16)) for h, p in zip(half.parameters(), dst.parameters()))
    copies.append(same and th.equal(half_head.weight, dst.get_output_embeddings().weight))

def log_and_stop(output_dir, m, *args):
    log_step(output_dir, m, *args)
    if m["step"] == int(os.environ.get("STOP_AFTER", -1)):
        os.kill(os.getpid(), signal.SIGUSR1)

grpo.copy_weights, grpo.log_step = checked_copy, log_and_stop
if os.environ.get("BF16_ON_CPU"):
    grpo.uses_bf16 = lambda device, bf16: bf16
grpo.train(replace(grpo.Config(), **json.loads(sys.argv[1])), score_fn=letter_e)
print(f"[check] sampling copies equal to the gathered master: {sum(copies)} of {len(copies)}")
print(f"[check] sampling copy dtypes: {sorted(dtypes)}")
"""

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def train(tmp_path: Path, out: Path, cfg: dict, ranks: int, **env) -> str:
    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    launch = TORCHRUN if ranks == 2 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([*launch, str(script), json.dumps({**cfg, "output_dir": str(out)})], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def toy_config(model_dir: Path, **kw) -> dict:
    return dict(model=str(model_dir), dataset="arithmetic", prompts_per_step=4, group_size=3, max_new_tokens=8,
                max_prompt_len=256, micro_batch_size=4, rollout_batch_size=0, temperature=1.0, lr=1e-4,
                warmup_steps=0, steps=2, save_every=0, device="cpu") | kw  # fmt: skip


@pytest.fixture
def untied_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "untied"
    model = tiny_model(len(tiny_tokenizer) + 4, seed=2, tie=False)
    model.generation_config.eos_token_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, extra",
    [
        ("tied", dict(reasoning_vocab_size=-1, num_iterations=2, beta=0.05)),
        ("untied", {}),
        ("untied", dict(reasoning_vocab_size=8, beta=0.05)),
    ],
    ids=["reasoning-vocab-tied-mu2-kl", "plain-untied", "reasoning-vocab-untied-kl"],  # tied and plain: test_slurm
)
def test_fsdp_two_ranks_train_like_one_process(tmp_path, tiny_model_dir, untied_model_dir, case, extra):
    model_dir = tiny_model_dir if case == "tied" else untied_model_dir
    cfg = toy_config(model_dir, sample_every=1, **extra)
    train(tmp_path, tmp_path / "one", cfg, ranks=1)
    log = train(tmp_path, tmp_path / "two", {**cfg, "shard": "fsdp"}, ranks=2)
    assert "2 rank(s)" in log and log.count("sampling copies equal to the gathered master: 2 of 2") == 2  # per rank
    assert_same_training(tmp_path / "one", tmp_path / "two", tolerance=1e-5)
    assert_same_completions(tmp_path / "one", tmp_path / "two")

    # The FSDP run's checkpoint is a plain transformers directory: it loads as one, with the same logits.
    one, two = (checkpoints.checkpoint_dirs(tmp_path / run)[-1] for run in ("one", "two"))
    a, b = (AutoModelForCausalLM.from_pretrained(d, dtype=th.float32).eval() for d in (one, two))
    assert a.config.tie_word_embeddings == b.config.tie_word_embeddings == (case == "tied")
    assert json.loads((two / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    ids = th.arange(2, 40)[None]
    with th.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() < 1e-4
    if "reasoning_vocab_size" in extra:
        assert rvocab.load(two).size == rvocab.load(one).size > 0


def assert_same_completions(one: Path, two: Path) -> None:
    """The runs' rollouts agree: the second's logged completions (rank 0 logs its share of the prompts) are the first's
    for the same step and problem, word for word."""
    one, two = ([json.loads(s) for s in (run / "samples.jsonl").read_text().splitlines()] for run in (one, two))
    by_prompt = {(s["step"], s["problem"]): s["completion"] for s in one}
    assert two and all(by_prompt[s["step"], s["problem"]] == s["completion"] for s in two)


def test_fsdp_in_bf16_samples_like_one_bf16_process_and_trains_within_bf16_precision(tmp_path, tiny_model_dir):
    """The GPU's path (--bf16: decoder layers gathered in bf16, a bf16 sampling copy with an fp32 head beside it) run
    on CPU: the same completions and rewards as one process under bf16 autocast, and the update's figures within bf16's
    precision (the two round differently: FSDP gathers the layers' norm weights in bf16, autocast keeps them fp32)."""
    cfg = toy_config(tiny_model_dir, sample_every=1, reasoning_vocab_size=-1, beta=0.05)
    log = train(tmp_path, tmp_path / "one", cfg, ranks=1, BF16_ON_CPU="1")
    assert "sampling copy dtypes: ['torch.bfloat16']" in log
    log = train(tmp_path, tmp_path / "two", {**cfg, "shard": "fsdp"}, ranks=2, BF16_ON_CPU="1")
    assert log.count("sampling copies equal to the gathered master: 2 of 2") == 2
    assert log.count("sampling copy dtypes: ['torch.bfloat16']") == 2
    assert_same_completions(tmp_path / "one", tmp_path / "two")
    one, two = ([json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two"))  # fmt: skip
    for a, b in zip(one, two, strict=True):
        assert (a["reward"], a["completion_len"]) == (b["reward"], b["completion_len"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2) and b["entropy"] == pytest.approx(a["entropy"])
        for key in ("loss", "kl"):  # near 0 here in any precision (ratio 1 at μ = 1; the policy near the reference)
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
    # Both runs moved the weights the same way (the embeddings' standard rows included): Adam's first steps move every
    # weight by about lr whatever its gradient's size, so bf16 rounding flips a near-zero gradient's sign, but only
    # there; different gradients would make the difference as large as the update itself.
    w0, w1, w2 = (weights_of(d) for d in [tiny_model_dir, *(checkpoints.checkpoint_dirs(tmp_path / r)[-1] for r in ("one", "two"))])  # fmt: skip
    d1, d2 = (th.cat([(w[k][: len(w0[k])] - w0[k]).flatten() for k in w0]) for w in (w1, w2))
    assert (d2 - d1).norm() < 0.2 * d1.norm()


def test_fsdp_preempted_run_resumes_bitwise_and_checkpoints_move_between_ddp_and_fsdp(tmp_path, tiny_model_dir):
    cfg = toy_config(tiny_model_dir, steps=4, reasoning_vocab_size=8, save_every=100)
    fsdp = {**cfg, "shard": "fsdp"}
    train(tmp_path, tmp_path / "straight", fsdp, ranks=2)
    train(tmp_path, tmp_path / "stopped", fsdp, ranks=2, STOP_AFTER="2")  # preempted: a checkpoint at step 2
    assert checkpoints.checkpoint_dirs(tmp_path / "stopped")[-1].name == "step_000002"
    shutil.copytree(tmp_path / "stopped", tmp_path / "crossed")
    train(tmp_path, tmp_path / "stopped", fsdp, ranks=2)  # resumed
    straight, resumed = (weights_of(checkpoints.checkpoint_dirs(tmp_path / d)[-1]) for d in ("straight", "stopped"))
    assert all(th.equal(straight[k], resumed[k]) for k in straight)  # bitwise, as DDP's resume
    assert_same_training(tmp_path / "straight", tmp_path / "stopped", tolerance=0.0, steps=[1, 2, 3, 4])

    # Checkpoints move between the two: FSDP's step 2 resumed by DDP (one process) for step 3, whose checkpoint FSDP
    # resumes for step 4; the same run, to float tolerance.
    train(tmp_path, tmp_path / "crossed", cfg, ranks=1, STOP_AFTER="3")
    assert checkpoints.checkpoint_dirs(tmp_path / "crossed")[-1].name == "step_000003"
    train(tmp_path, tmp_path / "crossed", fsdp, ranks=2)
    assert_same_training(tmp_path / "straight", tmp_path / "crossed", tolerance=1e-5, steps=[1, 2, 3, 4])
