"""The machine a run is resolved for: what it has, not what the config asks (torch-free).

``platform/machine.probe_machine`` makes the value of the machine a process stands on (the one
place that asks torch and Transformer Engine); the planner makes it from a GPU kind of its
cluster description (``Machine.of_gpu``), so the trainer and the planner run the same resolver
(``resolve/resolver.py``) on the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.platform.hardware import GpuSpec

# Transformer Engine's FP8 GEMMs need FP8 tensor cores: Ada (8.9) / Hopper (9.0) and newer
# (TE ``check_fp8_support``: "Device compute capability 8.9 or higher required").
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Machine:
    """What one machine offers a run.

    Attributes:
        has_cuda: a CUDA device is visible (kernels run on it; the device is "cuda").
        has_te: Transformer Engine imports (``transformer_engine.pytorch``).
        gpu_name: the device's name (``torch.cuda.get_device_name()``), None without CUDA.
        compute_capability: ``torch.cuda.get_device_capability()``, None without CUDA.
        gpu_memory_gib: the device's memory, None without CUDA.
        fused_softmax: Megatron's ``scaled_masked_softmax_cuda`` extension is built.
        fused_weight_grad: apex's ``fused_weight_gradient_mlp_cuda`` extension is built.
        megatron_core: the installed megatron-core's version (None: not said; a described
            cluster runs the newest supported one).
        packed_pad_flag: megatron-core's ``PackedSeqParams`` takes ``pad_between_seqs``
            (0.19: ``packed_seq_params.py`` line 28; 0.16.1 has no such field).
    """

    has_cuda: bool = False
    has_te: bool = False
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    gpu_memory_gib: float | None = None
    fused_softmax: bool = False
    fused_weight_grad: bool = False
    megatron_core: str | None = None
    packed_pad_flag: bool = True

    @property
    def has_fp8(self) -> bool:
        """FP8 tensor cores (compute capability >= 8.9)."""
        cc = self.compute_capability
        return self.has_cuda and cc is not None and tuple(cc) >= FP8_MIN_CAPABILITY

    @property
    def device(self) -> str:
        """Where a run's tensors live: "cuda" or "cpu"."""
        return "cuda" if self.has_cuda else "cpu"

    @classmethod
    def of_gpu(cls, gpu: GpuSpec) -> Machine:
        """A described GPU node (the planner's cluster): CUDA, Transformer Engine and the fused
        kernels installed, the GPU kind's facts."""
        return cls(
            has_cuda=True,
            has_te=True,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            gpu_memory_gib=gpu.memory_gib,
            fused_softmax=True,
            fused_weight_grad=True,
        )


CPU = Machine()  # a machine without CUDA, Transformer Engine or fused kernels
