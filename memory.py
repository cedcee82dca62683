"""The memory plan: what one GRPO step needs on one device, computed from the model's config and the options before
anything is allocated, and the choices that make it fit — the rollout's KV-cache slots, the update's token budget,
gradient checkpointing — or a one-line error naming the option to change.

    shape = model_shape(config, reasoning_vocab_size)        # a transformers config: no weights needed
    plan = memory_plan(shape, cfg, device="cuda", memory_gib=80)
    print(format_plan(plan))                                  # what `python grpo.py --plan` prints

Bytes per parameter (P): fp32 master weights 4, gradients 4 (freed after each optimizer step, so only during the
update), AdamW's two moments 8, the bf16 sampling copy 2 (GPU), a frozen fp32 reference 4 (β ≠ 0). The KV cache
(allocated once for the run) holds K and V of every layer for prompt + completion tokens per slot. The update's
activations per token and layer were measured on Qwen3 layers with saved-tensor hooks (CPU, this repo's packed
update): under bf16 autocast 30 H + 12 q + 10 kv + 8 I bytes, in fp32 28 H + 20 q + 16 kv + 16 I (H hidden, q = heads
× head_dim, kv = KV heads × head_dim, I the MLP width); with checkpointing only each layer's fp32 input (4 H) stays,
and one layer is recomputed at a time. The rollout's scratch is its prefill (all slots' prompts at once) and the
per-slot fp32 logits over the vocabulary. Peak = shared + KV + max(rollout scratch, gradients + update activations):
the two phases never overlap. GPU figures are estimates until measured (bench.py --device cuda).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from config import Config, UsageError

GiB = 2**30
MARGIN = 0.10  # of the device's memory, for the allocator's fragmentation and what the estimates miss
CUDA_RESERVE_GIB = 1.5  # CUDA context, cuBLAS workspace: not in mem_get_info's free figure when planned for a card

# Known Qwen3 sizes (their config.json), so that --plan answers for them with no weights or hub access.
QWEN3 = {  # hidden, MLP width, layers, heads, KV heads, tied embedding
    "Qwen/Qwen3-0.6B": (1024, 3072, 28, 16, 8, True),
    "Qwen/Qwen3-1.7B": (2048, 6144, 28, 16, 8, True),
    "Qwen/Qwen3-4B": (2560, 9728, 36, 32, 8, True),
    "Qwen/Qwen3-8B": (4096, 12288, 36, 32, 8, False),
}


@dataclass
class Shape:
    """The sizes the plan needs (`model_shape`)."""

    params: int  # after the reasoning-vocabulary expansion
    layers: int
    hidden: int
    q_dim: int  # attention heads × head dim
    kv_dim: int  # KV heads × head dim
    intermediate: int
    rows: int  # vocabulary rows (output layer)
    tied: bool = True  # the output layer is the input embedding


def qwen3_config(name: str):
    """A transformers Qwen3Config of a known size (QWEN3), or None."""
    if name not in QWEN3:
        return None
    from transformers import Qwen3Config

    H, width, layers, heads, kv, tied = QWEN3[name]
    return Qwen3Config(vocab_size=151936, hidden_size=H, intermediate_size=width, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=tied)  # fmt: skip


def model_shape(config, reasoning_vocab_size: int = 0, params: int | None = None) -> Shape:
    """The plan's sizes from a transformers config (Llama/Qwen-style decoder), with `reasoning_vocab_size` copies
    still to add (-1: one per row, an upper bound). `params`: the exact count of a loaded model, else computed."""
    c = config.get_text_config()
    H, layers, width = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or H // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    tied = getattr(c, "tie_word_embeddings", True)
    added = c.vocab_size if reasoning_vocab_size == -1 else reasoning_vocab_size
    rows = c.vocab_size + added
    if params is None:
        layer = 2 * H * q + 2 * H * kv + 3 * H * width + 2 * H + (2 * head_dim if c.model_type == "qwen3" else 0)
        params = layers * layer + H + rows * H * (1 if tied else 2)
    else:
        params += added * H * (1 if tied else 2)
    return Shape(params, layers, H, q, kv, width, rows, tied)


def tokens_per_slot(cfg: Config) -> int:
    """Tokens each slot of the run's KV cache holds: the longest prompt and the longer of a rollout's and an
    evaluation's completions (the evaluation decodes in the same cache)."""
    eval_len = (cfg.eval_max_new_tokens or 0) if cfg.eval_every else 0
    return cfg.max_prompt_len + max(cfg.max_new_tokens, eval_len)


def activation_bytes(s: Shape, bf16: bool, checkpointing: bool) -> float:
    """Saved activations of the update per token (all layers), plus the output layer's per-token tensors (the final
    hidden state, its gather and their gradients, fp32)."""
    if bf16:
        per_layer = 30 * s.hidden + 12 * s.q_dim + 10 * s.kv_dim + 8 * s.intermediate
    else:
        per_layer = 28 * s.hidden + 20 * s.q_dim + 16 * s.kv_dim + 16 * s.intermediate
    body = s.layers * 4 * s.hidden + per_layer if checkpointing else s.layers * per_layer
    return body + 4 * 4 * s.hidden


@dataclass
class Plan:
    parts: list[tuple[str, float, str]]  # (what, bytes, how it was counted)
    usable: float  # bytes the plan may use
    device: str
    slots: int
    kv_gib: float
    update_tokens: int  # 0: padded micro-batches
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        shared = sum(b for name, b, _ in self.parts if name not in PHASES)
        return shared + max(sum(b for name, b, _ in self.parts if PHASES.get(name) == p) for p in ("rollout", "update"))


PHASES = {"rollout scratch": "rollout", "gradients": "update", "update activations": "update"}


def memory_plan(s: Shape, cfg: Config, device: str, memory_gib: float | None = None, free_bytes: float | None = None,
                world_size: int = 1) -> Plan:  # fmt: skip
    """Plan one rank's memory for `cfg` on a `device` ('cuda' or 'cpu') of `memory_gib` GiB (a card you do not have)
    or with `free_bytes` free now. The options set to 'auto' (--rollout-kv-gib, --micro-batch-tokens,
    --gradient-checkpointing) are chosen, in this order of priority: every slot the rollout asks for
    (--rollout-batch-size, at most the rank's completions), no checkpointing if the longest sequence's update then
    still fits, else checkpointing; then the update's token budget takes what is left (at most the rank's whole step).
    Raises UsageError naming an option when even one slot and one sequence cannot fit."""
    gpu = device == "cuda"
    bf16 = gpu and cfg.bf16
    total = memory_gib * GiB - (CUDA_RESERVE_GIB * GiB if gpu else 0) if memory_gib else free_bytes
    usable = total * (1 - MARGIN)
    P = s.params
    fsdp = cfg.shard == "fsdp"
    W = world_size if fsdp else 1  # the master, its gradients, AdamW's state and the reference are split W ways
    split = f" / {W} ranks" if fsdp else ""
    parts = [("master weights (fp32)", 4 * P / W, f"{P / 1e9:.2f} B parameters × 4 B{split}"),
             ("AdamW state", 8 * P / W, f"× 8 B (two fp32 moments){split}")]  # fmt: skip
    if bf16:
        parts.append(("sampling copy (bf16)", 2 * P, "× 2 B (--bf16), whole on every rank"))
    elif fsdp:
        parts.append(("sampling copy (fp32)", 4 * P, "× 4 B, whole on every rank"))
    if fsdp:  # the root group (embeddings, output layer) gathered in fp32 through the update, its gradient unsharded
        root = s.rows * s.hidden * (1 if s.tied else 2)
        layer = (P - root) / s.layers
        parts.append(("gathered (fsdp)", 2 * 4 * root + 2 * layer * (2 if bf16 else 4) + (4 * root if bf16 else 0),
                      "fp32 root group and its gradient, two layers in flight" + (", fp32 sampling head" if bf16 else "")))  # fmt: skip
    if cfg.beta != 0:
        parts.append(("reference model (fp32)", 4 * P / W, f"× 4 B (--beta {cfg.beta:g}){split}"))
    parts.append(("gradients", 4 * P / W, f"× 4 B, during the update only{split}"))

    seq = cfg.max_prompt_len + cfg.max_new_tokens  # the longest sequence of the update
    per_slot = tokens_per_slot(cfg)
    kv_token = 2 * s.layers * s.kv_dim * (2 if bf16 else 4)
    jobs = max(1, cfg.prompts_per_step // world_size * cfg.group_size)
    wanted = min(cfg.rollout_batch_size or jobs, jobs)
    # Rollout scratch: the first prefill (every slot's prompt, ~inference activations of two layers' width), and the
    # per-slot fp32 vocabulary-wide tensors of a decode step (logits, noise, softmax: ~6 of them).
    prefill_token = (2 * s.hidden + s.q_dim + 2 * s.kv_dim + 3 * s.intermediate) * (2 if bf16 else 4) + 4 * s.hidden

    def scratch(slots: int) -> float:
        return slots * (cfg.max_prompt_len * prefill_token + 6 * 4 * s.rows)

    grads = 4 * P / W
    shared = sum(b for _, b, _ in parts) - grads  # the gradients are the update's
    ckpt_options = {"on": [True], "off": [False], "auto": [False, True]}[cfg.gradient_checkpointing]
    padded = cfg.micro_batch_tokens == 0
    head = 3 * 4 * cfg.logprob_chunk * s.rows  # the output layer's chunk: logits, their softmax and its gradient

    def update_bytes(tokens: int, ckpt: bool) -> float:
        mask = cfg.micro_batch_size * seq * seq if padded else 0  # the padded path's (B, 1, L, L) boolean mask
        return grads + tokens * activation_bytes(s, bf16, ckpt) + head + mask

    min_tokens = cfg.micro_batch_size * seq if padded else seq
    # A sequence longer than a given budget gets a row of its own (packing.pack): plan for the longer of the two.
    fixed_tokens = None if cfg.micro_batch_tokens == "auto" else max(min_tokens, cfg.micro_batch_tokens)
    step_tokens = max(jobs * seq, seq)
    for ckpt in ckpt_options:  # without checkpointing first, where 'auto'
        room = usable - shared - max(update_bytes(fixed_tokens or min_tokens, ckpt), scratch(1))  # for the KV cache
        if cfg.rollout_kv_gib == "auto":
            slots = min(wanted, int(room // (per_slot * kv_token)))
            while slots > 0 and shared + slots * per_slot * kv_token + scratch(slots) > usable:
                slots -= 1
            fits = slots == wanted
        else:
            capped = max(1, round(cfg.rollout_kv_gib * GiB) // (per_slot * kv_token))  # as engine.slots_for
            slots = wanted if cfg.rollout_kv_gib == 0 else min(wanted, capped)
            fits = room >= slots * per_slot * kv_token
        if fits:
            break
    least = shared + grads + seq * activation_bytes(s, bf16, True) + head  # one checkpointed sequence: any setting's
    if least > usable:
        raise UsageError(
            f"--model: its weights, gradients and AdamW state and one sequence's update need {least / GiB:.1f} GiB, "
            f"more than the {usable / GiB:.1f} GiB usable on one device: use a smaller --model or "
            "--reasoning-vocab-size, shorter sequences (--max-new-tokens), or "
            + (
                "more memory (under --shard fsdp the sampling copy, the embeddings and the output layer are whole on "
                "every rank)"
                if fsdp
                else "--shard fsdp (the master, gradients and AdamW state split over the ranks)"
            )
        )
    chosen = update_bytes(fixed_tokens or min_tokens, ckpt)
    given = fixed_tokens is not None or cfg.gradient_checkpointing == "off"
    if given and shared + chosen + per_slot * kv_token > usable:  # what was given leaves no room for one slot
        if fixed_tokens is None:
            option = "--gradient-checkpointing off"
        else:
            option = f"--micro-batch-size {cfg.micro_batch_size}" if padded else f"--micro-batch-tokens {fixed_tokens}"
        raise UsageError(f"{option}: the update needs {chosen / GiB:.1f} GiB, too much beside the model's "
                         f"{shared / GiB:.1f} GiB and one rollout slot in {usable / GiB:.1f} GiB usable: lower it, or "
                         "leave the memory options at auto")  # fmt: skip
    if cfg.rollout_kv_gib != "auto" and shared + chosen + slots * per_slot * kv_token > usable:
        raise UsageError(f"--rollout-kv-gib {cfg.rollout_kv_gib}: {slots} slots ({slots * per_slot * kv_token / GiB:.1f} "
                         f"GiB) do not fit beside the model's {shared / GiB:.1f} GiB and one sequence's update in "
                         f"{usable / GiB:.1f} GiB usable: lower it, or use auto")  # fmt: skip
    if slots < 1:
        raise UsageError(
            f"--max-new-tokens {cfg.max_new_tokens}: with --max-prompt-len {cfg.max_prompt_len}, not even one rollout "
            f"slot ({per_slot * kv_token / GiB:.1f} GiB of KV cache) fits next to the model's {shared / GiB:.1f} GiB and "
            f"one sequence's update in {usable / GiB:.1f} GiB usable: shorten the sequences, use a smaller "
            "--reasoning-vocab-size, or more memory"
        )
    kv = slots * per_slot * kv_token
    if fixed_tokens is not None:
        tokens = fixed_tokens
    else:
        per_token = activation_bytes(s, bf16, ckpt)
        tokens = int((usable - shared - kv - update_bytes(0, ckpt)) // per_token)
        tokens = min(max(tokens, seq), step_tokens)
    parts.insert(-1, ("KV cache", kv, f"{slots} slots × {per_slot:,} tokens × {kv_token / 1024:.0f} KiB"))
    parts.append(("rollout scratch", scratch(slots), f"prefill of {slots} prompts, logits over {s.rows:,} rows"))
    how = f"{tokens:,} tokens × {activation_bytes(s, bf16, ckpt) / 1024:.0f} KiB (checkpointing {'on' if ckpt else 'off'})"
    parts.append(("update activations", update_bytes(tokens, ckpt) - grads, how + (", padded" if padded else "")))
    budget = 0 if padded else (cfg.micro_batch_tokens if fixed_tokens is not None else tokens)  # as given, if given
    plan = Plan(parts, usable, device, slots, kv / GiB, budget, ckpt)
    if plan.peak > usable:
        option = "--micro-batch-tokens" if fixed_tokens is not None and not padded else (
            "--micro-batch-size" if padded else "--rollout-kv-gib")  # fmt: skip
        raise UsageError(f"{option}: the step needs {plan.peak / GiB:.1f} GiB but {usable / GiB:.1f} GiB are usable "
                         f"({format_plan(plan).splitlines()[-1]}); lower it or use 'auto'")  # fmt: skip
    if slots < wanted:
        plan.notes.append(f"{slots} of the {wanted} slots asked for fit (--rollout-batch-size)")
    return plan


def plan_config(model: str):
    """The transformers config of --model without its weights: a directory's or the hub cache's config.json, a .gguf
    file's header (read with gguf, seconds), or a known Qwen3 size (QWEN3) when neither has it."""
    from transformers import AutoConfig, LlamaConfig

    if model.endswith(".gguf"):
        from gguf import GGUFReader

        reader = GGUFReader(model)
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

        def get(key: str, default=None):
            field_ = reader.fields.get(f"{arch}.{key}")
            return int(field_.parts[-1][0]) if field_ is not None else default

        tied = not any(t.name == "output.weight" for t in reader.tensors)
        heads, hidden = get("attention.head_count"), get("embedding_length")
        vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        return LlamaConfig(hidden_size=hidden, intermediate_size=get("feed_forward_length"),
                           num_hidden_layers=get("block_count"), num_attention_heads=heads,
                           num_key_value_heads=get("attention.head_count_kv"), vocab_size=vocab,
                           head_dim=get("attention.key_length", hidden // heads), tie_word_embeddings=tied)  # fmt: skip
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError):  # no config.json, or one without a model_type
        if model in QWEN3:
            return qwen3_config(model)
        raise UsageError(f"--model {model}: no model config.json found (a local directory, or a hub id in the local cache; "
                         f"known sizes without one: {', '.join(QWEN3)})") from None  # fmt: skip


def print_plan(cfg: Config) -> None:
    """`grpo.py --plan`: the plan for --model with these options on this machine's device, or on a card of
    --plan-memory-gib GiB (planned as a GPU), printed as a table."""
    import torch as th

    config = plan_config(cfg.model)
    shape = model_shape(config, cfg.reasoning_vocab_size)
    world_size = cfg.plan_ranks or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.plan_memory_gib:
        where = f"a {cfg.plan_memory_gib:g} GiB GPU (--plan-memory-gib)"
        plan = memory_plan(shape, cfg, "cuda", memory_gib=cfg.plan_memory_gib, world_size=world_size)
    else:
        device = th.device("cuda" if th.cuda.is_available() and cfg.device != "cpu" else "cpu")
        free = free_memory(device)
        where = f"{device.type}, {free / GiB:.1f} GiB free now"
        plan = memory_plan(shape, cfg, device.type, free_bytes=free, world_size=world_size)
    print(f"memory plan for {cfg.model} ({shape.params / 1e9:.2f} B parameters, {shape.rows:,} vocabulary rows with "
          f"--reasoning-vocab-size {cfg.reasoning_vocab_size}) on {where}, {world_size} rank(s)")  # fmt: skip
    print(format_plan(plan))


def format_plan(plan: Plan) -> str:
    """The plan as a table, the choices last (as options one could pass)."""
    lines = [f"{'part':<28}{'GiB':>8}  how"]
    for name, b, how in plan.parts:
        lines.append(f"{name:<28}{b / GiB:>8.2f}  {how}")
    lines.append(f"{'peak (rollout or update)':<28}{plan.peak / GiB:>8.2f}  of {plan.usable / GiB:.2f} GiB usable "
                 f"({MARGIN:.0%} margin)")  # fmt: skip
    lines += [f"note: {n}" for n in plan.notes]
    tokens = str(plan.update_tokens) if plan.update_tokens else "0 (padded)"
    lines.append(f"choices: --rollout-kv-gib {plan.kv_gib:.4g} ({plan.slots} slots) --micro-batch-tokens {tokens} "
                 f"--gradient-checkpointing {'on' if plan.checkpointing else 'off'}")  # fmt: skip
    return "\n".join(lines)


def free_memory(device) -> float:
    """Bytes free on `device` now: CUDA's free memory, or on CPU the available RAM shared by this node's ranks."""
    import torch as th

    if device.type == "cuda":
        return float(th.cuda.mem_get_info(device)[0])
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
