"""Padding-free updates: a micro-batch is one row of whole (prompt + completion) sequences laid end to end, at most
a token budget long, instead of a (B, P + T) block padded to its longest prompt and completion.

    batches = pack(lengths, budget)                           # first-fit decreasing: sequence indices per row
    logp, T = packed_logprobs(model, r, rows, adjust, chunk)  # (len(rows), T), as the padded path returns them

Each sequence keeps its own positions (0, 1, … restarting per sequence) and attends only to itself: the decoder body
runs with our registered attention (`packed_attention`, one causal SDPA per sequence: on GPU in bf16 that is
FlashAttention's kernel; no (N, N) mask anywhere), so packing changes no log-prob beyond float rounding. A completion token is scored from
the hidden state just before it in its own sequence, so no label ever crosses into the next sequence; every loss
normaliser is counted on the original sequences by the caller (grpo.update), so the loss and gradient equal the
padded update's.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch as th
import torch.nn.functional as F
from transformers import AttentionInterface

from engine import using_attention
from policy import LogitAdjust, token_logprobs

ATTENTION = "packed_sdpa"


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` grouped into bins of at most `budget` tokens, longest first
    (a sequence longer than the budget gets a bin of its own). Fewer, fuller bins than filling in order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, left in enumerate(room) if lengths[i] <= left), None)
        if fit is None:
            bins.append([i])
            room.append(budget - lengths[i])
        else:
            bins[fit].append(i)
            room[fit] -= lengths[i]
    return bins


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_lengths=None,
                     **kwargs):  # fmt: skip
    """Causal attention within each packed sequence: query (1, H, N, D), key/value (1, KV_H, N, D) after RoPE →
    (1, N, H, D), with `packed_lengths` the sequences' lengths (summing to N)."""
    if packed_lengths is None:
        raise RuntimeError("packed_attention needs packed_lengths (packing.packed_logprobs passes them)")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("the packed update attends over whole sequences: no sliding window, no softcap")
    outs, start = [], 0
    for n in packed_lengths:
        q, k, v = (x[:, :, start : start + n] for x in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                   enable_gqa=True))  # fmt: skip
        start += n
    return th.cat(outs, 2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)


def attention_for(model, rows):
    """The attention a micro-batch's forward ran with (packed `rows` are a list), for its backward too: decoder
    layers under activation checkpointing recompute their forward there, and must not attend across sequences."""
    return using_attention(model, ATTENTION) if isinstance(rows, list) else nullcontext()


def packed_logprobs(model, r, rows: list[int], adjust: LogitAdjust, chunk: int = 256) -> tuple[th.Tensor, int]:
    """log π(o_t | q, o_<t) of the completions of rollout `r`'s `rows`, from one forward of their packed row:
    (len(rows), T) fp32, zero beyond each completion, with T the longest completion among them. No rows: one token
    through the body and the output layer, so that every rank runs as many passes (its log-probs count nowhere)."""
    device = r.completion_ids.device
    if not rows:  # a padding pass: the first row's last prompt token, a sequence of one, through body and head
        with using_attention(model, ATTENTION):
            hidden = model.base_model(input_ids=r.prompt_ids[:1, -1:], position_ids=th.zeros_like(r.prompt_ids[:1, -1:]),
                                      use_cache=False, packed_lengths=[1]).last_hidden_state[0]  # fmt: skip
        flags = r.start_inside[:1] if adjust.vocab is not None else None
        return token_logprobs(model, adjust, hidden, r.completion_ids[0, :1], flags, chunk)[None] * 0.0, 1
    index = th.tensor(rows, device=device)
    completion_mask = r.completion_mask[index]
    plen, n = th.stack([r.prompt_mask[index].sum(-1), completion_mask.sum(-1)]).tolist()  # one host sync
    T, P = max(max(n), 1), r.prompt_ids.shape[1]
    pieces = []
    for i, p, m in zip(rows, plen, n, strict=True):  # prompts are left-padded: the real tokens are the last p
        pieces += [r.prompt_ids[i, P - p :], r.completion_ids[i, :m]]
    lengths = [p + m for p, m in zip(plen, n, strict=True)]
    positions = th.cat([th.arange(length, device=device) for length in lengths])[None]  # (1, N), restarting
    with using_attention(model, ATTENTION):
        hidden = model.base_model(input_ids=th.cat(pieces)[None], position_ids=positions, use_cache=False,
                                  packed_lengths=lengths).last_hidden_state[0]  # (N, H)  # fmt: skip
    # The state that predicts completion token t of a sequence starting at offset o is at o + prompt length − 1 + t.
    offsets = [0, *th.tensor(lengths).cumsum(0).tolist()[:-1]]
    at = th.cat([th.arange(m, device=device) + o + p - 1 for o, p, m in zip(offsets, plen, n, strict=True)])
    completions, keep = r.completion_ids[index, :T], completion_mask[:, :T].bool()  # (b, T)
    start = r.start_inside[index] if r.start_inside is not None else None
    inside = adjust.inside(completions, start)
    flags = inside[keep] if inside is not None else None
    logp = th.zeros(keep.shape, dtype=th.float32, device=device)
    return logp.masked_scatter(keep, token_logprobs(model, adjust, hidden[at], completions[keep], flags, chunk)), T
