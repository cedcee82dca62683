"""The padding-free update: sequences packed first-fit decreasing into rows of at most the token budget, each one
attending only to itself, give the padded update's log-probs, loss and gradients — with a reasoning vocabulary, μ > 1,
GSPO, TIS and a KL term — and ranks with fewer micro-batches run empty ones that change nothing."""

from dataclasses import replace

import pytest
import torch as th

import checkpoints
import grpo
import packing
import rollout
from tests.conftest import tiny_model
from tests.test_grpo import _rollout, plain_adjust, tiny_cfg
from tests.test_reasoning_training import gated_case


def test_first_fit_decreasing_packs_longest_first_within_the_budget():
    assert packing.pack([5, 3, 7, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    assert packing.pack([10, 3], 8) == [[0], [1]]  # a sequence over the budget gets a row of its own
    assert packing.pack([], 8) == []
    bins = packing.pack([4] * 6 + [1] * 3, 9)  # 27 tokens: exactly three full rows
    assert sorted(i for b in bins for i in b) == list(range(9)) and len(bins) == 3


def test_packed_sequences_do_not_see_each_other():
    model, adjust = tiny_model(32), plain_adjust(32, temperature=1.5)
    r = _rollout(model, adjust)
    alone, _ = packing.packed_logprobs(model, r, [3], adjust)
    together, _ = packing.packed_logprobs(model, r, [0, 3, 5], adjust)
    T = alone.shape[1]
    assert (together[1, :T] - alone[0]).abs().max() < 1e-6
    r.completion_ids[0] = (r.completion_ids[0] + 1) % 32  # another sequence before it in the row
    changed, _ = packing.packed_logprobs(model, r, [0, 3, 5], adjust)
    assert th.equal(changed[1], together[1]) and not th.equal(changed[0], together[0])


def test_packed_logprobs_equal_padded_logprobs_with_the_gate(tiny_tokenizer):
    for tie in (True, False):
        model, adjust, prompts = gated_case(tiny_tokenizer, tie)
        r = rollout.sample(model, prompts, adjust, max_new_tokens=20, eos_ids=[tiny_tokenizer.eos_token_id],
                           pad_id=tiny_tokenizer.pad_token_id, generator=th.Generator().manual_seed(1))  # fmt: skip
        assert len(set(r.prompt_mask.sum(-1).tolist())) > 1  # prompts of different lengths: left padding to drop
        packed = th.zeros_like(r.logp)
        for rows in packing.pack([10] * 6, 25):  # a few rows of 2
            logp, T = packing.packed_logprobs(model, r, rows, adjust, chunk=7)
            packed[rows, :T] = logp
        assert (packed - r.logp).abs().max() < 1e-5


def update_weights(model, r, adjust, adv, cfg, old_logp=None, ref_logp=None, loss_mask=None):
    opt = th.optim.SGD(model.parameters(), lr=0.1)
    stats = grpo.update(model, opt, r, adv, adjust, loss_mask=r.completion_mask if loss_mask is None else loss_mask,
                        old_logp=old_logp, ref_logp=ref_logp, **grpo.update_options(cfg))  # fmt: skip
    return th.cat([p.detach().flatten() for p in model.parameters()]), stats


CASES = {
    "token": {},
    "sequence": {"loss_type": "sequence"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "gspo": {"ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    "tis": {"sampler_correction": "tis", "sampler_cap": 1.05},
    "kl": {"beta": 0.1},
    "mu2": {"num_iterations": 2},
    "checkpointing": {},  # decoder layers recomputed in backward: with the packed attention, not across sequences
}


@pytest.mark.parametrize("reasoning", [False, True], ids=["baseline", "reasoning-vocab"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_update_equals_padded_update(case, reasoning, tiny_tokenizer):
    if reasoning:
        make = lambda: gated_case(tiny_tokenizer, tie=False)[:2]  # noqa: E731
        model, adjust = make()
        _, _, prompts = gated_case(tiny_tokenizer, tie=False)
        adjust.bias[tiny_tokenizer.eos_token_id] += 4.0  # completions of different lengths
        r = rollout.sample(model, prompts + prompts[:2], adjust, max_new_tokens=12, eos_ids=[tiny_tokenizer.eos_token_id],
                           pad_id=tiny_tokenizer.pad_token_id, generator=th.Generator().manual_seed(2))  # fmt: skip
    else:
        make = lambda: (tiny_model(32), plain_adjust(32, temperature=1.5))  # noqa: E731
        model, adjust = make()
        r = _rollout(model, adjust)
    B = r.completion_ids.shape[0]
    assert len(set(r.completion_mask.sum(-1).tolist())) > 1
    adv = th.linspace(-1, 1, B)
    r.logp = r.logp + 0.05 * th.randn(r.logp.shape, generator=th.Generator().manual_seed(0)) * r.completion_mask
    loss_mask = r.completion_mask.clone()
    loss_mask[1] = 0  # a row without a loss token (a dropped truncation): packed leaves it out
    options = {"max_new_tokens": r.completion_ids.shape[1], **CASES[case]}
    ref_logp = None
    if options.get("beta"):  # a reference: the policy before a perturbation
        ref_logp = grpo.batched_logprobs(make()[0], r, adjust, grpo.micro_batches(r, loss_mask, 4, 0), 16)
    weights, losses = [], []
    for tokens in (0, 40):  # padded (micro-batches of 3), then packed rows of ≤ 40 tokens
        cfg = tiny_cfg(micro_batch_size=3, micro_batch_tokens=tokens, **options)
        model = make()[0]
        if case == "checkpointing":
            checkpoints.decoder_checkpointing(model.train(), True)
        if ref_logp is not None:
            with th.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * th.randn(p.shape, generator=th.Generator().manual_seed(3)))
        batches = grpo.micro_batches(r, loss_mask, cfg.micro_batch_size, cfg.micro_batch_tokens)
        if tokens:
            assert len(batches) > 1 and all(isinstance(b, list) for b in batches) and 1 not in sum(batches, [])
        old = grpo.batched_logprobs(model, r, adjust, batches, 16) if cfg.num_iterations > 1 else None
        for _ in range(cfg.num_iterations):
            w, stats = update_weights(model, r, adjust, adv, cfg, old, ref_logp, loss_mask)
        weights.append(w)
        losses.append(stats["loss"])
    assert abs(losses[0] - losses[1]) < 1e-5
    assert (weights[0] - weights[1]).abs().max() < 1e-5
    start = th.cat([p.detach().flatten() for p in make()[0].parameters()])
    assert (weights[1] - start).abs().max() > 1e-4  # the step did something


def test_empty_micro_batches_pad_a_rank_without_changing_the_update(monkeypatch):
    """A rank with fewer packed micro-batches than another runs empty ones (a one-token pass of zero weight), so every
    rank runs as many forward/backward passes; the update is the same."""
    adjust = plain_adjust(32, temperature=1.5)
    r = _rollout(tiny_model(32), adjust)
    adv = th.linspace(-1, 1, 8)
    cfg = tiny_cfg(micro_batch_tokens=40)
    alone, _ = update_weights(tiny_model(32), r, adjust, adv, cfg)
    count = len(grpo.micro_batches(r, r.completion_mask, 8, 40))
    passes = []
    monkeypatch.setattr(grpo, "all_reduce_max", lambda t: t + 2)  # another rank has two more micro-batches
    monkeypatch.setattr(packing, "packed_logprobs", lambda *a, f=packing.packed_logprobs: passes.append(1) or f(*a))
    padded, _ = update_weights(tiny_model(32), r, adjust, adv, cfg)
    assert len(passes) == count + 2
    assert (alone - padded).abs().max() < 1e-7


@pytest.mark.parametrize("checkpointing", [False, True])
def test_padding_passes_work_with_checkpointing_and_the_gate(tiny_tokenizer, monkeypatch, checkpointing):
    """The empty micro-batch's one-token pass runs with the packed attention in forward and in a checkpointed
    recomputation, and with the reasoning vocabulary's gate, and changes nothing."""
    model, adjust, prompts = gated_case(tiny_tokenizer, tie=True)
    r = rollout.sample(model, prompts, adjust, max_new_tokens=8, eos_ids=[tiny_tokenizer.eos_token_id],
                       pad_id=tiny_tokenizer.pad_token_id, generator=th.Generator().manual_seed(1))  # fmt: skip
    adv = th.linspace(-1, 1, len(prompts))
    cfg = tiny_cfg(micro_batch_tokens=40, max_new_tokens=8)
    weights = []
    for extra in (0, 2):
        m = gated_case(tiny_tokenizer, tie=True)[0]
        checkpoints.decoder_checkpointing(m.train(), checkpointing)
        monkeypatch.setattr(grpo, "all_reduce_max", lambda t, extra=extra: t + extra)
        weights.append(update_weights(m, r, adjust, adv, cfg)[0])
    assert (weights[0] - weights[1]).abs().max() < 1e-7


def test_auto_budget_must_be_planned_first():
    r = _rollout(tiny_model(32), plain_adjust(32))
    with pytest.raises(ValueError, match="resolved by `planned`"):
        grpo.micro_batches(r, r.completion_mask, 8, replace(tiny_cfg(), micro_batch_tokens="auto").micro_batch_tokens)
