"""The objective's options, against hand-computed values: dynamic sampling (DAPO: uniform groups out of the loss and
its normaliser, further rounds of prompts), GSPO's sequence-level ratio and clipping, mini-batch updates (--steps-per-rollout),
and the reasoning-vocabulary diagnostics per token class."""

import json
import math
from dataclasses import replace

import pytest
import torch as th

import grpo
import logs
import policy
import vocab as rvocab
from grpo import policy_loss, uniform_groups
from tests.conftest import tiny_model
from tests.test_grpo import _rollout, letter_e, plain_adjust, run_cfg, tiny_cfg, weights_after_update

# ---------------------------------------------------------------------------------------------------------------------
# Dynamic sampling


def test_uniform_groups():
    rewards = th.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert uniform_groups(rewards, 3).tolist() == [True, False, True]


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_uniform_groups_leave_the_normaliser(loss_type):
    """Masking the uniform groups equals training on the informative groups alone: they are out of N_tok and N_seq
    (before, the sequence loss still divided by every row)."""
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)  # 8 rows = 4 groups of 2
    rewards = th.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # groups 0 and 2 uniform
    adv = grpo.group_advantages(rewards, 2)
    keep = ~uniform_groups(rewards, 2).repeat_interleave(2)
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    cfg = tiny_cfg(max_new_tokens=9, loss_type=loss_type)
    masked = weights_after_update(r, slice(None), r.completion_mask * keep[:, None], adv, adjust, cfg)
    alone = weights_after_update(r, keep, r.completion_mask[keep], adv, adjust, cfg)
    assert (masked - alone).abs().max() < 1e-6


def even_is_solved(completions, answers):
    """A toy reward that makes every group of a problem with an even answer uniform (all 1) and the others mixed (the
    letter e), so that about half the groups carry no signal."""
    hits = [1.0 if int(answer) % 2 == 0 else float("e" in c) for c, answer in zip(completions, answers, strict=True)]
    return hits, hits


def test_dynamic_sampling_draws_rounds_until_enough_informative_groups(tmp_path, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, tmp_path / "run", prompts_per_step=4, group_size=3, steps=6, resample_rounds=3,
                  save_every=0, max_new_tokens=8)  # fmt: skip
    out = grpo.train(cfg, score_fn=even_is_solved)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(m["resample_rounds"] > 0 for m in lines)  # about half the groups are uniform: rounds were needed
    for m in lines:
        drawn = 4 * (1 + m["resample_rounds"])
        assert m["groups_informative"] == pytest.approx(drawn * (1 - m["frac_reward_zero_std"]))
        assert m["groups_in_loss"] == m["groups_informative"]  # uniform groups are out of the loss
        # rounds stop once 4 groups are informative, or after 3 further rounds
        assert m["groups_informative"] >= 4 or m["resample_rounds"] == 3


def test_skip_uniform_groups_counts_groups_in_loss(tmp_path, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, tmp_path / "run", prompts_per_step=4, steps=3, save_every=0, skip_uniform_groups=True)
    lines = [json.loads(s) for s in (grpo.train(cfg, score_fn=letter_e) / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        assert m["groups_in_loss"] == m["groups_informative"] == pytest.approx(4 * (1 - m["frac_reward_zero_std"]))
        assert m["resample_rounds"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# GSPO


def test_gspo_sequence_ratio_and_clipping_hand_computed():
    # Row 0 (3 tokens): token ratios 1.5, 0.5, 1.0 → s = (0.75)^(1/3) ≈ 0.9086, A = +1: inside [0.8, 1.28], unclipped.
    # Row 1 (1 token): ratio 1.5 → s = 1.5, A = −2: the unclipped term −2·1.5 = −3 is the minimum → ℓ = 3 (no clip).
    # Row 2 (2 tokens): ratios 2.0, 1.125 → s = 1.5, A = +1: clipped to 1.28.
    logp = th.log(th.tensor([[1.5, 0.5, 1.0], [1.5, 1.0, 1.0], [2.0, 1.125, 1.0]]))
    mask = th.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv = th.tensor([1.0, -2.0, 1.0])
    loss, stats = policy_loss(logp, th.zeros(3, 3), None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0,
                              loss_type="token", ratio_level="sequence")  # fmt: skip
    s0 = 0.75 ** (1 / 3)
    expected = (3 * -s0 + 1 * 3.0 + 2 * -1.28) / 6  # each token of a row carries its row's term (token mean)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_frac_high"] == pytest.approx(2 / 6)  # row 2's two tokens
    assert stats["clip_frac_low"] == 0.0
    assert stats["ratio"] == pytest.approx((3 * s0 + 1.5 + 2 * 1.5) / 6, abs=1e-6)


def test_gspo_gradient_is_the_sequence_ratio_times_the_mean_token_gradient():
    """∂ℓ_i/∂ log π_θ(o_it) = −A_i s_i / |o_i| for an unclipped row (the length-normalised sum in s_i)."""
    logp = th.log(th.tensor([[1.1, 0.9, 1.0, 1.0]])).requires_grad_(True)
    mask = th.tensor([[1, 1, 1, 0]])
    loss, _ = policy_loss(logp, th.zeros(1, 4), None, th.tensor([0.5]), mask, eps_low=0.2, eps_high=0.28, beta=0.0,
                          loss_type="sequence", ratio_level="sequence")  # fmt: skip
    loss.backward()
    s = (1.1 * 0.9) ** (1 / 3)
    assert logp.grad[0, :3].tolist() == pytest.approx([-0.5 * s / 3] * 3, abs=1e-6)
    assert logp.grad[0, 3].item() == 0.0


def test_token_and_sequence_ratio_agree_when_each_completion_has_one_token():
    logp, old = th.log(th.tensor([[1.5], [0.7]])), th.zeros(2, 1)
    mask, adv = th.ones(2, 1), th.tensor([1.0, -1.0])
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.0, loss_type="token")
    a = policy_loss(logp, old, None, adv, mask, ratio_level="token", **kw)
    b = policy_loss(logp, old, None, adv, mask, ratio_level="sequence", **kw)
    assert a[0].item() == pytest.approx(b[0].item()) and a[1] == b[1]


# ---------------------------------------------------------------------------------------------------------------------
# Reasoning-vocabulary diagnostics


def hand_vocab() -> rvocab.ReasoningVocab:
    # 10 standard ids (think 8, end think 9), copies of 1, 2, 3 at ids 10, 11, 12
    return rvocab.ReasoningVocab(standard_size=10, source_ids=th.tensor([1, 2, 3]), think_id=8, end_think_id=9)


def test_token_classes_hand_built():
    adjust = policy.LogitAdjust(1.0, th.zeros(13), hand_vocab())
    ids = th.tensor([[10, 4, 9, 5, 6], [8, 11, 12, 9, 0]])  # row 0 starts inside think, row 1 outside
    classes = policy.token_classes(ids, th.tensor([True, False]), adjust)
    # row 0: 10 (reasoning, inside), 4 (standard, inside), 9 (</think>, judged inside), 5, 6 (outside)
    # row 1: 8 (<think>, judged outside), 11, 12 (reasoning, inside), 9 (inside), 0 (outside)
    assert classes.tolist() == [[1, 0, 0, 2, 2], [2, 1, 1, 0, 2]]
    assert policy.token_classes(ids, None, policy.LogitAdjust(1.0, th.zeros(13))) is None


def test_class_diagnostics_hand_built():
    ids = th.tensor([[10, 4, 9, 5, 6], [8, 11, 12, 9, 0]])
    mask = th.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    classes = th.tensor([[1, 0, 0, 2, 2], [2, 1, 1, 0, 2]])
    logp = th.log(th.tensor([[2.0, 1.0, 1.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]]))
    adv = th.tensor([1.0, -2.0])
    _, stats = policy_loss(logp, th.zeros(2, 5), None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0,
                           loss_type="token", classes=classes)  # fmt: skip
    # [tokens, low clips, high clips, Σρ] per class, over the masked tokens
    th.testing.assert_close(stats["by_class"], th.tensor([[3, 0, 0, 3.0], [3, 0, 1, 4.0], [3, 0, 0, 2.5]]))
    entropy = th.tensor([[0.5, 1.0, 1.5, 2.0, 9.0], [1.0, 3.0, 5.0, 1.0, 2.0]])
    r = grpo.Rollout(prompt_ids=None, prompt_mask=None, completion_ids=ids, completion_mask=mask, truncated=None,
                     logp=None, entropy=entropy, start_inside=th.tensor([True, False]))  # fmt: skip
    m = logs.class_metrics({"rollout": r, "classes": classes, "advantages": adv}, stats["by_class"])
    assert (m["think_standard_tokens"], m["think_reasoning_tokens"], m["outside_tokens"]) == (3, 3, 3)
    assert m["think_standard_entropy"] == pytest.approx((1.0 + 1.5 + 1.0) / 3)  # (0,1) (0,2) (1,3)
    assert m["think_reasoning_entropy"] == pytest.approx((0.5 + 3.0 + 5.0) / 3)  # (0,0) (1,1) (1,2)
    assert m["outside_entropy"] == pytest.approx((2.0 + 1.0 + 2.0) / 3)  # (0,3) (1,0) (1,4); (0,4) is masked
    assert m["think_standard_abs_adv"] == pytest.approx(1 + 1 + 2)
    assert m["think_reasoning_abs_adv"] == pytest.approx(1 + 2 + 2)
    assert m["outside_abs_adv"] == pytest.approx(1 + 2 + 2)
    assert m["think_reasoning_clip_high"] == pytest.approx(1 / 3)  # ρ = 2 > 1.28 with A = +1
    assert m["think_reasoning_ratio"] == pytest.approx(4 / 3)
    assert m["outside_ratio"] == pytest.approx(2.5 / 3)  # ρ = 0.5 (A > 0: below the clip range, not clipped), 1, 1
    r2 = replace(r, completion_mask=mask)
    assert logs.copy_usage(r2, hand_vocab()).tolist() == [1, 1, 1]  # ids 10, 11, 12 once each


def test_reasoning_run_logs_diagnostics_and_usage(tmp_path, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, tmp_path / "rv", reasoning_vocab_size=-1, steps=2, save_every=1, group_size=4,
                  max_new_tokens=12)  # fmt: skip
    out = grpo.train(cfg, score_fn=letter_e)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        total = m["think_standard_tokens"] + m["think_reasoning_tokens"] + m["outside_tokens"]
        assert total == pytest.approx(m["completion_len"] * 2 * 4)
        assert all(math.isfinite(m[f"{c}_{k}"]) for c in policy.CLASSES for k in ("entropy", "abs_adv", "ratio"))
    usage = json.loads((out / "reasoning_usage.json").read_text())
    assert usage["step"] == 2 and sum(usage["counts"].values()) == sum(m["think_reasoning_tokens"] for m in lines)


# ---------------------------------------------------------------------------------------------------------------------
# Mini-batch updates: K optimizer steps per rollout


def mini_batch_setup():
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)  # 8 rows = 4 groups of 2, uneven lengths
    advantages = grpo.group_advantages(th.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 2)
    return adjust, r, advantages


def test_one_step_per_rollout_is_one_update_exactly():
    adjust, r, advantages = mini_batch_setup()
    cfg = tiny_cfg(max_new_tokens=9, steps_per_rollout=1)
    weights = []
    for via_policy_updates in (True, False):
        model = tiny_model(32)
        opt = th.optim.AdamW(model.parameters(), lr=1e-2)
        if via_policy_updates:
            grpo.policy_updates(cfg, model, None, opt, r, advantages, r.completion_mask, None, adjust)
        else:
            grpo.update(model, opt, r, advantages, adjust, loss_mask=r.completion_mask, old_logp=None, ref_logp=None,
                        **grpo.update_options(cfg))  # fmt: skip
        weights.append(th.cat([p.detach().flatten() for p in model.parameters()]))
    assert th.equal(weights[0], weights[1])


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_two_steps_per_rollout_hand_computed(loss_type):
    """K = 2: rows 0-3, then rows 4-7, each an SGD step on its own normaliser, both ratios against the log-probs of
    the policy before the first step (the second sees ρ ≠ 1), with the sampler correction's weights."""
    adjust, r, advantages = mini_batch_setup()
    cfg = tiny_cfg(max_new_tokens=9, steps_per_rollout=2, loss_type=loss_type, eps_low=0.01, eps_high=0.01)
    model = tiny_model(32)
    stats = grpo.policy_updates(cfg, model, None, th.optim.SGD(model.parameters(), lr=0.5), r, advantages,
                                r.completion_mask, None, adjust)  # fmt: skip
    assert len(stats) == 2 and stats[0]["ratio"] == pytest.approx(1.0) and stats[1]["ratio"] != pytest.approx(1.0)

    hand = tiny_model(32)
    sgd = th.optim.SGD(hand.parameters(), lr=0.5)
    mask = r.completion_mask.float()

    def logprobs(rows):
        return grpo.sequence_logprobs(hand, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                                      r.completion_mask[rows], adjust)  # fmt: skip

    with th.no_grad():
        old = logprobs(slice(None))
    for rows in (slice(0, 4), slice(4, 8)):
        m = mask[rows]
        logp = logprobs(rows)
        ratio = (logp - old[rows]).exp()
        A = advantages[rows][:, None]
        per_token = -th.min(ratio * A, ratio.clamp(0.99, 1.01) * A)
        per_token = per_token * (old[rows] - r.logp[rows]).exp().clamp(max=cfg.sampler_cap)  # TIS
        if loss_type == "token":
            loss = (per_token * m).sum() / m.sum()
        else:
            loss = ((per_token * m).sum(-1) / m.sum(-1)).sum() / 4
        sgd.zero_grad()
        loss.backward()
        sgd.step()
    for p, q in zip(model.parameters(), hand.parameters(), strict=True):
        assert (p - q).abs().max() < 1e-6


def test_steps_per_rollout_run_logs_the_mean_of_its_steps(tmp_path, tiny_model_dir):
    out = grpo.train(run_cfg(tiny_model_dir, tmp_path / "run", steps=2, steps_per_rollout=3), score_fn=letter_e)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(math.isfinite(m["loss"]) for m in lines)
    assert any(m["ratio"] != 1.0 for m in lines)  # the later mini-batches see π_θ ≠ π_old
