"""Models in and out: loading a model (hub id, directory or .gguf), atomic checkpoints with rotation, and resuming.

A checkpoint `<output_dir>/checkpoints/step_NNNNNN/` is a plain transformers checkpoint (safetensors) plus the
tokenizer, `reasoning_token_map.json`, `trainer_config.json` and `trainer_state.pt` (optimizer, scheduler, RNG, step).
It is written to a temporary directory and renamed into place, so a crash never leaves a half one. Resuming checks a
checkpoint before trusting it (`checkpoint_problem`: files present and whole, the state plain data) and falls back to
the newest intact one; a damaged checkpoint is never deleted (one in the way of a new save is renamed damaged_…).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

import torch as th
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import vocab as rvocab
from config import UsageError, check_model_source
from distributed import barrier, world
from logs import write_json
from sharding import is_sharded


def load_model_and_tokenizer(path: str, device: th.device, option: str = "model"):
    """A causal LM in fp32 (master weights) and its tokenizer, from a hub id, a directory or a .gguf file. `option`
    names the command-line option it came from, for the one-line error when it cannot be loaded."""
    check_model_source(option, path)
    shown, kwargs = path, {}
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = str(Path(path).parent), Path(path).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=th.float32, **kwargs).to(device)
    except OSError as e:  # transformers' message for an unreachable hub or a missing repo: its first line is the point
        raise UsageError(
            f"--{option.replace('_', '-')} {shown}: cannot load it: {str(e).strip().splitlines()[0]}"
        ) from e
    if "gguf_file" in kwargs:  # dequantized to fp32 on load: a plain model from here on, saved as safetensors
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return rvocab.check_tied(model), tokenizer


def decoder_checkpointing(model, on: bool) -> None:
    """Recompute the decoder layers in backward (activation checkpointing: memory) or not; transformers renamed the
    switch during 5.x."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{name}_checkpointing_{'enable' if on else 'disable'}")()


def frozen_copy(model):
    """A frozen copy of `model` (the reference policy), with the same (possibly expanded) vocabulary."""
    ref = AutoModelForCausalLM.from_config(model.config).to(model.device)
    ref.load_state_dict(model.state_dict())
    return rvocab.check_tied(ref).requires_grad_(False).eval()


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The checkpoints (renamed into place atomically), oldest first; see checkpoint_problem for damaged ones."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=step_of)


def step_of(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.split("_")[1])


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, vocab, optimizer, scheduler, *, config: dict, keep_last: int,
    final_step: int, usage: th.Tensor | None = None,
) -> Path:  # fmt: skip
    """Write the checkpoint to a temporary directory, then rename it into place; keep step 0, `final_step` and the
    last `keep_last` checkpoints. `config` (the run's options) goes to trainer_config.json; `usage`, the per-copy
    sample counts of a reasoning vocabulary, to trainer_state.pt and <output_dir>/reasoning_usage.json (for
    plots.py). Under torchrun rank 0 writes and every rank waits for it; a sharded model's weights and optimizer state
    are first gathered, tensor by tensor, by every rank (into rank 0's memory)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = None
    if is_sharded(model):
        weights, names = get_model_state_dict(model, options=options), {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied ones once, as save_pretrained writes
            if names.setdefault(id(p), name) != name:
                weights.pop(name, None)
    optim = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name: DDP ⇄ FSDP
    if world()[0] == 0:
        _write_checkpoint(output_dir, step, model, weights, tokenizer, vocab, optim, scheduler, config, keep_last,
                          final_step, usage)  # fmt: skip
    barrier()
    return output_dir / "checkpoints" / f"step_{step:06d}"


def _write_checkpoint(output_dir, step, model, weights, tokenizer, vocab, optim, scheduler, config, keep_last,
                      final_step, usage):  # fmt: skip
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every save
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    if vocab is not None:
        rvocab.save_map(vocab, tmp)
    (tmp / "trainer_config.json").write_text(json.dumps(config, indent=2))
    state = {
        "step": step,
        "optimizer": optim,
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": th.get_rng_state()},
    }
    if th.cuda.is_available():
        state["rng"]["cuda"] = th.cuda.get_rng_state_all()
    if usage is not None:
        state["reasoning_usage"] = usage.clone()
    th.save(state, tmp / "trainer_state.pt")
    if final_dir.exists() and (problem := checkpoint_problem(final_dir)):  # a damaged one is kept, renamed aside
        aside = root / f"damaged_{final_dir.name}_{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(final_dir, aside)
        print(f"[checkpoint] {final_dir} was damaged ({problem}): moved to {aside}", file=sys.stderr, flush=True)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(tmp, final_dir)
    if usage is not None:  # sparse: copy index → times sampled, up to this step
        counts = {str(i): int(usage[i]) for i in usage.nonzero().flatten().tolist()}
        write_json(output_dir / "reasoning_usage.json", {"step": step, "copies": len(usage), "counts": counts})

    # Rotation among the intact checkpoints up to this step: damaged ones are never deleted nor counted, and later
    # ones (a future this run will write again) are left alone.
    done = [d for d in checkpoint_dirs(output_dir) if step_of(d) <= step and checkpoint_problem(d) is None]
    recent = set(done[-keep_last:]) if keep_last > 0 else set()
    for d in done:
        if d not in recent and step_of(d) not in (0, final_step):
            shutil.rmtree(d)


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing or cut short, a state file holding more than plain
    data), or None when it is intact. Cheap: headers, sizes and a memory-mapped load of the state, no weights read."""
    d = Path(checkpoint_dir)
    for name in ("config.json", "trainer_config.json", "trainer_state.pt"):
        if not (d / name).is_file():
            return f"{name} is missing"
    weights = [d / "model.safetensors"]
    if (index := d / "model.safetensors.index.json").is_file():  # sharded
        try:
            weights = [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError) as e:
            return f"{index.name} is unreadable ({e})"
    for path in weights:
        if problem := safetensors_problem(path):
            return problem
    try:
        th.load(d / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a cut-short zip, or pickled code (refused by weights_only)
        return f"trainer_state.pt is unreadable or not plain data ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (missing, bad header, shorter or longer than its header says), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (OSError, ValueError, struct.error):
        header = None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        header = None
    if header is None:
        return f"{path.name} has no readable header"
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes, its header says {8 + n + end}"
    return None


def find_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume` is 'auto' (the newest intact one in output_dir, if any: damaged ones
    are named in a warning and left in place), 'off', or a checkpoint path (which must be intact)."""
    if resume == "off":
        return None
    if resume != "auto":
        if problem := checkpoint_problem(Path(resume)):
            raise UsageError(f"--resume {resume}: {problem}")
        return Path(resume)
    damaged = []
    for d in reversed(checkpoint_dirs(output_dir)):
        if not (problem := checkpoint_problem(d)):
            if damaged and world()[0] == 0:
                print(f"[grpo] WARNING: skipping damaged checkpoint(s) {'; '.join(damaged)} (left in place); "
                      f"resuming from {d}", file=sys.stderr, flush=True)  # fmt: skip
            return d
        damaged.append(f"{d}: {problem}")
    if damaged:
        raise UsageError(f"every checkpoint in {Path(output_dir) / 'checkpoints'} is damaged ({'; '.join(damaged)}): "
                         "repair or move them, or start over with --resume off")  # fmt: skip
    return None


def restore_trainer_state(checkpoint_dir: Path, model, optimizer, scheduler, usage: th.Tensor | None = None) -> int:
    """Load the optimizer (into `model`'s parameters, sharded or not), scheduler and RNG states saved with a checkpoint
    (plain data only: weights_only, so a state file cannot run code), and into `usage` the per-copy sample counts if
    it has them; returns its step."""
    state = th.load(checkpoint_dir / "trainer_state.pt", map_location="cpu", weights_only=True)
    optim = state["optimizer"]
    if any(isinstance(k, str) for k in optim["state"]):  # keyed by parameter name (get_optimizer_state_dict)
        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
    else:  # no state yet (step 0), or keyed by index (checkpoints of older versions, unsharded)
        optimizer.load_state_dict(optim)
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    th.set_rng_state(state["rng"]["torch"])
    if usage is not None and "reasoning_usage" in state:
        usage.copy_(state["reasoning_usage"])
    return state["step"]
