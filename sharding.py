"""--shard fsdp: the fp32 master weights, their gradients and AdamW's state split over the ranks with PyTorch's FSDP2
(`fully_shard`), for models whose 16 bytes per parameter do not fit one GPU.

    shard(model, device, bf16=True)        # each decoder layer, then the root (embeddings, final norm, output layer)
    logp = forward_call(model, fn, *args)  # fn(*args) with the sharded parameters gathered, as in a forward
    p_whole = full(p, th.bfloat16)         # a parameter's whole value, cast before the gather (rollout.copy_weights)

Each decoder layer is its own FSDP group, gathered in bf16 on GPU (MixedPrecisionPolicy: params bf16, gradients
reduced in fp32); the root group (the embeddings, tied or not to the output layer, the final norm) stays fp32, since
the output layer is the trainer's fp32 head (policy.lm_head_fp32). Gradients are reduce-scattered as sums (the loss
is already divided by the global counts, as under DDP; sum-only collectives: averaging on gloo has summed,
pytorch #162338). The trainer reaches parameters only inside `forward_call`, where FSDP has gathered them.
"""

from __future__ import annotations

from types import MethodType

import torch as th
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from distributed import world


def shard(model, device: th.device, bf16: bool):
    """Shard `model` in place over every rank (after its vocabulary is final and its checkpointing set), and return
    it. `bf16`: gather the decoder layers in bf16 (GPU training); else fp32 throughout."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    mesh = init_device_mesh(device.type, (world()[1],))
    layers = MixedPrecisionPolicy(param_dtype=th.bfloat16 if bf16 else None, reduce_dtype=th.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=layers)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=th.float32))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    model.fsdp_call = MethodType(lambda self, fn, *args: fn(*args), model)
    register_fsdp_forward_method(model, "fsdp_call")
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("sharding untied the embeddings from the output layer")
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def forward_call(model, fn, *args):
    """fn(*args), which calls `model`'s body and output layer: under FSDP inside a registered forward (every group's
    parameters gathered as its modules run, gradients reduce-scattered in backward); else directly."""
    return model.fsdp_call(fn, *args) if is_sharded(model) else fn(*args)


def full(p: th.Tensor, dtype: th.dtype | None = None) -> th.Tensor:
    """A parameter's (or a norm's) whole value (a collective for a sharded one: every rank calls it, in the same
    order), cast to `dtype` before the gather, so that a bf16 gather moves half the bytes."""
    p = p.detach() if dtype is None else p.detach().to(dtype)
    return p.full_tensor() if isinstance(p, DTensor) else p
