"""The rollout engine: a job's completion is the reference loop's whatever its slot, the slot count or the refill
order; rows stop independently; at most S sequences are in flight; a preemption request stops it promptly; the
sampler correction in the loss is exact and a no-op when sampler and trainer agree."""

import math

import pytest
import torch as th

import engine
import grpo
import rollout
from tests.conftest import tiny_model
from tests.test_grpo import plain_adjust
from tests.test_reasoning_training import gated_case

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3], [4, 4, 4, 4], [9, 8, 7, 6, 5, 4], [2], [7, 7]]


def seeds(n: int, seed: int = 0) -> list[int]:
    return [seed * 1000 + i for i in range(n)]


def run_engine(model, adjust, prompts=PROMPTS, seed=0, **kw):
    kw = {"max_new_tokens": 20, "eos_ids": [1], "pad_id": 0, **kw}
    return engine.generate(model, prompts, seeds(len(prompts), seed), adjust, **kw)


@pytest.mark.parametrize("slots", [1, 3, 0])
@pytest.mark.parametrize("refill, compact", [(True, True), (True, False), (False, True)])
def test_engine_samples_what_the_reference_loop_samples_in_any_slot(slots, refill, compact):
    model = tiny_model(64)
    adjust = plain_adjust(64, temperature=0.9, num_tokens=60)
    adjust.bias[1] += 3.0  # EOS is likely: rows end at different steps and slots are refilled
    ref = rollout.sample(model, PROMPTS, adjust, max_new_tokens=20, eos_ids=[1], pad_id=0, seeds=seeds(8))
    ids, mask, truncated, logp, entropy, _ = run_engine(model, adjust, slots=slots, refill=refill, compact=compact)
    assert len(set(ref.completion_mask.sum(-1).tolist())) > 2
    assert th.equal(ids, ref.completion_ids) and th.equal(mask, ref.completion_mask)
    assert th.equal(truncated, ref.truncated)
    assert (logp - ref.logp).abs().max() < 1e-5
    assert ((entropy - ref.entropy) * mask).abs().max() < 1e-4


def test_one_cache_serves_every_rollout_of_a_run():
    """A run's KV cache (engine.new_cache) is reused by rollouts of other prompts, lengths and slot counts: what an
    earlier rollout left in it is never read, and a rollout that needs more than it holds is refused."""
    model = tiny_model(64)
    adjust = plain_adjust(64, temperature=0.9, num_tokens=60)
    adjust.bias[1] += 3.0
    cache = engine.new_cache(model, 3, 6 + 20)
    fresh = run_engine(model, adjust, PROMPTS, seed=2, slots=3)
    run_engine(model, adjust, [p[::-1] * 1 for p in PROMPTS[:5]], seed=1, slots=2, cache=cache)  # leaves K/V behind
    again = run_engine(model, adjust, PROMPTS, seed=2, slots=3, cache=cache)
    assert all(th.equal(a, b) for a, b in zip(fresh[:4], again[:4], strict=True))
    with pytest.raises(ValueError, match="the KV cache holds 3 slots"):
        run_engine(model, adjust, PROMPTS, slots=4, cache=cache)
    with pytest.raises(ValueError, match="26 tokens"):
        run_engine(model, adjust, PROMPTS, slots=3, cache=cache, max_new_tokens=21)


def test_engine_logprobs_equal_training_logprobs_with_the_gate(tiny_tokenizer):
    for tie in (True, False):
        model, adjust, prompts = gated_case(tiny_tokenizer, tie)
        r = rollout.rollout(model, tiny_tokenizer, prompts, list(range(6)), adjust, max_new_tokens=20, slots=4,
                            eos_ids=[tiny_tokenizer.eos_token_id])  # fmt: skip
        inside = adjust.inside(r.completion_ids, r.start_inside)
        assert (inside & r.completion_mask.bool()).any() and (~inside & r.completion_mask.bool()).any()
        logp = grpo.sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                      adjust, r.start_inside, chunk=16)  # fmt: skip
        assert (logp - r.logp).abs().max() < 1e-5
        assert r.opened_think == [True] * 3 + [False] * 3 and len(r.texts) == 6


def test_engine_rows_stop_independently_and_truncate_at_max_new_tokens():
    model = tiny_model(16)
    adjust = plain_adjust(16, temperature=3.0)  # flat: EOS (id 1) comes early for some rows
    ids, mask, truncated, _, _, _ = run_engine(model, adjust, [[2, 3]] * 16, max_new_tokens=30, slots=5)
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) > 1 and truncated.any() and not truncated.all()
    for row, m, trunc in zip(ids, mask, truncated, strict=True):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert (row[n - 1] == 1) != bool(trunc) and (row[: n - 1] != 1).all() and (row[n:] == 0).all()
        assert n == 30 or not trunc


def test_engine_eos_inside_prompt_does_not_stop_a_row():
    model = tiny_model(16)
    adjust = plain_adjust(16)
    adjust.bias[1] = -math.inf  # the model can never emit EOS itself
    _, mask, truncated, _, _, _ = run_engine(model, adjust, [[1, 4, 1], [4, 5]], max_new_tokens=5, pad_id=1, slots=1)
    assert mask.sum(-1).tolist() == [5, 5] and truncated.all()


def test_engine_never_has_more_than_s_sequences_in_flight():
    model = tiny_model(64)
    adjust = plain_adjust(64)
    adjust.bias[1] += 3.0
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["rollout_step"].slots.tolist())

    hook = model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _, mask, _, _, _, _ = run_engine(model, adjust, PROMPTS * 3, slots=3)
    finally:
        hook.remove()
    assert len(seen) > 10 and all(len(set(s)) == len(s) and max(s) < 3 for s in seen)
    assert mask.shape[0] == 24 and mask.sum(-1).min() >= 1


def test_preemption_request_stops_the_engine_promptly():
    model = tiny_model(64)
    adjust = plain_adjust(64)
    adjust.bias[1] = -math.inf  # without the request every row would run 200 tokens
    polls = []

    def should_stop():
        polls.append(1)
        return True

    _, mask, _, _, _, _ = run_engine(model, adjust, max_new_tokens=200, slots=4, should_stop=should_stop)
    assert len(polls) == 1 and mask.sum(-1).max() <= 8  # stopped at the first check (every 8 steps)


def test_bf16_sampling_copy_follows_the_master_weights():
    model = tiny_model(64)
    adjust = plain_adjust(64)
    copy = rollout.sampling_copy(model)
    assert next(copy.parameters()).dtype == th.bfloat16 and next(model.parameters()).dtype == th.float32
    assert all(b.dtype == th.float32 for b in copy.buffers())  # RoPE's inv_freq keeps fp32: long contexts stay exact
    ids, mask, _, logp, _, _ = run_engine(copy, adjust, head=model.get_output_embeddings(), slots=3)
    train = grpo.sequence_logprobs(model, *rollout.left_pad(PROMPTS, 0), ids, mask, adjust)
    gap = ((train - logp) * mask).abs().max()
    assert 0 < gap < 0.1  # bf16 body, fp32 head: close to the trainer, not equal
    with th.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    rollout.copy_weights(copy, model)
    assert all(th.equal(a, b.to(th.bfloat16)) for a, b in zip(copy.parameters(), model.parameters(), strict=True))


@pytest.mark.parametrize("bad", [{"sampler_cap": 0.5}, {"rollout_kv_gib": -1.0}, {"rollout_batch_size": -2}])
def test_bad_rollout_options_are_refused_before_anything_loads(tmp_path, bad):
    cfg = grpo.Config(model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "out"), **bad)
    with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
        grpo.train(cfg)
    assert not (tmp_path / "out").exists()


def test_slots_for_a_kv_budget():
    model = tiny_model(64)  # 2 layers, 2 KV heads of 8: 2 · 2 · 2 · 8 · 4 bytes = 256 bytes per token in fp32
    assert engine.slots_for(model, 1.0, 1024, th.float32) == 2**30 // (256 * 1024)
    assert engine.slots_for(model, 1.0, 1024, th.bfloat16) == 2 * 2**30 // (256 * 1024)
    assert engine.slot_count(model, 0, 10_000, 1.0, 1024) == 4096 and engine.slot_count(model, 64, 100, 1.0, 1024) == 64
    assert engine.slot_count(model, 0, 100, 0.0, 1024) == 100  # no budget: one slot per job


# ---------------------------------------------------------------------------------------------------------------------
# The sampler correction in the loss


def _loss(correction, sampler_logp, cap=2.0):
    logp = th.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]], requires_grad=True)
    old = logp.detach()
    mask = th.tensor([[1, 1, 1], [1, 1, 0]])
    adv = th.tensor([1.0, -0.5])
    return grpo.policy_loss(logp, old, None, adv, mask, eps_low=0.2, eps_high=0.28, beta=0.0, loss_type="token",
                            sampler_logp=sampler_logp, correction=correction, cap=cap)  # fmt: skip


def test_tis_weights_each_token_by_its_capped_ratio():
    sampler = th.tensor([[-1.5, -2.0, -2.0], [-0.3, -0.2, -9.0]])
    loss, stats = _loss("tis", sampler)
    # ρ = 1 (old = current), so ℓ_t = −A; w_t = min(exp(old − sampler), 2) = [e^0.5, 1, 2], [1, e^-1, (masked)]
    w = [[math.exp(0.5), 1.0, 2.0], [1.0, math.exp(-1.0)]]
    expected = -(1.0 * sum(w[0]) - 0.5 * sum(w[1])) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    d = [[0.5, 0.0, 1.5], [0.0, -1.0]]  # log π_θ − log π_s on the tokens that count (not the masked 7)
    k3 = sum(math.exp(x) - x - 1 for row in d for x in row) / 5
    assert stats["sampler_kl"] == pytest.approx(k3, rel=1e-6) and stats["sampler_dlogp_max"] == pytest.approx(1.5)


def test_sequence_mask_drops_completions_whose_sampler_strayed():
    sampler = th.tensor([[-1.0, -2.0, -0.5], [-2.0, -2.5, 0.0]])  # row 0 agrees; row 1: mean δ = (1.7 + 1.3) / 2
    loss, _ = _loss("sequence_mask", sampler)
    assert loss.item() == pytest.approx(-(1.0 * 3) / 5, rel=1e-6)  # only row 0's tokens, over all 5 tokens
    loss, _ = _loss("sequence_mask", sampler, cap=math.exp(1.6))  # a wider band keeps row 1
    assert loss.item() == pytest.approx(-(1.0 * 3 - 0.5 * 2) / 5, rel=1e-6)


@pytest.mark.parametrize("correction", ["tis", "sequence_mask"])
def test_sampler_correction_is_a_no_op_when_sampler_and_trainer_agree(correction):
    logp_value = th.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
    plain, _ = _loss("none", None)
    corrected, stats = _loss(correction, logp_value)
    assert corrected.item() == plain.item() and stats["sampler_kl"] == 0.0
