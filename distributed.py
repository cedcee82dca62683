"""Data parallelism under torchrun, and preemption: every rank samples its own prompts; gradients and counts are
summed over ranks; a SLURM signal on any rank stops every rank at the same safe point.

    device = setup_distributed("auto")       # joins the process group when torchrun started us (NCCL/gloo)
    rank, world_size = world()
"""

from __future__ import annotations

import os
import re
import signal
import threading
from datetime import timedelta
from pathlib import Path

import torch as th
import torch.distributed as dist

from config import UsageError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: th.Tensor) -> th.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max(t: th.Tensor) -> th.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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


def pick_device(name: str) -> th.device:
    """The device for --device NAME: 'auto' is CUDA when torch can use it, else CPU. A job that was given GPUs
    (CUDA_VISIBLE_DEVICES, SLURM's GPU variables) or asked for 'cuda' never falls back to CPU silently."""
    if th.cuda.is_available():
        return th.device("cuda" if name == "auto" else name)
    if name.startswith("cuda") or (name == "auto" and gpus_given()):
        raise UsageError(gpu_unusable(name))
    return th.device("cpu")


def gpus_given() -> str | None:
    """The environment variable that says this job has GPUs (CUDA_VISIBLE_DEVICES, SLURM_GPUS_ON_NODE, ...), or None."""
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        value = os.environ.get(var, "").strip()
        no_gpu = ("", "-1", "NoDevFiles") + (("0",) if var == "SLURM_GPUS_ON_NODE" else ())  # a count there
        if value not in no_gpu:
            return f"{var}={value}"
    return None


def gpu_unusable(name: str) -> str:
    """Why torch cannot use the GPUs this job asked for or was given, with torch's CUDA and the driver's."""
    version = Path("/proc/driver/nvidia/version")
    found = re.search(r"\d+\.\d+(\.\d+)?", version.read_text()) if version.is_file() else None
    driver = f"NVIDIA driver {found.group()}" if found else "no NVIDIA driver found"
    why = f"--device {name}" if name != "auto" else f"GPUs were given ({gpus_given()})"
    return (f"{why} but torch {th.__version__} cannot use CUDA (torch built for CUDA {th.version.cuda}; {driver}). "
            "If the driver is older than torch's CUDA, install a torch build for the driver's CUDA (README: "
            "'GPU clusters'); for a CPU run pass --device cpu.")  # fmt: skip


_device = th.device("cpu")  # the collectives' device (CUDA under NCCL), set by setup_distributed


def setup_distributed(device_name: str = "auto", timeout_s: float = 7200) -> th.device:
    """Join the torchrun process group when launched by torchrun (NCCL on GPU, gloo on CPU); pick the device.
    `timeout_s`: how long a collective waits for the slowest rank (rank 0 writing a checkpoint, an evaluation)."""
    global _device
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            device = th.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            th.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    _device = device
    return device


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def teardown_distributed() -> None:
    if world()[1] > 1:
        dist.destroy_process_group()


PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM's warning signal before a time limit, and preemption
_preempted = threading.Event()


def _on_preempt(signum, frame):
    """The first preemption signal sets the flag; later ones are ignored from then on. SLURM signals every process of
    the step and launch.sh forwards the signal too, so a second one can arrive while the interpreter exits, when
    Python has put its handlers back to the default (which would kill a rank that checkpointed cleanly); an ignored
    signal stays ignored through the exit."""
    _preempted.set()
    signal.signal(signum, signal.SIG_IGN)


def catch_preemption() -> None:
    """Turn SIGUSR1/SIGTERM into a flag that the training loop polls (main thread only: signals need it)."""
    if threading.current_thread() is threading.main_thread():
        _preempted.clear()
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, _on_preempt)


def stop_requested() -> bool:
    """Whether this rank has received a preemption signal (local, no collective: for polling inside a rollout)."""
    return _preempted.is_set()


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank. A collective: every rank calls it at the same points."""
    return bool(all_reduce_sum(th.tensor([float(flag)], device=_device)) > 0)


def preempted() -> bool:
    """Whether any rank has received a preemption signal. A collective: every rank calls it at the same points."""
    return any_rank(_preempted.is_set())
