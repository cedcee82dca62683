"""The reasoning vocabulary inside the trainer: the gate holds in sampling, training log-probs use the same policy,
and a GRPO run with every regular token copied starts with half of its think tokens from the copies."""

import json
import math

import torch as th

import checkpoints
import grpo
import policy
import rollout
import vocab as rvocab
from tests.conftest import tiny_model, weights_of
from tests.test_grpo import run_cfg


def expanded(tiny_tokenizer, size=rvocab.ALL_REGULAR, tie=True):
    model = tiny_model(len(tiny_tokenizer) + 4, seed=2, tie=tie)
    vocab = rvocab.add_reasoning_vocab(model, tiny_tokenizer, size)
    bias = policy.padding_bias(vocab.total_size, len(tiny_tokenizer), vocab.standard_size)
    return model, vocab, policy.LogitAdjust(1.0, bias, vocab)


def chat_prompts(tok, thinking: bool, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {i + 1}?"}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=thinking,
        )
        out.append(tok(text, add_special_tokens=False).input_ids)
    return out


def test_no_reasoning_id_outside_think_even_when_pushed(tiny_tokenizer):
    model, vocab, adjust = expanded(tiny_tokenizer)
    adjust.bias[vocab.standard_size :] += 6.0  # push the policy hard towards reasoning ids …
    adjust.bias[vocab.end_think_id] += 3.0  # … make it leave think blocks often …
    adjust.bias[tiny_tokenizer.eos_token_id] = -math.inf  # … and keep every row going for the whole budget
    prompts = chat_prompts(tiny_tokenizer, True, 8) + chat_prompts(tiny_tokenizer, False, 16)
    r = rollout.sample(model, prompts, adjust, max_new_tokens=80, eos_ids=[tiny_tokenizer.eos_token_id],
                    pad_id=tiny_tokenizer.pad_token_id, generator=th.Generator().manual_seed(0))  # fmt: skip
    inside = adjust.inside(r.completion_ids, r.start_inside)
    valid = r.completion_mask.bool()
    reasoning = r.completion_ids >= vocab.standard_size
    outside_tokens = int((valid & ~inside).sum())
    inside_tokens = int((valid & inside).sum())
    assert r.start_inside[:8].all() and not r.start_inside[8:].any()
    assert outside_tokens >= 1000 and inside_tokens >= 200, (outside_tokens, inside_tokens)
    assert int((reasoning & valid & ~inside).sum()) == 0
    assert float((reasoning & valid & inside).sum()) / inside_tokens > 0.9
    assert vocab.stats(r.completion_ids, r.completion_mask, inside)["reasoning_outside"] == 0


def gated_case(tiny_tokenizer, tie: bool):
    """A partly copied vocabulary whose policy crosses the gate inside sequences, and prompts opening think or not."""
    model, vocab, adjust = expanded(tiny_tokenizer, size=120, tie=tie)
    adjust.temperature = 0.8
    adjust.bias[vocab.end_think_id] += 3.0  # cross the gate inside the sequences
    return model, adjust, chat_prompts(tiny_tokenizer, True, 3) + chat_prompts(tiny_tokenizer, False, 3)


def test_training_logprobs_equal_sampler_logprobs_with_the_gate(tiny_tokenizer):
    for tie in (True, False):
        model, adjust, prompts = gated_case(tiny_tokenizer, tie)
        r = rollout.sample(model, prompts, adjust, max_new_tokens=20, eos_ids=[tiny_tokenizer.eos_token_id],
                        pad_id=tiny_tokenizer.pad_token_id, generator=th.Generator().manual_seed(1))  # fmt: skip
        inside = adjust.inside(r.completion_ids, r.start_inside)
        assert (inside & r.completion_mask.bool()).any() and (~inside & r.completion_mask.bool()).any()
        logp = grpo.sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                      adjust, r.start_inside, chunk=16)  # fmt: skip
        assert (logp - r.logp).abs().max() < 1e-5
        # Without the gate the same ids score differently: the training side really applies it.
        ungated = policy.LogitAdjust(adjust.temperature, adjust.bias)
        other = grpo.sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, ungated)
        assert (other - r.logp).abs().max() > 1e-3


def test_grpo_run_with_every_regular_token_copied(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = run_cfg(tiny_model_dir, tmp_path / "rv", reasoning_vocab_size=-1, steps=2, prompts_per_step=4, group_size=4,
                  max_new_tokens=24, sample_every=1, save_every=1)  # fmt: skip
    out = grpo.train(cfg, score_fn=lambda c, a: ([float("e" in x) for x in c],) * 2)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    assert 0.35 < first["reasoning_frac"] < 0.65, first  # copies and sources equally likely at step 0
    assert all(m["reasoning_outside"] == 0 for m in lines)
    assert first["think_len"] > 0 and "embed_drift" in first
    assert lines[-1]["embed_drift"] > 0  # the copies moved
    ckpt = checkpoints.checkpoint_dirs(out)[-1]
    vocab = rvocab.load(ckpt)
    assert vocab.standard_size == len(tiny_tokenizer) + 4
    assert vocab.size == len(rvocab.regular_token_ids(tiny_tokenizer))
    assert (ckpt / rvocab.MAP_FILE).exists() and (checkpoints.checkpoint_dirs(out)[0] / rvocab.MAP_FILE).exists()


def test_resume_with_reasoning_vocab_gives_identical_weights(tmp_path, tiny_model_dir):
    def reward(c, a):
        hits = [float("e" in x) for x in c]
        return hits, hits

    kw = dict(reasoning_vocab_size=50)
    straight = grpo.train(run_cfg(tiny_model_dir, tmp_path / "a", steps=4, **kw), score_fn=reward)
    grpo.train(run_cfg(tiny_model_dir, tmp_path / "b", steps=2, **kw), score_fn=reward)
    resumed = grpo.train(run_cfg(tiny_model_dir, tmp_path / "b", steps=4, **kw), score_fn=reward)
    w_a, w_b = (
        weights_of(checkpoints.checkpoint_dirs(straight)[-1]),
        weights_of(checkpoints.checkpoint_dirs(resumed)[-1]),
    )
    assert all(th.equal(w_a[k], w_b[k]) for k in w_a)
    assert rvocab.load(checkpoints.checkpoint_dirs(resumed)[-1]).size == 50
    assert not math.isnan(json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])["reasoning_frac"])


def test_entropy_over_text_equals_the_base_models_at_step_0():
    th.manual_seed(0)
    n_s, src = 50, th.tensor([3, 3, 7, 10, 11, 12, 30])  # token 3 copied twice
    vocab = rvocab.ReasoningVocab(n_s, src, think_id=0, end_think_id=1)
    base = th.randn(4, n_s) * 3  # (B, n_s) the base model's logits
    expanded = vocab.adjust_logits(th.cat([base, base[:, src]], -1), th.ones(4, dtype=th.bool))
    text_entropy = policy.entropy_of(expanded, vocab)
    assert th.allclose(text_entropy, policy.entropy_of(base), atol=1e-5)
    assert (policy.entropy_of(expanded) > text_entropy + 1e-3).all()  # per id, the copies' split would inflate it
