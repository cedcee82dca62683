"""Rollouts: prompts and per-sample seeds in, completions out — scored-ready text and the tensors training needs.

    r = rollout(model, tokenizer, prompts, seeds, adjust, max_new_tokens=..., batch_size=64)
    scores = scorer(reward_samples(r, examples, adjust.vocab, max_new_tokens))     # scoring.py

`rollout` is the one entry point (training, evaluation and bench.py call it); the engine (engine.py) does the
decoding, with continuous batching. `sample` below is the simple reference loop the tests hold the engine to: one
prefill of the left-padded prompts, then one token per step for the whole batch, drawn from the policy
(`LogitAdjust`, policy.py) by the exponential race. Each sample has its own noise stream seeded by the caller, so a
sample does not depend on its batch, its slot, its rank, or a resume.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch as th
import torch.nn.functional as F

import engine
import vocab as rvocab
from noise import row_seeds
from policy import LogitAdjust, entropy_of, lm_head_fp32, sample_tokens
from scoring import Sample
from sharding import full


@dataclass
class Rollout:
    prompt_ids: th.Tensor  # (B, P) left-padded
    prompt_mask: th.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: th.Tensor  # (B, T) pad after EOS
    completion_mask: th.Tensor  # (B, T) 1 up to and including EOS
    truncated: th.Tensor  # (B,) bool: no EOS within max_new_tokens
    logp: th.Tensor  # (B, T) log-prob of each sampled token under the distribution it was sampled from
    entropy: th.Tensor  # (B, T) entropy of the policy over text at each position (see policy.entropy_of)
    start_inside: th.Tensor | None  # (B,) think state at the first completion token (reasoning vocab only)
    texts: list[str] | None = None  # B completions as text, reasoning ids mapped to their sources (`rollout`)
    opened_think: list[bool] | None = None  # B flags: the prompt opened a think block (`rollout`)


@th.no_grad()
def rollout(
    model,
    tokenizer,
    prompts: list[list[int]],
    seeds: list[int],
    adjust: LogitAdjust,
    *,
    max_new_tokens: int,
    eos_ids: list[int] | None = None,
    greedy: bool = False,
    slots: int = 0,
    head=None,
    cache: list | None = None,
    should_stop=None,
    progress_every: float = 0.0,
) -> Rollout:
    """One completion per (prompt ids, seed), sampled from the policy `adjust` by the engine (engine.generate) with
    at most `slots` sequences in flight (0: all at once), decoded to text. `model` may be a bf16 sampling copy of the
    policy, with `head` its fp32 output layer (`sampling_copy`), and `cache` a KV cache to reuse (engine.new_cache).
    eos_ids default to the model's (`eos_token_ids`).
    A `should_stop()` that turns true ends the rollout early (e.g. preemption); the caller discards it."""
    eos_ids = eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids
    was_training = model.training
    model.eval()
    try:
        r = generate(model, prompts, seeds, adjust, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                     pad_id=tokenizer.pad_token_id, slots=slots, greedy=greedy, head=head, cache=cache,
                     should_stop=should_stop, progress_every=progress_every)  # fmt: skip
    finally:
        model.train(was_training)
    ids, mask = r.completion_ids.cpu(), r.completion_mask.cpu()
    r.texts = [decode(tokenizer, adjust.vocab, row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
    tags = rvocab.think_tag_ids(tokenizer)  # (<think>, </think>) ids, or None
    r.opened_think = [tags is not None and rvocab.opens_think(p, *tags) for p in prompts]
    return r


def generate(model, prompts: list[list[int]], seeds: list[int], adjust: LogitAdjust, *, pad_id: int,
             **engine_options) -> Rollout:  # fmt: skip
    """engine.generate's completions as a `Rollout` (no text): the prompts left-padded beside them, as training
    reads them. engine_options go to engine.generate (max_new_tokens, eos_ids, slots, head, …)."""
    ids, mask, truncated, logp, entropy, start_inside = engine.generate(
        model, prompts, seeds, adjust, pad_id=pad_id, **engine_options
    )
    prompt_ids, prompt_mask = (x.to(ids.device) for x in left_pad(prompts, pad_id))
    return Rollout(prompt_ids, prompt_mask, ids, mask, truncated, logp, entropy, start_inside)


def sampling_copy(model, dtype: th.dtype = th.bfloat16):
    """A copy of the policy to sample from in `dtype` (bf16 on GPU: half the bytes per decode step, bf16 keys and
    values in the engine's cache); the fp32 master weights stay for training. Refresh it after each optimizer step
    with `copy_weights`."""
    sampler = copy.deepcopy(model).eval().requires_grad_(False)
    for p in sampler.parameters():  # parameters only: buffers such as RoPE's inv_freq keep their fp32 precision
        p.data = p.data.to(dtype)
    return sampler


def uses_bf16(device: th.device, bf16: bool) -> bool:
    """Whether --bf16 takes effect (a bf16 sampling copy; training under bf16 autocast): on GPU only, since most CPUs
    run bf16 matmuls slower than fp32 ones (the demo and the tests run on CPU)."""
    return bf16 and device.type == "cuda"


def sampling_policy(model, autocast: bool, shard: str):
    """(sampler, head): the model rollouts decode with and its fp32 output layer, made before any sharding. DDP: on
    GPU a bf16 copy beside the master's own fp32 head, on CPU the model itself. FSDP (sharding.py): a whole copy on
    every rank, refreshed by gathers after each update: bf16 with an fp32 copy of the head on GPU, fp32 on CPU."""
    if shard == "fsdp":
        sampler = sampling_copy(model, th.bfloat16 if autocast else th.float32)
        if not autocast:
            return sampler, sampler.get_output_embeddings()
        return sampler, copy.deepcopy(model.get_output_embeddings()).requires_grad_(False)
    return sampling_copy(model) if autocast else model, model.get_output_embeddings()


@th.no_grad()
def copy_weights(dst, src, head=None) -> None:
    """dst's parameters ← src's, cast to dst's dtype; the two share one architecture (`sampling_copy`). A sharded
    src's are gathered one at a time, cast before the gather (every rank calls this). `head`, the rollouts' output
    layer (`sampling_policy`) ← src's when it is kept beside both (the fp32 head of a sharded policy's bf16 copy)."""
    for p, q in zip(dst.parameters(), src.parameters(), strict=True):
        p.copy_(full(q, p.dtype))
    if head is not None and head not in (dst.get_output_embeddings(), src.get_output_embeddings()):
        head.weight.copy_(full(src.get_output_embeddings().weight, head.weight.dtype))


def reward_texts(completions: list[str], prompt_opened_think: list[bool]) -> list[str]:
    """What the reward reads. A prompt that opens the think block (Qwen3's thinking template) makes the completion
    start inside it: the reward must see that opening tag, or a box inside an unclosed think block would count as
    the answer."""
    return [rvocab.THINK + t if o else t for t, o in zip(completions, prompt_opened_think, strict=True)]


def reward_samples(r: Rollout, examples: list, vocab: rvocab.ReasoningVocab | None, max_new_tokens: int,
                   overlong_buffer: int = 0) -> list[Sample]:  # fmt: skip
    """The rollout's completions as the reward functions see them (scoring.Sample), `examples` (data.Example) one per
    completion: the text after the think block its prompt opened (`reward_texts`), the gold answer, the dataset row,
    and the token facts."""
    mask = r.completion_mask.bool()
    num_tokens, truncated = mask.sum(-1).tolist(), r.truncated.tolist()
    copies = (r.completion_ids >= vocab.standard_size) & mask if vocab is not None else th.zeros_like(mask)
    texts, reasoning = reward_texts(r.texts, r.opened_think), copies.sum(-1).tolist()
    return [Sample(t, ex.answer, ex.row, n, bool(tr), k, max_new_tokens, overlong_buffer)
            for t, ex, n, tr, k in zip(texts, examples, num_tokens, truncated, reasoning, strict=True)]  # fmt: skip


def take_rows(r: Rollout, rows: th.Tensor | None, *per_row) -> tuple:
    """(the rollout's rows `rows`, cut to their longest completion, *each per-row tensor (B,) or (B, T) at those rows
    and cut alike); rows None: (r, *per_row) as they are. None in per_row stays None."""
    if rows is None:
        return (r, *per_row)
    T = max(int(r.completion_mask[rows].sum(-1).max()), 1)

    def pick(x, cut=True):
        x = x if x is None else x[rows.to(x.device)]
        return x[:, :T] if cut and x is not None and x.dim() == 2 else x

    def listed(xs):
        return xs if xs is None else [xs[i] for i in rows.tolist()]

    part = Rollout(pick(r.prompt_ids, False), pick(r.prompt_mask, False), pick(r.completion_ids),
                   pick(r.completion_mask), pick(r.truncated), pick(r.logp), pick(r.entropy), pick(r.start_inside),
                   listed(r.texts), listed(r.opened_think))  # fmt: skip
    return (part, *(pick(x) for x in per_row))


def decode(tokenizer, vocab: rvocab.ReasoningVocab | None, ids: list[int], mark: bool = False) -> str:
    """Completion text as the reward sees it: reasoning ids mapped to their standard tokens (⟦marked⟧ for logs)."""
    if vocab is not None:
        return vocab.decode(ids, tokenizer, mark=mark)
    return tokenizer.decode(ids)


def sample_seed(seed: int, step: int, index: int, j: int) -> int:
    """Seed of the j-th sample of dataset row `index` at `step`: the same whichever rank or batch samples it, so
    runs with any number of ranks, and resumed runs, sample the same completions."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) * 1_009 + j


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, list) else [extra])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer and generation config define no EOS token")
    return sorted(ids)


# ---------------------------------------------------------------------------------------------------------------------
# The sampler


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[th.Tensor, th.Tensor]:
    """Left-pad id lists to (B, P) ids and mask, so every row's next token sits in the last column."""
    width = max(len(s) for s in seqs)
    ids = th.full((len(seqs), width), pad_id, dtype=th.long)
    mask = th.zeros((len(seqs), width), dtype=th.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = th.tensor(s, dtype=th.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def positions(mask: th.Tensor) -> th.Tensor:
    """Position ids that ignore left padding: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@th.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    adjust: LogitAdjust,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    generator: th.Generator | None = None,
    seeds: list[int] | None = None,
    greedy: bool = False,
    static_cache: bool = False,
    stop_check_every: int = 8,
    should_stop=None,
) -> Rollout:
    """Batched sampling with the model's KV cache: one prefill of the left-padded prompts, then one token per step.

    Noise: one `generator` for the batch, or `seeds` (one per row) for per-row streams as the engine draws them.
    Each row stops at its own EOS (an EOS inside a prompt does not count) or at max_new_tokens. The host reads the
    done flags only every `stop_check_every` steps; `should_stop()` (e.g. a preemption signal) is polled then too and
    ends the rollout early (the caller discards it). `static_cache` decodes with `static_decoder` (a CUDA graph on
    GPU); the tokens are the same either way."""
    device = next(model.parameters()).device
    body = model.base_model
    cache_kw = cache_keyword(body)
    prompt_ids, prompt_mask = (x.to(device) for x in left_pad(prompts, pad_id))
    B = prompt_ids.shape[0]
    eos = th.tensor(eos_ids, device=device)
    vocab = adjust.vocab
    start_inside = vocab.prompt_inside(prompts).to(device) if vocab is not None else None
    inside = start_inside
    seed_of = row_seeds(seeds, device) if seeds else None

    if static_cache:
        hidden, decode_step = static_decoder(body, prompt_ids, prompt_mask, max_new_tokens, device.type == "cuda")
    else:  # the model's growing cache; the 2-D mask gains a column per step
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                   use_cache=True)  # fmt: skip
        hidden, state = out.last_hidden_state[:, -1], {"cache": kv_cache(out), "mask": prompt_mask}

        def decode_step(tokens: th.Tensor, pos: th.Tensor, t: int) -> th.Tensor:
            state["mask"] = th.cat([state["mask"], th.ones_like(state["mask"][:, :1])], dim=1)
            out = body(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=pos[:, None],
                       use_cache=True, **{cache_kw: state["cache"]})  # fmt: skip
            state["cache"] = kv_cache(out)
            return out.last_hidden_state[:, -1]

    next_pos = prompt_mask.sum(-1)  # (B,)
    done = th.zeros(B, dtype=th.bool, device=device)
    tokens, logps, ents, alive = [], [], [], []
    for t in range(max_new_tokens):
        z = adjust(lm_head_fp32(model.get_output_embeddings(), hidden), inside)  # (B, V)
        tok, lp = sample_tokens(adjust.truncate(z), (seed_of, th.full_like(seed_of, t)) if seeds else generator, greedy)
        ents.append(entropy_of(z, vocab))
        tok = tok.masked_fill(done, pad_id)
        tokens.append(tok)
        logps.append(lp)
        alive.append(~done)
        done = done | th.isin(tok, eos)
        if vocab is not None:
            inside = vocab.step_state(inside, tok)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % stop_check_every == 0 and (bool(done.all()) or (should_stop is not None and should_stop())):
            break
        hidden = decode_step(tok, next_pos, t)  # (B, H)
        next_pos = next_pos + 1

    completion_mask = th.stack(alive, 1).long()  # (B, T): alive before the token ⇒ the token (EOS included) counts
    T = int(completion_mask.sum(-1).max())  # trim the steps after the last row stopped
    completion_ids = th.stack(tokens, 1)[:, :T]
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask[:, :T],
        truncated=~done,
        logp=th.stack(logps, 1)[:, :T] * completion_mask[:, :T],
        entropy=th.stack(ents, 1)[:, :T],
        start_inside=start_inside,
    )


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollout chunks, padding prompts on the left and completions on the right."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_ids.shape[1] for p in parts)
    T = max(p.completion_ids.shape[1] for p in parts)

    def pad(x, width, value, left=False):
        extra = width - x.shape[1]
        return F.pad(x, (extra, 0) if left else (0, extra), value=value)

    cat = lambda f, w, v, left=False: th.cat([pad(getattr(p, f), w, v, left) for p in parts])  # noqa: E731
    return Rollout(
        prompt_ids=cat("prompt_ids", P, pad_id, True),
        prompt_mask=cat("prompt_mask", P, 0, True),
        completion_ids=cat("completion_ids", T, pad_id),
        completion_mask=cat("completion_mask", T, 0),
        truncated=th.cat([p.truncated for p in parts]),
        logp=cat("logp", T, 0.0),
        entropy=cat("entropy", T, 0.0),
        start_inside=th.cat([p.start_inside for p in parts]) if parts[0].start_inside is not None else None,
        texts=[t for p in parts for t in p.texts] if parts[0].texts is not None else None,
        opened_think=[f for p in parts for f in p.opened_think] if parts[0].opened_think is not None else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# transformers' decoder body as a decode step: its KV cache, and a fixed-size cache replayed as a CUDA graph


def cache_keyword(body) -> str:
    """The KV-cache argument's name: transformers renamed `past_key_values` to `cache` during 5.x; support both."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def kv_cache(out):
    return out.cache if "cache" in out else out.past_key_values


def static_decoder(body, prompt_ids: th.Tensor, prompt_mask: th.Tensor, max_new_tokens: int, graph: bool):
    """Prefill into a fixed-size KV cache, then return decode(tokens (B,), positions (B,), t) → hidden (B, H).

    Every decode step then has the same shapes and buffer addresses: the cache holds P + max_new_tokens slots, a
    (B, 1, 1, slots) boolean mask marks the slots each row attends (its prompt's real tokens, then one slot per step),
    and the new token goes to slot P + t. With `graph` (CUDA), the step is captured once as a CUDA graph and replayed:
    one launch instead of the ~20 kernel launches per layer that make small-batch decoding launch-bound. The price is
    attention over all slots at every step, so it pays where launches, not KV reads, dominate (bench.py measures)."""
    from transformers import StaticCache

    if body.config._attn_implementation != "sdpa":
        raise ValueError(
            f"the static decoder passes a boolean SDPA mask; this model uses {body.config._attn_implementation!r}"
        )
    B, P = prompt_ids.shape
    device, kw = prompt_ids.device, cache_keyword(body)
    cache = StaticCache(config=body.config, max_cache_len=P + max_new_tokens)
    for layer in cache.layers:
        _values_keep_their_dtype(layer)
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask), use_cache=True,
               **{kw: cache})  # fmt: skip
    for layer in cache.layers:  # drop the shim: it refers to its layer, a cycle that would hold the cache until gc
        vars(layer).pop("lazy_initialization", None)
    attend = th.zeros(B, 1, 1, P + max_new_tokens, dtype=th.bool, device=device)  # (B, 1, 1, slots)
    attend[:, 0, 0, :P] = prompt_mask.bool()
    tok_in = th.zeros(B, 1, dtype=th.long, device=device)  # the step's inputs live in fixed buffers
    pos_in = th.zeros(B, 1, dtype=th.long, device=device)

    def step() -> th.Tensor:
        out = body(input_ids=tok_in, attention_mask=attend, position_ids=pos_in, use_cache=True, **{kw: cache})
        return out.last_hidden_state[:, -1]

    captured: dict = {}

    def decode(tokens: th.Tensor, pos: th.Tensor, t: int) -> th.Tensor:
        tok_in.copy_(tokens[:, None])
        pos_in.copy_(pos[:, None])
        attend[:, 0, 0, P + t] = True
        if not graph:
            return step()
        if "graph" not in captured:  # the first step runs eagerly (it warms up the kernels), the second is captured
            if t == 0:
                stream = th.cuda.Stream()
                stream.wait_stream(th.cuda.current_stream())
                with th.cuda.stream(stream):
                    hidden = step()
                th.cuda.current_stream().wait_stream(stream)
                return hidden
            g = th.cuda.CUDAGraph()
            # Autocast's weight-cast cache must stay off while capturing; the captured casts read the live weights.
            dtype, enabled = th.get_autocast_dtype("cuda"), th.is_autocast_enabled("cuda")
            with th.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False), th.cuda.graph(g):
                captured["hidden"] = step()
            captured["graph"] = g
        captured["graph"].replay()  # capture only records: the captured step runs here too
        return captured["hidden"]

    return out.last_hidden_state[:, -1], decode


def _values_keep_their_dtype(layer) -> None:
    """Some transformers 5.x static cache layers allocate values in the keys' dtype. Under bf16 autocast with fp32
    weights the keys leave Qwen3's fp32 k_norm as fp32 while the values stay bf16, so re-allocate the values."""
    init = layer.lazy_initialization

    def lazy_initialization(key_states: th.Tensor, value_states: th.Tensor, *args, **kwargs) -> None:
        init(key_states, value_states, *args, **kwargs)
        if layer.values.dtype != value_states.dtype:
            layer.values = th.zeros_like(layer.values, dtype=value_states.dtype)

    layer.lazy_initialization = lazy_initialization
