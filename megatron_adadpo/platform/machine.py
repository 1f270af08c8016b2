"""The one probe of the machine this process stands on (``resolve.Machine``), and its device.

``probe_machine`` asks torch and Transformer Engine once per process; everything else reads
the value (or the resolved run's ``device``), never ``torch.cuda.is_available`` again.
"""

from __future__ import annotations

import functools

from megatron_adadpo.platform.environment import module_available, te_available
from megatron_adadpo.platform.hardware import Machine


@functools.cache
def probe_machine() -> Machine:
    """This machine: CUDA, Transformer Engine (on CUDA), the GPU's facts, fused extensions,
    and what its megatron-core can be told (``packed_pad_flag``)."""
    import torch

    from megatron_adadpo.platform.megatron import MEGATRON_VERSION, PACKED_SEQ_TAKES_PAD_FLAG

    stack = {"megatron_core": MEGATRON_VERSION, "packed_pad_flag": PACKED_SEQ_TAKES_PAD_FLAG}
    if not torch.cuda.is_available():
        return Machine(**stack)
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return Machine(
        has_cuda=True,
        has_te=te_available(),
        gpu_name=torch.cuda.get_device_name(index),
        compute_capability=tuple(torch.cuda.get_device_capability(index)),
        gpu_memory_gib=props.total_memory / 2**30,
        fused_softmax=module_available("scaled_masked_softmax_cuda"),
        fused_weight_grad=module_available("fused_weight_gradient_mlp_cuda"),
        **stack,
    )


def torch_device(device: str | None = None):
    """The ``torch.device`` of a resolved ``device`` ("cuda": the current CUDA device, "cpu");
    None: this machine's (``probe_machine``)."""
    import torch

    device = device or probe_machine().device
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
