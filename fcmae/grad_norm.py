"""The global gradient norm of an optimizer step, clipped when asked, with little host work.

On one process and under DDP (gradients already averaged, whole on every process) the norm is one foreach
norm over the gradients and one norm of those norms, and clipping is skipped when there is no limit.
Accelerate's ``clip_grad_norm_`` does the same arithmetic but groups the tensors by device and dtype,
checks each one for a DTensor and moves each norm to the first device, every step: on an H200 it took
2.5 ms of host time per step of convnextv2_tiny (bf16, CUDA graphs), about a fifth of the loop's host work,
which bounds the loop on real input (call 83 in docs/input_pipeline_measurements.md). Where gradients are
sharded or synchronised elsewhere (FSDP, DeepSpeed, XLA, Megatron-LM), accelerate's method, which knows
them, does the work, and so it does for gradients spread over several devices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

SHARDED = frozenset({DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA,
                     DistributedType.MEGATRON_LM})
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def clip_gradients(accelerator: Accelerator, parameters: Iterable[nn.Parameter], max_norm: float | None) -> Tensor:
    """The L2 norm of all of ``parameters``' gradients taken together, before clipping; with ``max_norm``,
    the gradients are then scaled by ``min(1, max_norm / (norm + 1e-6))``, as torch's ``clip_grad_norm_``.
    Under fp16 the gradients are unscaled first (accelerate's scaler).

    Returns:
        () float32 tensor on the gradients' device (0 when no parameter has a gradient); a non-finite
        norm is returned, not raised.
    """
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if accelerator.distributed_type in SHARDED or len({g.device for g in grads}) > 1:
        return accelerator.clip_grad_norm_(parameters, max_norm if max_norm is not None else float("inf"))
    if not grads:
        return torch.zeros((), device=accelerator.device)
    accelerator.unscale_gradients()
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    if max_norm is not None:
        torch._foreach_mul_(grads, (max_norm / (norm + CLIP_EPS)).clamp(max=1.0))
    return norm
