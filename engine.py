"""The rollout engine: continuous batching over its own KV cache (one per training run, `new_cache`), driving
transformers' decoder bodies.

At most S sequences ("slots") decode at once. When a sequence ends (EOS or max_new_tokens) its slot is refilled
with the next waiting job, whose prompt is prefilled together with the other new jobs of that step, so a long tail
of completions never holds the short ones' slots idle (GRPO lengths vary ten-fold).

    r = generate(model, prompts, seeds, adjust, max_new_tokens=..., eos_ids=..., pad_id=..., slots=64)

The model body is HF's own (Qwen3, Llama/SmolLM2, …); only its attention is ours (`engine_attention`, registered
with transformers' AttentionInterface and switched on for the rollout). It writes each row's new keys and values at
the row's own position of its slot's cache and attends over the live context only (the longest row's length, each
row masked beyond its own), with GQA handled without repeating K/V: in a decode step the G query heads that share a
KV head become G queries against it. Positions are the rows' own (RoPE reads the position_ids we pass).

The policy is the trainer's: the output layer in fp32 and `LogitAdjust` (temperature, padding rows, think gate and
offset), and a job's noise is a function of its seed and the token's index (noise.row_uniforms: one kernel for the
batch on a GPU), so a job's completion does not depend on its slot, its batch, the refill order or the rank.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch as th
import torch.nn.functional as F
from transformers import AttentionInterface

from noise import row_seeds
from policy import LogitAdjust, entropy_of, lm_head_fp32, sample_tokens

ATTENTION = "rollout_engine"


@dataclass
class Step:
    """What `engine_attention` needs for one forward of the body: the cache, each row's slot and where its new
    tokens start. Prefill rows start empty and are right-padded; decode rows add one token each."""

    cache: list  # per layer: [K, V], each (S, KV_H, L, D) (new_cache)
    slots: th.Tensor  # (B,) long
    starts: th.Tensor  # (B,) long: tokens already in each row's cache (0 for prefill)
    prefill: bool
    live: int  # max over rows of (start + new tokens): the context length attention reads
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
    K, V = s.cache[module.layer_idx]
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
def using_attention(model, name: str):
    """Run `model` with the registered attention `name` inside the block (the engine's for a rollout, the packed
    update's for a micro-batch), and its own afterwards (SDPA)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def kv_layout(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of the model's K and V: what each cached token holds, twice (K and V)."""
    c = model.config.get_text_config()
    return (
        c.num_hidden_layers,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )


def slots_for(model, kv_gib: float, tokens_per_slot: int, dtype: th.dtype) -> int:
    """How many slots a KV cache of `kv_gib` GiB holds: each slot keeps K and V for `tokens_per_slot` tokens in every
    layer (2 · layers · kv_heads · head_dim · bytes per token)."""
    layers, kv_heads, head_dim = kv_layout(model)
    per_token = 2 * layers * kv_heads * head_dim * th.finfo(dtype).bits // 8
    return max(1, round(kv_gib * 2**30) // (per_token * tokens_per_slot))


def slot_count(model, slots: int, jobs: int, kv_gib: float, tokens_per_slot: int) -> int:
    """Slots for `jobs` completions: `slots` (0: one per job), capped so that the cache fits in `kv_gib` (0, or 'auto'
    not yet planned: no cap)."""
    slots = slots or jobs
    if kv_gib != "auto" and kv_gib > 0:
        slots = min(slots, slots_for(model, kv_gib, tokens_per_slot, next(model.parameters()).dtype))
    return slots


def new_cache(model, slots: int, tokens: int) -> list:
    """The engine's KV cache for `slots` sequences of up to `tokens` tokens: per layer [K, V], each (slots, KV_H,
    tokens, D) in the model's dtype. Allocated once for a training run and handed to every rollout and evaluation
    (`generate(cache=...)`), so no rollout allocates (and fragments) tens of GiB afresh."""
    layers, kv_heads, head_dim = kv_layout(model)
    p = next(model.parameters())
    shape = (slots, kv_heads, tokens, head_dim)
    return [[p.new_zeros(shape), p.new_zeros(shape)] for _ in range(layers)]


@th.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    adjust: LogitAdjust,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    slots: int = 0,
    refill: bool = True,
    compact: bool = True,
    greedy: bool = False,
    head=None,
    cache: list | None = None,
    should_stop=None,
    stop_check_every: int = 8,
    progress_every: float = 0.0,
):
    """Sample one completion per job (prompt ids, seed) with at most `slots` sequences in flight (0: all jobs).

    Each iteration decodes one token for every running sequence and prefills the waiting jobs admitted to free
    slots, then samples the next token of all of them in one pass. `compact` keeps the running sequences in slots
    0 … B−1 (when one ends, the last one's K/V moves into its slot) and admits new jobs at B, B+1, …, so the decode
    step reads the cache as a view and its bookkeeping stays on the device: one host sync per step (which rows
    ended). Without `compact` rows stay where they started and decode gathers their K/V (the benchmark's "before").
    `refill` False is static batching, the bench's contender without refill: a finished row keeps its slot and is
    decoded (and discarded) until the batch's longest row ends, as a fixed batch would (it never compacts).
    `head` is the output layer (default the model's; training passes its fp32 master head when sampling from a bf16
    copy); `cache` a `new_cache` to reuse (default: one allocated for this call). `should_stop()` is polled every
    `stop_check_every` steps and ends the rollout early (the caller discards it); `progress_every` > 0 prints
    finished jobs and tokens/s at most that often (seconds).

    Returns, in job order: completion ids (N, T) padded with pad_id, completion mask (N, T) (1 up to and including
    EOS), truncated (N,), the sampler's log-probs (N, T), entropies over text (N, T), start_inside (N,) or None."""
    device = next(model.parameters()).device
    body, head = model.base_model, head if head is not None else model.get_output_embeddings()
    if not hasattr(body, "layers"):
        raise ValueError(f"{type(body).__name__} has no `layers`: the engine drives decoder bodies with a layer list")
    N, S = len(prompts), min(slots or len(prompts), len(prompts))
    L = max(len(p) for p in prompts) + max_new_tokens  # tokens per slot
    if cache is None:
        cache = new_cache(model, S, L)
    elif cache[0][0].shape[0] < S or cache[0][0].shape[2] < L:
        raise ValueError(f"the KV cache holds {cache[0][0].shape[0]} slots × {cache[0][0].shape[2]} tokens; this "
                         f"rollout needs {S} × {L}")  # fmt: skip
    vocab = adjust.vocab
    inside = vocab.prompt_inside(prompts).to(device) if vocab is not None else None  # (N,) per job
    start_inside = inside.clone() if inside is not None else None
    eos = th.tensor(eos_ids, device=device)
    ids = th.full((N, max_new_tokens), pad_id, dtype=th.long, device=device)
    logps = th.zeros(N, max_new_tokens, device=device)
    ents = th.zeros(N, max_new_tokens, device=device)
    count, truncated = [0] * N, [False] * N  # tokens sampled per job (host); ended without EOS
    count_d = th.zeros(N, dtype=th.long, device=device)  # the same on the device, where the writes index with it
    seed_of = row_seeds(seeds, device)  # (N,) each job's noise stream
    slot_job, slot_len = [-1] * S, [0] * S  # job in each slot (-1: free), tokens in its cache: known on the host
    live = [False] * S  # the slot's job still samples (False: finished, kept only without refill)
    last = th.zeros(S, dtype=th.long, device=device)  # each slot's latest token, its next decode input
    pos = th.zeros(S, dtype=th.long, device=device)  # each slot's next position (= tokens in its cache)
    job_of = th.zeros(S, dtype=th.long, device=device)  # each slot's job, on the device
    all_slots = th.arange(S, device=device)
    waiting = deque(range(N))
    t0 = shown = time.perf_counter()
    steps = finished = 0

    def sample_rows(row_slots: list[int], rows: th.Tensor, hidden: th.Tensor) -> None:
        """The next token of every row (slots `row_slots`, on the device `rows`) from the policy, each job with its
        own noise stream (its seed, the token's index), recorded for the live rows; rows whose job ended leave their
        slot (with refill). Finished rows kept without refill draw again at their last index, and are discarded."""
        nonlocal finished
        jobs = job_of[rows]
        flags = inside[jobs] if inside is not None else None
        z = adjust(lm_head_fp32(head, hidden), flags)  # (B, V) fp32
        tok, lp = sample_tokens(adjust.truncate(z), (seed_of[jobs], count_d[jobs]), greedy)
        ent = entropy_of(z, vocab)
        last[rows] = tok
        keep = [i for i, s in enumerate(row_slots) if live[s]]  # rows whose token counts (all of them with refill)
        if len(keep) < len(row_slots):
            k = th.tensor(keep, device=device)
            jobs, tok, lp, ent, flags = jobs[k], tok[k], lp[k], ent[k], flags[k] if flags is not None else None
        at = count_d[jobs]
        ids[jobs, at], logps[jobs, at], ents[jobs, at] = tok, lp, ent
        count_d[jobs] += 1
        if inside is not None:
            inside[jobs] = vocab.step_state(flags, tok)
        ended = th.isin(tok, eos).tolist()  # the one host sync: which slots to refill
        for i, e in zip(keep, ended, strict=True):
            s = row_slots[i]
            j = slot_job[s]
            count[j] += 1
            if e or count[j] == max_new_tokens:
                truncated[j], live[s] = not e, False
                finished += 1
                if refill:
                    slot_job[s] = -1

    with using_attention(model, ATTENTION):
        while True:
            if not refill and slot_job.count(-1) < S and not any(live):  # the static batch is over
                slot_job = [-1] * S
            if compact and refill:  # running sequences into slots 0 … B−1: waiting ones then join at B, B+1, …
                compact_slots(cache, slot_job, slot_len, live, (last, pos, job_of))
            running = [s for s in range(S) if slot_job[s] >= 0]
            free = [s for s in range(S) if slot_job[s] < 0]
            new = free[: len(waiting)] if waiting and (refill or len(free) == S) else []
            if not running and not new:
                break
            hidden = []
            if running:  # one new token per running row, at its own position
                B = len(running)
                leading = running[-1] == B - 1  # slots 0 … B−1: the cache is read as a view
                rows = all_slots[:B] if leading else th.tensor(running, device=device)
                starts = pos[:B].clone() if leading else pos[rows]
                step = Step(cache, rows, starts, False, max(slot_len[s] for s in running) + 1, leading=leading)
                inputs = last[:B] if leading else last[rows]
                out = body(input_ids=inputs[:, None], position_ids=starts[:, None], use_cache=False, rollout_step=step)
                hidden.append(out.last_hidden_state[:, -1])
                for s in running:
                    slot_len[s] += 1
                pos[rows] += 1
            if new:  # admit waiting jobs: their prompts prefilled together, right-padded
                for s in new:
                    slot_job[s], live[s] = waiting.popleft(), True
                lens = [len(prompts[slot_job[s]]) for s in new]
                tokens = th.full((len(new), max(lens)), pad_id, dtype=th.long)
                for i, s in enumerate(new):
                    tokens[i, : lens[i]] = th.tensor(prompts[slot_job[s]])
                n, P = tokens.shape
                rows = th.tensor(new, device=device)
                lens_t = th.tensor(lens, device=device)
                job_of[rows], pos[rows] = th.tensor([slot_job[s] for s in new], device=device), lens_t
                step = Step(cache, rows, th.zeros(n, dtype=th.long, device=device), True, P)
                out = body(input_ids=tokens.to(device), position_ids=all_slots.new_tensor(range(P)).expand(n, P),
                           use_cache=False, rollout_step=step)  # fmt: skip
                hidden.append(out.last_hidden_state[th.arange(n, device=device), lens_t - 1])
                for s, length in zip(new, lens, strict=True):
                    slot_len[s] = length
            # The next token of every row, decoded and prefilled alike, in one pass over the vocabulary.
            row_slots = running + new
            contiguous = row_slots == list(range(len(row_slots)))
            sample_rows(row_slots, all_slots[: len(row_slots)] if contiguous else th.tensor(row_slots, device=device),
                        th.cat(hidden))  # fmt: skip
            steps += 1
            if should_stop is not None and steps % stop_check_every == 0 and should_stop():
                break
            if progress_every and time.perf_counter() - shown >= progress_every:
                shown = time.perf_counter()
                print(f"[rollout] {finished}/{N} done, {sum(live)} in flight, "
                      f"{sum(count) / (shown - t0):,.0f} tokens/s", flush=True)  # fmt: skip

    T = max(max(count), 1)
    mask = (th.arange(T, device=device) < count_d[:, None]).long()  # (N, T), EOS included
    return ids[:, :T], mask, th.tensor(truncated, device=device), logps[:, :T] * mask, ents[:, :T], start_inside


def compact_slots(cache: list, slot_job: list[int], slot_len: list[int], live: list[bool], per_slot) -> None:
    """Move the running sequences in the highest slots into the free slots below them, so that the B running ones
    occupy slots 0 … B−1: their K/V (up to the longest mover's length, one copy per layer and tensor) and their
    per-slot device state `per_slot` (tensors indexed by slot), and the host lists. A no-op when already so."""
    occupied = [s for s in range(len(slot_job)) if slot_job[s] >= 0]
    B = len(occupied)
    holes = [s for s in range(B) if slot_job[s] < 0]
    if not holes:
        return
    movers = [s for s in occupied if s >= B]  # as many as there are holes
    device = cache[0][0].device
    dst, src = th.tensor(holes, device=device), th.tensor(movers, device=device)
    n = max(slot_len[s] for s in movers)
    for layer in cache:
        for x in layer:
            x[dst, :, :n] = x[src, :, :n]
    for x in per_slot:
        x[dst] = x[src]
    for d, s in zip(holes, movers, strict=True):
        slot_job[d], slot_len[d], live[d] = slot_job[s], slot_len[s], live[s]
        slot_job[s], live[s] = -1, False
