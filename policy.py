"""The policy π: the model's next-token distribution after `LogitAdjust`, one rule for sampling and for training.

    z = lm_head(h) / T + b_pad + gate(inside)        π(·|q, o_<t) = softmax(z)

h is the decoder's last hidden state (the output layer always runs in fp32), T the temperature, b_pad −∞ on embedding
rows the tokenizer cannot produce (Qwen pads 151,669 → 151,936), and gate the reasoning vocabulary's think gate and
offset (vocab.py). The sampler and every training log-prob (policy, old, reference) call the same `LogitAdjust`.

The sampler may draw from a truncation q of π (top-k, top-p, min-p: `LogitAdjust.truncate`); the loss scores the
full π. q's support moves with θ (a token entering or leaving the kept set jumps between a finite log-prob and −∞),
so ratios against it, and the KL to a reference, would be undefined where the supports differ; TRL and verl score the
full tempered distribution too, so runs compare. The rollout records log q (the distribution actually sampled from),
so the sampler correction (grpo.policy_loss) weighs each sampled token by π_old/q: from truncation alone that weight
is the kept set's mass under π (≤ 1), which importance-weights q's samples toward π over q's support; with
--sampler-correction none the gradient treats q's samples as π's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch as th
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import vocab as rvocab
from noise import row_uniforms


@dataclass
class LogitAdjust:
    """Raw lm_head logits → the policy's logits: z / T, then −∞ on rows never to be sampled (Qwen pads its embedding
    beyond the tokenizer), then the reasoning-vocabulary gate. Temperature comes before the gate's offset so that
    step-0 invariance holds at every temperature. `vocab` None: no reasoning vocabulary. top_k, top_p and min_p
    truncate what the sampler draws from (`truncate`), never the training log-probs (module docstring)."""

    temperature: float
    bias: th.Tensor  # (V,) 0, or −∞ on padding rows
    vocab: rvocab.ReasoningVocab | None = None
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off

    def __call__(self, logits: th.Tensor, inside: th.Tensor | None) -> th.Tensor:
        z = logits.float() / self.temperature + self.bias.to(logits.device)
        if self.vocab is not None:
            z = self.vocab.adjust_logits(z, inside)
        return z

    def truncate(self, z: th.Tensor) -> th.Tensor:
        """The sampler's logits: z (B, V) with −∞ outside the kept set K, the rest unchanged, so that
        q = softmax(truncate(z)) = π / π(K) on K. In transformers' order, each on what the previous one kept:

            top-k   the k most likely tokens (ties with the k-th kept too)
            top-p   the smallest prefix, by descending probability, whose mass reaches p
            min-p   the tokens whose probability is ≥ min_p · the largest probability

        With a reasoning vocabulary the set is chosen over text, a token's copies merged into it (vocab.text_probs),
        and a kept token keeps its copies: at step 0 a token and its copies share its mass, so choosing over ids
        would keep half as many text tokens as the baseline (top-k 20: 10) and break step-0 invariance."""
        if self.top_k <= 0 and self.top_p >= 1.0 and self.min_p <= 0.0:
            return z
        text = z if self.vocab is None else self.vocab.text_probs(z.softmax(-1)).log()  # (B, n_s): copies merged
        keep = kept_set(text, self.top_k, self.top_p, self.min_p)
        if self.vocab is not None:
            keep = th.cat([keep, keep[:, self.vocab.source_ids.to(keep.device)]], -1)  # copies follow their sources
        return z.masked_fill(~keep, -math.inf)

    def inside(self, completion_ids: th.Tensor, start_inside: th.Tensor | None) -> th.Tensor | None:
        """(B, T) think state *before* each completion token — the state its logits were adjusted with."""
        if self.vocab is None:
            return None
        after = self.vocab.think_state(completion_ids, start_inside)
        return th.cat([start_inside[:, None], after[:, :-1]], dim=1)


def kept_set(z: th.Tensor, top_k: int, top_p: float, min_p: float) -> th.Tensor:
    """(B, V) bool: the tokens `LogitAdjust.truncate` keeps for logits (or log-probabilities) z (B, V)."""
    keep = th.ones_like(z, dtype=th.bool)
    if 0 < top_k < z.shape[-1]:
        keep &= z >= z.topk(top_k, -1).values[:, -1:]
    if top_p < 1.0:  # over what top-k kept, renormalised
        sorted_z, order = z.masked_fill(~keep, -math.inf).sort(-1, descending=True)
        p = sorted_z.softmax(-1)
        keep &= ~th.zeros_like(keep).scatter(-1, order, p.cumsum(-1) - p >= top_p)
    if min_p > 0.0:  # p_i ≥ min_p · p_max  ⇔  z_i ≥ z_max + log(min_p): no softmax needed
        keep &= z >= z.max(-1, keepdim=True).values + math.log(min_p)
    return keep


# The reasoning-vocabulary diagnostics' token classes (see token_classes), in index order.
CLASSES = ("think_standard", "think_reasoning", "outside")


def token_classes(completion_ids: th.Tensor, start_inside: th.Tensor | None, adjust: LogitAdjust) -> th.Tensor | None:
    """(B, T) class of each completion token, an index into CLASSES: inside think a standard id (0) or a reasoning id
    (1), or outside think (2), by the think state its logits were adjusted with; None without a reasoning
    vocabulary."""
    inside = adjust.inside(completion_ids, start_inside)
    if inside is None:
        return None
    reasoning = (completion_ids >= adjust.vocab.standard_size).long()
    return th.where(inside, reasoning, th.full_like(reasoning, 2))


def padding_bias(num_rows: int, num_tokens: int, standard_size: int) -> th.Tensor:
    """(num_rows,) bias: −∞ on embedding rows in [num_tokens, standard_size) that the tokenizer cannot produce."""
    bias = th.zeros(num_rows)
    bias[num_tokens:standard_size] = -math.inf
    return bias


def model_adjust(model, tokenizer, vocab: rvocab.ReasoningVocab | None, temperature: float, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0) -> LogitAdjust:  # fmt: skip
    """The policy's LogitAdjust for a (possibly expanded) model: its rows beyond the tokenizer masked, its gate, the
    sampler's truncation."""
    rows = model.get_input_embeddings().weight.shape[0]
    standard_size = vocab.standard_size if vocab is not None else rows
    bias = padding_bias(rows, len(tokenizer), standard_size).to(model.get_input_embeddings().weight.device)
    return LogitAdjust(temperature, bias, vocab, top_k, top_p, min_p)


def lm_head_fp32(head: th.nn.Linear, hidden: th.Tensor) -> th.Tensor:
    """The output layer (`model.get_output_embeddings()`) in fp32 even under bf16 autocast or on bf16 hidden states:
    bf16 log-probs are noisy and batch-shape dependent."""
    with th.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())


def token_logprobs(model, adjust: LogitAdjust, hidden: th.Tensor, targets: th.Tensor, inside: th.Tensor | None,
                   chunk: int = 256) -> th.Tensor:  # fmt: skip
    """log π(target | h) for hidden states (N, H) and their next tokens (N,) → (N,) fp32, `inside` (N,) the think
    state of each. Only these positions go through the output layer, in chunks recomputed in backward: peak memory
    grows with the chunk, never with N × V."""
    head = model.get_output_embeddings()

    def chunk_logp(h, t, flags):
        z = adjust(lm_head_fp32(head, h), flags)  # (n, V) fp32
        return z.gather(-1, t[:, None]).squeeze(-1) - z.logsumexp(-1)

    parts = []
    for s in range(0, hidden.shape[0], chunk):
        args = (hidden[s : s + chunk], targets[s : s + chunk], inside[s : s + chunk] if inside is not None else None)
        parts.append(checkpoint(chunk_logp, *args, use_reentrant=False) if hidden.requires_grad else chunk_logp(*args))
    return th.cat(parts) if parts else hidden.new_zeros(0, dtype=th.float32)


def entropy_of(z: th.Tensor, vocab: rvocab.ReasoningVocab | None = None) -> th.Tensor:
    """H(softmax(z)) over the last dim, safe with −∞ entries.

    With a reasoning vocabulary, the entropy over *text*: copies merged into their sources. Per id, splitting a
    token's mass between it and its copy would add up to log 2 without changing the text, so only this figure is
    comparable between a baseline run and a reasoning run (at step 0 they are equal)."""
    if vocab is not None:
        p = vocab.text_probs(z.softmax(-1))  # (B, n_s)
        return -(p * p.clamp_min(th.finfo(p.dtype).tiny).log()).sum(-1)  # 0 · log 0 = 0
    lse = z.logsumexp(-1, keepdim=True)
    p = (z - lse).exp()
    return (lse.squeeze(-1) - (p * z.masked_fill(z.isinf(), 0.0)).sum(-1)).float()


# One generator for the batch, or per-row streams: (seeds (B,), token indices (B,)) int64 on the logits' device.
Noise = th.Generator | tuple[th.Tensor, th.Tensor] | None


def sample_tokens(z: th.Tensor, noise: Noise, greedy: bool = False) -> tuple[th.Tensor, th.Tensor]:
    """Exact sampling from softmax(z) (B, V) → (tokens (B,), their log-probs (B,) under softmax(z)); `greedy` takes
    the argmax instead (evaluation). The sampler passes its truncated logits (`LogitAdjust.truncate`).

    Exponential race (Gumbel-max): argmax_i z_i − log E_i with E_i ~ Exp(1) i.i.d. picks i with probability
    softmax(z)_i, because −log E_i is standard Gumbel noise. One elementwise pass and one argmax over V instead of a
    multinomial's cumulative sum and search over 152k entries; −∞ rows can never win. With per-row streams
    (noise.row_uniforms) a row's samples do not depend on which other rows share its batch (or rank)."""
    if greedy:
        tokens = z.argmax(-1)
        return tokens, z.gather(-1, tokens[:, None]).squeeze(-1) - z.logsumexp(-1)
    # U[0, 1), then E = −log U ~ Exp(1); U = 0 gives E = ∞, a token that cannot win
    u = row_uniforms(*noise, z.shape[-1]) if isinstance(noise, tuple) else th.empty_like(z).uniform_(generator=noise)
    race = u.log_().neg_()  # uniform + log: ~3× faster than exponential_ on CPU, the same on GPU
    tokens = (z - race.log_()).argmax(-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - z.logsumexp(-1)
    return tokens, logp
