"""The sampler's truncation (top-k, top-p, min-p) is part of the policy object: sampling draws from the truncated q
and records log q, the loss scores the full π, and their gap is exactly the kept set's mass (what the sampler
correction weighs by). Distributions hand-computed."""

import math

import pytest
import torch as th

import engine
import grpo
import policy
import rollout
import vocab as rvocab
from policy import LogitAdjust
from tests.conftest import tiny_model

P = th.tensor([0.4, 0.3, 0.2, 0.1])


def truncated(p: th.Tensor = P, **knobs) -> th.Tensor:
    return LogitAdjust(1.0, th.zeros(len(p)), **knobs).truncate(p.log()[None]).softmax(-1)[0]


@pytest.mark.parametrize(
    "knobs, kept",
    [
        ({}, [0.4, 0.3, 0.2, 0.1]),
        ({"top_k": 2}, [0.4, 0.3, 0, 0]),
        ({"top_k": 4}, [0.4, 0.3, 0.2, 0.1]),
        ({"top_p": 0.4}, [0.4, 0, 0, 0]),  # the first token's mass reaches 0.4
        ({"top_p": 0.6}, [0.4, 0.3, 0, 0]),
        ({"top_p": 0.75}, [0.4, 0.3, 0.2, 0]),
        ({"min_p": 0.5}, [0.4, 0.3, 0.2, 0]),  # p ≥ 0.5 · 0.4
        ({"min_p": 0.8}, [0.4, 0, 0, 0]),
        ({"top_k": 3, "top_p": 0.5}, [0.4, 0.3, 0, 0]),  # top-p over top-k's renormalised [4/9, 3/9, 2/9]
        ({"top_k": 3, "top_p": 0.8}, [0.4, 0.3, 0.2, 0]),  # 4/9 + 3/9 = 0.78 < 0.8: the third is needed
        ({"top_p": 0.75, "min_p": 0.6}, [0.4, 0.3, 0, 0]),
    ],
)
def test_truncation_keeps_the_hand_computed_set_renormalised(knobs, kept):
    kept = th.tensor(kept)
    assert th.allclose(truncated(**knobs), kept / kept.sum(), atol=1e-6)


KNOBS = [{"top_k": 2}, {"top_k": 3}, {"top_p": 0.6}, {"top_p": 0.75}, {"min_p": 0.5}, {"top_k": 3, "top_p": 0.5}]


@pytest.mark.parametrize("knobs", KNOBS)
def test_truncation_is_over_text_with_a_reasoning_vocabulary(knobs):
    """Tokens 0 and 1 have copies (ids 4, 5) that share their mass at step 0: the kept set is chosen over text and a
    kept token keeps its copy, so q over text is the baseline's (top-k 2 over ids would keep only token 0 and its
    copy)."""
    vocab = rvocab.ReasoningVocab(standard_size=4, source_ids=th.tensor([0, 1]), think_id=2, end_think_id=3)
    z = th.tensor([[0.2, 0.15, 0.2, 0.1, 0.2, 0.15]]).log()  # text [0.4, 0.3, 0.2, 0.1]
    q = LogitAdjust(1.0, th.zeros(6), vocab, **knobs).truncate(z).softmax(-1)
    assert th.allclose(vocab.text_probs(q)[0], truncated(**knobs), atol=1e-6)
    assert th.allclose(q[0, 4:], q[0, :2])  # each copy kept with its source, at its share


def test_truncation_leaves_masked_rows_masked():
    z = th.tensor([[0.0, -math.inf, 1.0, 2.0]])
    out = LogitAdjust(1.0, th.zeros(4), top_k=2, top_p=0.99, min_p=0.01).truncate(z)
    assert out[0, 1] == -math.inf and out[0, 0] == -math.inf and th.equal(out[0, 2:], z[0, 2:])


def test_sampler_draws_from_the_truncated_distribution():
    adjust = LogitAdjust(1.0, th.zeros(4), top_k=3, top_p=0.5)
    z = adjust.truncate(P.log().repeat(20_000, 1))
    tokens, logp = policy.sample_tokens(z, th.Generator().manual_seed(1))
    freq = th.bincount(tokens, minlength=4).float() / len(tokens)
    assert th.allclose(freq, th.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.01)
    assert th.allclose(logp, th.tensor([4 / 7, 3 / 7])[tokens].log(), atol=1e-6)  # log q, not log π


@pytest.mark.parametrize("knobs", [{"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.9}])  # the tiny model is near uniform
def test_rollouts_record_log_q_and_the_loss_scores_pi(knobs):
    """The engine and the reference loop sample only kept tokens and record log q; the training log-prob is log π,
    and log π − log q = log π(K), the kept set's mass: the TIS weight of the sampler correction."""
    V = 32
    model = tiny_model(V)
    adjust = LogitAdjust(1.3, th.zeros(V), **knobs)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3]]
    seeds = [11, 12, 13, 14]
    ref = rollout.sample(model, prompts, adjust, max_new_tokens=10, eos_ids=[1], pad_id=0, seeds=seeds)
    ids, mask, _, logp = engine.generate(model, prompts, seeds, adjust, max_new_tokens=10, eos_ids=[1], pad_id=0,
                                         slots=2)[:4]  # fmt: skip
    keep = mask.bool()
    assert th.equal(ids[keep], ref.completion_ids[keep]) and th.allclose(logp[keep], ref.logp[keep], atol=1e-6)
    train = grpo.sequence_logprobs(model, ref.prompt_ids, ref.prompt_mask, ref.completion_ids, ref.completion_mask,
                                   adjust)  # fmt: skip
    # π(K) at every position, from the full logits the training pass sees (left-padded prompts masked, as sampled)
    ids = th.cat([ref.prompt_ids, ref.completion_ids], 1)
    attend = th.cat([ref.prompt_mask, th.ones_like(ref.completion_mask)], 1)
    logits = model(input_ids=ids, attention_mask=attend, position_ids=rollout.positions(attend)).logits
    full = adjust(logits[:, ref.prompt_ids.shape[1] - 1 : -1], None)
    flat = full[keep]  # (N, V)
    cut = adjust.truncate(flat)
    assert th.isfinite(cut.gather(-1, ref.completion_ids[keep][:, None])).all()  # every sampled token was kept
    mass = (flat.softmax(-1) * cut.isfinite()).sum(-1)
    assert (mass < 1 - 1e-4).any()  # the truncation did cut
    assert th.allclose(train[keep] - ref.logp[keep], mass.log(), atol=1e-5)
    w = grpo.sampler_weight(train, ref.logp, ref.completion_mask.float(), "tis", 2.0)
    assert th.allclose(w[keep], mass, atol=1e-5)
