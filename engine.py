"""The rollout engine: continuous batching over a KV cache it owns, driving transformers' decoder bodies.

At most S sequences ("slots") decode at once. When a sequence ends (EOS or max_new_tokens) its slot is refilled
with the next waiting job, whose prompt is prefilled together with the other new jobs of that step, so a long tail
of completions never holds the short ones' slots idle (GRPO lengths vary ten-fold).

    r = generate(model, prompts, generators, adjust, max_new_tokens=..., eos_ids=..., pad_id=..., slots=64)

The model body is HF's own (Qwen3, Llama/SmolLM2, …); only its attention is ours (`engine_attention`, registered
with transformers' AttentionInterface and switched on for the rollout). It writes each row's new keys and values at
the row's own position of its slot's cache and attends over the live context only (the longest row's length, each
row masked beyond its own), with GQA handled without repeating K/V: in a decode step the G query heads that share a
KV head become G queries against it. Positions are the rows' own (RoPE reads the position_ids we pass).

The policy is the trainer's: the output layer in fp32 and `LogitAdjust` (temperature, padding rows, think gate and
offset), and a job's noise comes from its own generator, one draw per token, so a job's completion does not depend
on its slot, its batch, the refill order or the rank.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch as th
import torch.nn.functional as F
from transformers import AttentionInterface

from policy import LogitAdjust, entropy_of, lm_head_fp32, sample_tokens

ATTENTION = "rollout_engine"


@dataclass
class Step:
    """What `engine_attention` needs for one forward of the body: the cache, each row's slot and where its new
    tokens start. Prefill rows start empty and are right-padded; decode rows add one token each."""

    cache: list  # per layer: [K, V], each (S, KV_H, L, D), allocated at the first write
    slots: th.Tensor  # (B,) long
    starts: th.Tensor  # (B,) long: tokens already in each row's cache (0 for prefill)
    prefill: bool
    live: int  # max over rows of (start + new tokens): the context length attention reads
    shape: tuple[int, int]  # (S, L): slots and tokens per slot
    leading: bool = False  # the rows are slots 0 … B−1 in order: read the cache as a view, not a gather


def engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, rollout_step=None, **kw):
    """Attention over the engine's cache: query (B, H, T, D), key/value (B, KV_H, T, D) after RoPE → (B, T, H, D).

    Prefill (T = prompt length, rows right-padded): write positions 0 … T−1, causal attention among them (a real
    token never sees the padding after it). Decode (T = 1): write at each row's position, attend over its first
    start + 1 positions, masked per row beyond its own length."""
    s = rollout_step
    if s is None:
        raise RuntimeError("engine_attention runs only inside engine.generate")
    if kw.get("sliding_window"):
        raise NotImplementedError("the rollout engine attends over the whole context: no sliding-window layers")
    layer = s.cache[module.layer_idx]
    if not layer:  # allocate this layer's cache in the dtype the body produces (bf16 weights → bf16 KV)
        S, L = s.shape
        layer += [
            key.new_zeros(S, key.shape[1], L, key.shape[3]),
            value.new_zeros(S, value.shape[1], L, value.shape[3]),
        ]
    K, V = layer
    if s.prefill:
        T = key.shape[2]
        K[s.slots, :, :T] = key
        V[s.slots, :, :T] = value
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        K[s.slots, :, s.starts] = key[:, :, 0]
        V[s.slots, :, s.starts] = value[:, :, 0]
        B = query.shape[0]
        if s.leading:
            keys, values = K[:B, :, : s.live], V[:B, :, : s.live]  # (B, KV_H, live, D)
        else:
            keys, values = K[s.slots, :, : s.live], V[s.slots, :, : s.live]
        attend = th.arange(s.live, device=key.device) <= s.starts[:, None]  # (B, live)
        # GQA without repeating K/V: the G query heads sharing a KV head are G queries of one position.
        H, KVH = query.shape[1], keys.shape[1]
        q = query.reshape(B, KVH, H // KVH, query.shape[-1])  # (B, KV_H, G, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend[:, None, None, :], scale=scaling)
        out = out.reshape(B, H, 1, query.shape[-1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, engine_attention)


@contextmanager
def engine_attention_on(model):
    """Switch the model's attention to the engine's for the rollout, and back afterwards (training uses SDPA)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def slots_for(model, kv_gib: float, tokens_per_slot: int, dtype: th.dtype) -> int:
    """How many slots a KV cache of `kv_gib` GiB holds: each slot keeps K and V for `tokens_per_slot` tokens in every
    layer (2 · layers · kv_heads · head_dim · bytes per token)."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * th.finfo(dtype).bits // 8
    return max(1, int(kv_gib * 2**30) // (per_token * tokens_per_slot))


def slot_count(model, slots: int, jobs: int, kv_gib: float, tokens_per_slot: int) -> int:
    """Slots for `jobs` completions: `slots` (0: one per job), capped so that the cache fits in `kv_gib` (0: no cap)."""
    slots = slots or jobs
    if kv_gib > 0:
        slots = min(slots, slots_for(model, kv_gib, tokens_per_slot, next(model.parameters()).dtype))
    return slots


@th.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    generators: list[th.Generator],
    adjust: LogitAdjust,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    slots: int = 0,
    refill: bool = True,
    top_p: float = 1.0,
    greedy: bool = False,
    head=None,
    should_stop=None,
    stop_check_every: int = 8,
    progress_every: float = 0.0,
):
    """Sample one completion per job (prompt ids, generator) with at most `slots` sequences in flight (0: all jobs).

    `refill` False is static batching, the bench's contender without refill: a finished row keeps its slot and is
    decoded (and discarded) until the batch's longest row ends, as a fixed batch would. `head` is the output layer
    (default the model's; training passes its fp32 master head when sampling from a bf16 copy). `should_stop()` is
    polled every `stop_check_every` steps and ends the rollout early (the caller discards it); `progress_every` > 0
    prints finished jobs and tokens/s at most that often (seconds).

    Returns, in job order: completion ids (N, T) padded with pad_id, completion mask (N, T) (1 up to and including
    EOS), truncated (N,), the sampler's log-probs (N, T), entropies over text (N, T), start_inside (N,) or None."""
    device = next(model.parameters()).device
    body, head = model.base_model, head if head is not None else model.get_output_embeddings()
    if not hasattr(body, "layers"):
        raise ValueError(f"{type(body).__name__} has no `layers`: the engine drives decoder bodies with a layer list")
    N, S = len(prompts), min(slots or len(prompts), len(prompts))
    vocab = adjust.vocab
    inside = vocab.prompt_inside(prompts).to(device) if vocab is not None else None  # (N,) per job
    start_inside = inside.clone() if inside is not None else None
    eos = th.tensor(eos_ids, device=device)
    ids = th.full((N, max_new_tokens), pad_id, dtype=th.long, device=device)
    logps = th.zeros(N, max_new_tokens, device=device)
    ents = th.zeros(N, max_new_tokens, device=device)
    count, truncated = [0] * N, [False] * N  # tokens sampled per job; ended without EOS
    cache: list = [[] for _ in body.layers]
    L = max(len(p) for p in prompts) + max_new_tokens  # tokens per slot
    slot_job, slot_len = [-1] * S, [0] * S  # job in each slot (-1: free), tokens in its cache
    live = [False] * S  # the slot's job still samples (False: finished, kept only without refill)
    last = th.zeros(S, dtype=th.long, device=device)  # each slot's latest token, its next decode input
    spare = th.Generator(device=device)  # draws for finished rows kept without refill (discarded)
    waiting = deque(range(N))
    t0 = shown = time.perf_counter()
    steps = finished = 0

    with engine_attention_on(model):
        while True:
            if not refill and slot_job.count(-1) < S and not any(live):  # the static batch is over
                slot_job = [-1] * S
            free = [s for s in range(S) if slot_job[s] < 0]
            new_slots = []
            if waiting and free and (refill or len(free) == S):
                for s in free[: len(waiting)]:
                    slot_job[s], live[s] = waiting.popleft(), True
                    new_slots.append(s)
            running = [s for s in range(S) if slot_job[s] >= 0 and s not in new_slots]
            if not running and not new_slots:
                break
            hidden = []
            if running:  # one new token per running row, at its own position
                rows = th.tensor(running, device=device)
                starts = th.tensor([slot_len[s] for s in running], device=device)
                step = Step(cache, rows, starts, False, max(slot_len[s] for s in running) + 1, (S, L),
                            leading=running == list(range(len(running))))  # fmt: skip
                out = body(input_ids=last[rows][:, None], position_ids=starts[:, None], use_cache=False,
                           rollout_step=step)  # fmt: skip
                hidden.append(out.last_hidden_state[:, -1])
                for s in running:
                    slot_len[s] += 1
            if new_slots:  # prefill the new jobs' prompts together, right-padded
                lens = [len(prompts[slot_job[s]]) for s in new_slots]
                tokens = th.full((len(new_slots), max(lens)), pad_id, dtype=th.long)
                for i, s in enumerate(new_slots):
                    tokens[i, : lens[i]] = th.tensor(prompts[slot_job[s]])
                n, P = tokens.shape
                step = Step(cache, th.tensor(new_slots, device=device), th.zeros(n, dtype=th.long, device=device),
                            True, P, (S, L))  # fmt: skip
                out = body(input_ids=tokens.to(device), position_ids=th.arange(P, device=device).expand(n, P),
                           use_cache=False, rollout_step=step)  # fmt: skip
                hidden.append(out.last_hidden_state[th.arange(n, device=device), th.tensor(lens, device=device) - 1])
                for s, length in zip(new_slots, lens, strict=True):
                    slot_len[s] = length

            # The next token of every row from the policy, each job with its own generator.
            row_slots = running + new_slots
            row_jobs = [slot_job[s] for s in row_slots]
            jobs_t = th.tensor(row_jobs, device=device)
            flags = inside[jobs_t] if inside is not None else None
            z = adjust(lm_head_fp32(head, th.cat(hidden)), flags)  # (B, V) fp32
            tok, lp = sample_tokens(z, top_p, [generators[j] if live[s] else spare for s, j in zip(row_slots, row_jobs,
                                               strict=True)], greedy)  # fmt: skip
            ent = entropy_of(z, vocab)
            last[th.tensor(row_slots, device=device)] = tok
            keep = [i for i, s in enumerate(row_slots) if live[s]]  # rows whose token counts
            k = th.tensor(keep, device=device)
            jobs_k = jobs_t[k]
            at = th.tensor([count[row_jobs[i]] for i in keep], device=device)
            ids[jobs_k, at], logps[jobs_k, at], ents[jobs_k, at] = tok[k], lp[k], ent[k]
            if inside is not None:
                inside[jobs_k] = vocab.step_state(flags[k], tok[k])
            ended = th.isin(tok[k], eos).tolist()  # the one host sync per step: which slots to refill
            for i, e in zip(keep, ended, strict=True):
                s, j = row_slots[i], row_jobs[i]
                count[j] += 1
                if e or count[j] == max_new_tokens:
                    truncated[j], live[s] = not e, False
                    finished += 1
                    if refill:
                        slot_job[s] = -1
            steps += 1
            if should_stop is not None and steps % stop_check_every == 0 and should_stop():
                break
            if progress_every and time.perf_counter() - shown >= progress_every:
                shown = time.perf_counter()
                print(f"[rollout] {finished}/{N} done, {sum(live)} in flight, "
                      f"{sum(count) / (shown - t0):,.0f} tokens/s", flush=True)  # fmt: skip

    T = max(max(count), 1)
    mask = (th.arange(T, device=device) < th.tensor(count, device=device)[:, None]).long()  # (N, T), EOS included
    return ids[:, :T], mask, th.tensor(truncated, device=device), logps[:, :T] * mask, ents[:, :T], start_inside
