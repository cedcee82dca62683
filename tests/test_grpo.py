"""The GRPO trainer's specification: advantages, loss, normaliser, sampler, learning, checkpoints and the CLI."""

import json
import math
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch as th

import checkpoints
import grpo
import policy
import rollout
from cli import parse_args
from config import Config
from grpo import group_advantages, policy_loss
from policy import LogitAdjust
from tests.conftest import tiny_model, weights_of

ROOT = Path(__file__).resolve().parents[1]


def plain_adjust(vocab_size: int, temperature: float = 1.0, num_tokens: int | None = None) -> LogitAdjust:
    bias = policy.padding_bias(vocab_size, num_tokens or vocab_size, vocab_size)
    return LogitAdjust(temperature, bias)


def tiny_cfg(**kw) -> Config:
    base = dict(
        eps_low=0.2,
        eps_high=0.28,
        beta=0.0,
        loss_type="token",
        micro_batch_size=8,
        micro_batch_tokens=0,  # padded; the packed update is held to it in test_packing.py
        max_grad_norm=1e9,
        max_new_tokens=6,
        logprob_chunk=5,
    )
    base.update(kw)
    return replace(Config(), **base)


# ---------------------------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_group_scale_hand_computed():
    r = th.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    a = group_advantages(r, 4, "group")
    std = math.sqrt(1 / 3)  # Bessel: Σ(0.5²)·4 / 3
    expected = th.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    assert th.allclose(a[:4], expected, atol=1e-6)
    assert th.equal(a[4:], th.zeros(4))  # all-equal group: no signal


def test_group_advantages_batch_and_none_scales():
    r = th.tensor([2.0, 0.0, 1.0, 1.0])  # groups of 2
    centered = th.tensor([1.0, -1.0, 0.0, 0.0])
    assert th.allclose(group_advantages(r, 2, "none"), centered)
    assert th.allclose(group_advantages(r, 2, "batch"), centered / (r.std() + 1e-4))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(th.zeros(4), 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(th.zeros(4), 1, "group")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(th.zeros(4), 2, "median")


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def _loss_case():
    # Two sequences; lengths 3 and 1. Ratios chosen to hit both clip sides.
    logp = th.log(th.tensor([[1.5, 0.5, 1.0], [1.1, 1.0, 1.0]]))
    old = th.zeros(2, 3)
    mask = th.tensor([[1, 1, 1], [1, 0, 0]])
    adv = th.tensor([1.0, -2.0])
    return logp, old, adv, mask


def test_policy_loss_token_mean_clipping_both_sides():
    logp, old, adv, mask = _loss_case()
    loss, stats = policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0, loss_type="token")
    # Row 0, A = +1: ratios 1.5 (clipped to 1.28), 0.5 (min picks 0.5), 1.0 → −(1.28 + 0.5 + 1.0)
    # Row 1, A = −2: ratio 1.1 → −min(−2.2, −2.2) = 2.2
    expected = (-(1.28 + 0.5 + 1.0) + 2.2) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac_high"] == pytest.approx(1 / 4)  # 1.5 > 1.28 with A > 0
    assert stats["clip_frac_low"] == pytest.approx(0.0)  # 0.5 < 0.8 but A > 0: the unclipped term is active
    assert stats["ratio"] == pytest.approx((1.5 + 0.5 + 1.0 + 1.1) / 4, abs=1e-6)


def test_policy_loss_low_side_clip_for_negative_advantage():
    logp = th.log(th.tensor([[0.5]])).requires_grad_(True)
    loss, stats = policy_loss(
        logp,
        th.zeros(1, 1),
        None,
        th.tensor([-1.0]),
        th.ones(1, 1),
        eps_low=0.2,
        eps_high=0.2,
        beta=0,
        loss_type="token",
    )
    assert loss.item() == pytest.approx(0.8)  # −min(−0.5, −0.8) = 0.8: clipped, no gradient
    assert stats["clip_frac_low"] == 1.0
    loss.backward()
    assert logp.grad.abs().sum() == 0


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sequence", (-(1.28 + 0.5 + 1.0) / 3 + 2.2 / 1) / 2),
        ("dr_grpo", (-(1.28 + 0.5 + 1.0) + 2.2) / (2 * 3)),
    ],
)
def test_policy_loss_aggregations(loss_type, expected):
    logp, old, adv, mask = _loss_case()
    loss, _ = policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_policy_loss_dr_grpo_uses_max_len_and_explicit_counts():
    logp, old, adv, mask = _loss_case()
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0)
    loss, _ = policy_loss(logp, old, None, adv, mask, loss_type="dr_grpo", max_len=10, **kw)
    assert loss.item() == pytest.approx((-(1.28 + 0.5 + 1.0) + 2.2) / 20, abs=1e-6)
    loss, _ = policy_loss(logp, old, None, adv, mask, loss_type="token", num_tokens=8, **kw)
    assert loss.item() == pytest.approx((-(1.28 + 0.5 + 1.0) + 2.2) / 8, abs=1e-6)


def test_policy_loss_kl_k3_estimator():
    logp = th.log(th.tensor([[0.5, 0.25]]))
    ref = th.log(th.tensor([[0.25, 0.25]]))
    mask = th.ones(1, 2)
    loss, stats = policy_loss(
        logp, logp.detach(), ref, th.zeros(1), mask, eps_low=0.2, eps_high=0.28, beta=0.1, loss_type="token"
    )
    d = math.log(0.5)  # log π_ref − log π_θ on the first token; 0 on the second
    kl0 = math.exp(d) - d - 1
    assert stats["kl"] == pytest.approx(kl0 / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * kl0 / 2, abs=1e-6)  # A = 0: only the KL term
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, None, th.zeros(1), mask, eps_low=0.2, eps_high=0.2, beta=0.1, loss_type="token")


@pytest.mark.parametrize("kl_ratio_weight", [False, True])
def test_the_kl_terms_gradient_is_the_forward_or_the_reverse_kl(kl_ratio_weight):
    """Exactly, in expectation over tokens drawn from π_θ (on-policy, ρ = 1 in value): ∇ of β·KL_t is the gradient of
    KL(π_ref‖π_θ); of β·ρ_t·KL_t (TRL's use_bias_correction_kl), the gradient of KL(π_θ‖π_ref)."""
    z = th.tensor([0.3, -1.0, 2.0, 0.5], dtype=th.float64, requires_grad=True)  # π_θ's logits over 4 tokens
    ref = th.log_softmax(th.tensor([1.0, 0.0, -0.5, 0.2], dtype=th.float64), -1)
    logp = th.log_softmax(z, -1)
    expected = sum(
        logp[x].exp().detach()
        * th.autograd.grad(policy_loss(logp[x].view(1, 1), logp[x].detach().view(1, 1), ref[x].view(1, 1),
                                       th.zeros(1), th.ones(1, 1), eps_low=0.2, eps_high=0.2, beta=1.0,
                                       loss_type="token", kl_ratio_weight=kl_ratio_weight)[0], z, retain_graph=True)[0]
        for x in range(4)
    )  # fmt: skip
    p, q = (ref, logp) if not kl_ratio_weight else (logp, ref)  # KL(p‖q)
    true = th.autograd.grad((p.exp() * (p - q)).sum(), z)[0]
    assert true.abs().max() > 0.05
    assert th.allclose(expected, true, atol=1e-12)


def test_policy_loss_rejects_unknown_type():
    logp, old, adv, mask = _loss_case()
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="mean")


# ---------------------------------------------------------------------------------------------------------------------
# Sampler


def test_gumbel_sampling_matches_softmax():
    z = th.tensor([[2.0, 1.0, 0.0, -math.inf, -1.0]]).repeat(40_000, 1)
    g = th.Generator().manual_seed(0)
    tokens, logp = policy.sample_tokens(z, g)
    freq = th.bincount(tokens, minlength=5).float() / tokens.numel()
    p = z[0].softmax(-1)
    assert freq[3] == 0  # −∞ never wins
    assert th.allclose(freq, p, atol=0.01), (freq, p)
    assert th.allclose(logp, p.log()[tokens])


def test_top_p_keeps_the_nucleus_and_renormalises():
    z = th.log(th.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20_000, 1)
    z = LogitAdjust(1.0, th.zeros(4), top_p=0.8).truncate(z)
    tokens, logp = policy.sample_tokens(z, th.Generator().manual_seed(1))
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert th.allclose(logp[tokens == 0], th.tensor(math.log(0.5 / 0.8)))


def _prompts():
    return [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3]]


def test_sampler_logprobs_equal_training_logprobs():
    model = tiny_model(64)
    adjust = plain_adjust(64, temperature=0.7, num_tokens=60)  # 4 padding rows never sampled
    r = rollout.sample(
        model, _prompts(), adjust, max_new_tokens=12, eos_ids=[1], pad_id=0, generator=th.Generator().manual_seed(0)
    )
    assert r.completion_ids.shape[0] == 4
    assert int(r.completion_ids[r.completion_mask.bool()].max()) < 60
    train_logp = grpo.sequence_logprobs(
        model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, adjust, chunk=7
    )
    assert (train_logp - r.logp).abs().max() < 1e-5
    assert (r.logp[r.completion_mask.bool()] < 0).all()


def test_static_cache_decoder_samples_the_same_tokens():
    model = tiny_model(64)
    adjust = plain_adjust(64, num_tokens=60)
    adjust.bias[1] += 3.0  # EOS is likely: rows stop at different steps
    kw = dict(max_new_tokens=20, eos_ids=[1], pad_id=0)
    dynamic = rollout.sample(model, _prompts(), adjust, generator=th.Generator().manual_seed(5), **kw)
    static = rollout.sample(model, _prompts(), adjust, generator=th.Generator().manual_seed(5), static_cache=True, **kw)
    assert len(set(dynamic.completion_mask.sum(-1).tolist())) > 1  # left padding and early stops are exercised
    assert th.equal(static.completion_ids, dynamic.completion_ids)
    assert th.equal(static.completion_mask, dynamic.completion_mask)
    assert (static.logp - dynamic.logp).abs().max() < 1e-5


def test_sampler_stops_rows_independently_and_masks_up_to_eos():
    model = tiny_model(16)
    adjust = plain_adjust(16, temperature=3.0)  # flat: EOS (id 1) comes early for some rows
    r = rollout.sample(
        model, [[2, 3]] * 16, adjust, max_new_tokens=30, eos_ids=[1], pad_id=0, generator=th.Generator().manual_seed(3)
    )
    lengths = r.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows stopped at different steps
    for ids, m, trunc in zip(r.completion_ids, r.completion_mask, r.truncated, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # contiguous
        if not trunc:
            assert ids[n - 1] == 1  # the EOS itself is inside the mask
            assert (ids[: n - 1] != 1).all()
            assert (ids[n:] == 0).all()  # padded after
        else:
            assert n == 30
    assert not r.truncated.all()  # some rows ended with their own EOS


def test_eos_inside_prompt_does_not_stop_row():
    model = tiny_model(16)
    adjust = plain_adjust(16)
    adjust.bias[1] = -math.inf  # the model can never emit EOS itself
    r = rollout.sample(
        model,
        [[1, 4, 1], [4, 5]],
        adjust,
        max_new_tokens=5,
        eos_ids=[1],
        pad_id=1,
        generator=th.Generator().manual_seed(0),
    )
    assert r.completion_mask.sum(-1).tolist() == [5, 5]
    assert r.truncated.all()


def test_same_seed_same_samples():
    model = tiny_model(64)
    adjust = plain_adjust(64)
    kw = dict(max_new_tokens=10, eos_ids=[1], pad_id=0)
    a = rollout.sample(model, _prompts(), adjust, generator=th.Generator().manual_seed(7), **kw)
    b = rollout.sample(model, _prompts(), adjust, generator=th.Generator().manual_seed(7), **kw)
    c = rollout.sample(model, _prompts(), adjust, generator=th.Generator().manual_seed(8), **kw)
    assert th.equal(a.completion_ids, b.completion_ids)
    assert not th.equal(a.completion_ids, c.completion_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Normaliser: micro-batching does not change the step


def _rollout(model, adjust, n=8):
    prompts = [[5 + i % 4, 6, 7 + i % 3][: 1 + i % 3] for i in range(n)]
    r = rollout.sample(
        model, prompts, adjust, max_new_tokens=9, eos_ids=[1], pad_id=0, generator=th.Generator().manual_seed(0)
    )
    return r


@pytest.mark.parametrize("loss_type", ["token", "sequence", "dr_grpo"])
def test_gradient_same_for_1_or_4_micro_batches(loss_type):
    adjust = plain_adjust(32, temperature=1.5)
    model = tiny_model(32)
    r = _rollout(model, adjust)
    assert len(set(r.completion_mask.sum(-1).tolist())) > 1  # uneven lengths make the normaliser matter
    adv = th.linspace(-1, 1, 8)
    weights = []
    for micro in (8, 2):
        m = tiny_model(32)
        opt = th.optim.SGD(m.parameters(), lr=0.1)
        cfg = tiny_cfg(loss_type=loss_type, micro_batch_size=micro, max_new_tokens=9)
        grpo.update(m, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                    **grpo.update_options(cfg))  # fmt: skip
        weights.append(th.cat([p.detach().flatten() for p in m.parameters()]))
    before = th.cat([p.detach().flatten() for p in tiny_model(32).parameters()])
    assert (weights[0] - before).abs().max() > 1e-4  # the step did something
    assert (weights[0] - weights[1]).abs().max() < 1e-6


def test_decoder_checkpointing_gives_the_same_update():
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)
    adv = th.linspace(-1, 1, 8)
    weights = []
    for on in (False, True):
        m = tiny_model(32).train()
        checkpoints.decoder_checkpointing(m, on)
        assert m.model.gradient_checkpointing is on
        opt = th.optim.SGD(m.parameters(), lr=0.1)
        cfg = tiny_cfg(micro_batch_size=4, max_new_tokens=9)
        grpo.update(m, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                    **grpo.update_options(cfg))  # fmt: skip
        weights.append(th.cat([p.detach().flatten() for p in m.parameters()]))
    assert (weights[0] - weights[1]).abs().max() < 1e-6


def test_non_finite_loss_skips_the_update():
    adjust = plain_adjust(32)
    model = tiny_model(32)
    r = _rollout(model, adjust)
    before = [p.detach().clone() for p in model.parameters()]
    opt = th.optim.AdamW(model.parameters(), lr=0.1)
    adv = th.full((8,), math.nan)
    stats = grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                        **grpo.update_options(tiny_cfg()))  # fmt: skip
    assert stats["skipped"] == 1.0
    assert all(th.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_step_without_signal_leaves_weights_and_adamw_state_alone():
    """After a step that learned something, a step whose groups all have equal rewards (advantages 0, β = 0) has a
    zero gradient: AdamW would still move every weight along its momentum, so the step is not taken."""
    adjust = plain_adjust(32)
    model = tiny_model(32)
    r = _rollout(model, adjust)
    opt = th.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    options = grpo.update_options(tiny_cfg())
    adv = th.tensor([1.0, -1.0] * 4)
    grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None, **options)
    before = [p.detach().clone() for p in model.parameters()]
    steps = [float(state["step"]) for state in opt.state.values()]
    equal = group_advantages(th.full((8,), 0.3), 4)  # 0.3 − mean: float32 rounding must not leave a signal
    assert th.equal(equal, th.zeros(8))
    stats = grpo.update(model, opt, r, equal, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                        **options)  # fmt: skip
    assert stats["grad_norm"] == 0.0 and stats["skipped"] == 0.0
    assert all(th.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert [float(state["step"]) for state in opt.state.values()] == steps == [1.0] * len(steps)


# ---------------------------------------------------------------------------------------------------------------------
# Learning


def test_random_tiny_model_learns_a_toy_reward():
    """Reward 1 when the completion contains token 7: rare for a random policy, learned within a few dozen steps."""
    th.manual_seed(0)
    model = tiny_model(64)
    adjust = plain_adjust(64)
    opt = th.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = tiny_cfg(micro_batch_size=32, max_new_tokens=8)
    prompts = [[10 + p] for p in range(4) for _ in range(8)]  # 4 prompts × G = 8
    history = []
    for step in range(60):
        model.eval()
        r = rollout.sample(model, prompts, adjust, max_new_tokens=8, eos_ids=[1], pad_id=0,
                        generator=th.Generator().manual_seed(step))  # fmt: skip
        hit = ((r.completion_ids == 7) & r.completion_mask.bool()).any(-1).float()
        history.append(hit.mean().item())
        if len(history) >= 3 and sum(history[-3:]) / 3 >= 0.9:
            break
        model.train()
        grpo.update(model, opt, r, group_advantages(hit, 8), adjust, loss_mask=r.completion_mask, old_logp=None,
                    ref_logp=None, **grpo.update_options(cfg))  # fmt: skip
    print(f"toy reward: start {history[0]:.2f}, reached ≥ 0.9 (3-step mean) after {len(history)} rollouts")
    assert history[0] < 0.5
    assert sum(history[-3:]) / 3 >= 0.9, history


# ---------------------------------------------------------------------------------------------------------------------
# End to end: train(), checkpoints, resume


def run_cfg(model_dir, out, **kw) -> Config:
    base = dict(
        model=str(model_dir),
        dataset="arithmetic",
        output_dir=str(out),
        prompts_per_step=2,
        group_size=3,
        max_new_tokens=6,
        max_prompt_len=256,
        micro_batch_size=4,
        rollout_batch_size=4,
        temperature=1.0,
        lr=1e-3,
        warmup_steps=1,
        steps=4,
        save_every=2,
        device="cpu",
        format_weight=0.5,
    )
    base.update(kw)
    return replace(Config(), **base)


def letter_e(completions, answers):
    """A toy reward a random tiny model earns about half the time, so that every step has a learning signal."""
    hits = [float("e" in c) for c in completions]
    return hits, hits


def test_train_writes_metrics_and_checkpoints(tmp_path, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, tmp_path / "run", keep_last=1, beta=0.04, num_iterations=2)
    out = grpo.train(cfg, score_fn=letter_e)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    keys = "step reward reward_std accuracy frac_reward_zero_std loss kl clip_frac completion_len completion_len_max "
    keys += "truncated_frac entropy grad_norm lr rollout_s update_s tokens_per_s"
    for k in keys.split():
        assert all(math.isfinite(m[k]) for m in lines), k
    assert any(m["reward_std"] > 0 for m in lines) and any(m["kl"] > 0 for m in lines[1:])
    assert any(m["ratio"] != 1.0 for m in lines)  # num_iterations = 2: the second update sees π_θ ≠ π_old
    assert lines[0]["lr"] == pytest.approx(1e-3)  # warmup of 1 step: (0 + 1) / 1
    # step 0, the final one and the last 1: step 2 was rotated away
    assert [p.name for p in checkpoints.checkpoint_dirs(out)] == ["step_000000", "step_000004"]
    assert json.loads((out / "config.json").read_text())["beta"] == 0.04
    assert not list((out / "checkpoints").glob(".tmp*"))


def test_resume_gives_identical_weights(tmp_path, tiny_model_dir):
    straight = grpo.train(run_cfg(tiny_model_dir, tmp_path / "a", steps=4), score_fn=letter_e)
    grpo.train(run_cfg(tiny_model_dir, tmp_path / "b", steps=2), score_fn=letter_e)
    resumed = grpo.train(run_cfg(tiny_model_dir, tmp_path / "b", steps=4), score_fn=letter_e)
    w_a = weights_of(checkpoints.checkpoint_dirs(straight)[-1])
    w_b = weights_of(checkpoints.checkpoint_dirs(resumed)[-1])
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert th.equal(w_a[k], w_b[k]), k
    w0 = weights_of(checkpoints.checkpoint_dirs(straight)[0])
    assert any(not th.equal(w0[k], w_a[k]) for k in w0)  # training changed something
    steps = [json.loads(s)["step"] for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no repeated or missing steps


def test_resume_off_starts_over(tmp_path, tiny_model_dir):
    grpo.train(run_cfg(tiny_model_dir, tmp_path / "c", steps=2))
    grpo.train(run_cfg(tiny_model_dir, tmp_path / "c", steps=2, resume="off"))
    steps = [json.loads(s)["step"] for s in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_parses_lr_and_presets():
    assert parse_args(["--lr", "3e-6"]).lr == 3e-6
    demo = parse_args(["--preset", "demo", "--steps", "3"])
    assert demo.steps == 3 and demo.dataset == "arithmetic:9" and demo.model.endswith(".gguf")
    rv = parse_args(["--preset", "demo-reasoning"])
    assert rv.add_think_tags and rv.enable_thinking and rv.reasoning_vocab_size == 1024 and rv.model == demo.model
    assert parse_args([]) == Config()


def test_training_prompts_show_the_worked_examples(tiny_tokenizer):
    cfg = Config(model="x", instruction="", enable_thinking=False, few_shot=("What is 31 + 45?", "\\boxed{76}"))
    examples = grpo.load_prompts(cfg, tiny_tokenizer, "arithmetic:9", "test", None)
    assert "What is 31 + 45?<|im_end|>\n<|im_start|>assistant\n\\boxed{76}<|im_end|>" in tiny_tokenizer.decode(
        examples[0].prompt_ids
    )


@pytest.mark.parametrize("preset", ["demo", "demo-reasoning"])
def test_demo_example_is_not_held_out_and_copying_it_earns_nothing(preset):
    """The demos' worked example is a problem of neither split, and its response scores 0 on every problem the demo
    trains or evaluates on: copying the example cannot earn reward."""
    import data
    import reward

    cfg = parse_args(["--preset", preset])
    train, test = (data.load_rows(cfg.dataset, split=split) for split in ("train", "test"))
    assert cfg.eval_dataset == cfg.dataset and not {r["problem"] for r in train + test} & set(cfg.few_shot[0::2])
    for response in cfg.few_shot[1::2]:
        assert reward.extract_boxed(reward.answer_part(response)) is not None  # it shows the answer format
        assert reward.score([response] * len(train + test), [r["answer"] for r in train + test])[1] == [0.0] * len(
            train + test
        )


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, "grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in out.stdout, f.name


def test_preemption_signal_checkpoints_and_resume_continues(tmp_path, tiny_model_dir):
    """SIGUSR1 mid-run: the trainer stops at the next safe point, checkpoints the last completed step and exits 0;
    the rerun resumes there and the metrics have every step exactly once."""
    import os
    import signal
    import time

    cfg = run_cfg(tiny_model_dir, tmp_path / "p", steps=60, save_every=1000, max_new_tokens=24)
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom dataclasses import replace\nimport grpo\n"
        "grpo.train(replace(grpo.Config(), **json.loads(sys.argv[1])))\n"
    )
    args = [sys.executable, str(script), json.dumps(vars(cfg))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "p" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "preempted after step" in out
    done = [json.loads(s)["step"] for s in metrics.read_text().splitlines()]
    assert 2 <= len(done) < 60
    assert checkpoints.step_of(checkpoints.checkpoint_dirs(tmp_path / "p")[-1]) == done[-1]

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"at step {done[-1]}" in again.stdout
    steps = [json.loads(s)["step"] for s in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))


@pytest.mark.parametrize("thinking", [True, False])
def test_reward_sees_the_think_block_the_prompt_opened(tmp_path, tiny_model_dir, thinking):
    """With a prompt ending in `<think>\\n`, a box inside the still-open think block must not count as the answer."""
    seen = []

    def capture(completions, answers):
        seen.extend(completions)
        return [0.0] * len(completions), [0.0] * len(completions)

    grpo.train(run_cfg(tiny_model_dir, tmp_path / "t", steps=1, save_every=0, enable_thinking=thinking), capture)
    assert seen and all(s.startswith("<think>") == thinking for s in seen)


def test_drop_truncated_rows_are_left_out_of_the_loss():
    """Zeroing truncated rows in the loss mask equals training on the other rows alone (token-mean normaliser)."""
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)
    adv = th.linspace(-1, 1, 8)
    keep = th.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=th.bool)
    masked = weights_after_update(
        r, slice(None), r.completion_mask * keep[:, None], adv, adjust, tiny_cfg(max_new_tokens=9)
    )
    alone = weights_after_update(r, keep, r.completion_mask[keep], adv, adjust, tiny_cfg(max_new_tokens=9))
    assert (masked - alone).abs().max() < 1e-6


@pytest.mark.parametrize("loss_type", ["sequence", "dr_grpo"])
def test_a_dropped_truncation_stays_in_the_sequence_normaliser(loss_type):
    """As TRL's mask_truncated_completions: a dropped row adds no loss but still counts in N_seq (Dr.GRPO's normaliser
    is a constant), so the step is B_kept / B of training on the kept rows alone (SGD, no clipping)."""
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)
    adv = th.linspace(-1, 1, 8)
    keep = th.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=th.bool)
    cfg = tiny_cfg(max_new_tokens=9, loss_type=loss_type)
    w0 = th.cat([p.detach().flatten() for p in tiny_model(32).parameters()])
    masked = weights_after_update(r, slice(None), r.completion_mask * keep[:, None], adv, adjust, cfg,
                                  in_batch=th.ones(8, dtype=th.bool))  # fmt: skip
    alone = weights_after_update(r, keep, r.completion_mask[keep], adv, adjust, cfg)
    assert (alone - w0).abs().max() > 1e-4  # a real step
    assert th.allclose(masked - w0, (alone - w0) * 5 / 8, atol=1e-7)


def test_the_step_counts_dropped_truncations_and_not_skipped_groups(tmp_path, tiny_model_dir, monkeypatch):
    """grpo_step's masks: --drop-truncated zeroes a truncated row's loss and keeps it in N_seq (in_batch);
    --skip-uniform-groups takes a uniform group out of both."""
    seen = []

    def recording(cfg, model, ref_model, optimizer, r, advantages, loss_mask, classes, adjust, autocast, in_batch):
        seen.append((r.truncated.clone(), loss_mask.any(-1), in_batch, advantages))
        return real(cfg, model, ref_model, optimizer, r, advantages, loss_mask, classes, adjust, autocast, in_batch)

    real = grpo.policy_updates
    monkeypatch.setattr(grpo, "policy_updates", recording)

    def first_group_uniform(completions, answers):
        hits = [float(i >= 3 and "e" in c) for i, c in enumerate(completions)]
        return hits, hits

    cfg = run_cfg(tiny_model_dir, tmp_path / "t", steps=2, save_every=0, max_new_tokens=4, drop_truncated=True,
                  skip_uniform_groups=True, temperature=1.0)  # fmt: skip
    grpo.train(cfg, first_group_uniform)
    assert len(seen) == 2
    for truncated, has_loss, in_batch, advantages in seen:
        uniform = th.tensor([True] * 3 + [bool(advantages[3:].eq(0).all())] * 3)
        assert truncated.any()  # 4 new tokens: most completions are cut
        assert th.equal(in_batch, ~uniform)
        assert th.equal(has_loss, ~uniform & ~truncated)
    assert any((in_batch & truncated).any() for truncated, _, in_batch, _ in seen)  # a dropped row counted in N_seq


def weights_after_update(r, rows, loss_mask, advantages, adjust, cfg, in_batch=None) -> th.Tensor:
    """A fresh tiny model's flat weights after one SGD update on the rollout's `rows` with `loss_mask`."""
    sub = replace(r, **{f: getattr(r, f)[rows] for f in ("prompt_ids", "prompt_mask", "completion_ids",
                                                            "completion_mask", "truncated", "logp", "entropy")})  # fmt: skip
    m = tiny_model(32)
    grpo.update(m, th.optim.SGD(m.parameters(), lr=0.1), sub, advantages[rows], adjust, loss_mask=loss_mask,
                old_logp=None, ref_logp=None, in_batch=in_batch, **grpo.update_options(cfg))  # fmt: skip
    return th.cat([p.detach().flatten() for p in m.parameters()])


@pytest.mark.parametrize("loss_type", ["token", "sequence", "dr_grpo"])
def test_all_rows_dropped_is_a_no_op_not_a_crash(loss_type):
    adjust = plain_adjust(32)
    model = tiny_model(32)
    r = _rollout(model, adjust)
    before = [p.detach().clone() for p in model.parameters()]
    opt = th.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)  # decoupled decay would move weights anyway
    stats = grpo.update(model, opt, r, th.ones(8), adjust,
                        loss_mask=th.zeros_like(r.completion_mask), old_logp=None, ref_logp=None,
                        **grpo.update_options(tiny_cfg(loss_type=loss_type)))  # fmt: skip
    assert stats["loss"] == 0.0 and stats["skipped"] == 0.0
    assert all(th.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
