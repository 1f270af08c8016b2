"""Accelerator facts in one place: memory and dense peak TFLOP/s per GPU kind, and ``Machine``,
what one machine offers a run (the resolver's input: ``resolve/``).

Used by the planner (``megatron_adadpo.planner``; ``Machine.of_gpu``), by the trainer's MFU
logger (``peak_flops_per_device``) and by the one probe of this machine
(``platform/machine.probe_machine``). Pure Python (no torch import at module level).

Peaks are NVIDIA datasheet *dense* (no 2:4 sparsity) tensor-core figures for the SXM parts.
``memory_gib`` is what ``torch.cuda.get_device_properties(i).total_memory`` reports (GiB).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    """One GPU kind: its planner key, marketing name, memory and dense peak TFLOP/s."""

    key: str
    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None
    patterns: tuple[str, ...]  # lower-case substrings of torch.cuda.get_device_name()
    compute_capability: tuple[int, int]  # torch.cuda.get_device_capability()

    def peak_tflops(self, dtype: str = "bf16") -> float:
        if dtype in ("bf16", "fp16"):
            return self.bf16_tflops
        if dtype == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return self.fp8_tflops
        raise ValueError(f"dtype={dtype!r}; accepted: bf16, fp16, fp8")


# Order matters for name matching: more specific patterns first (H100 PCIe before H100).
GPUS: dict[str, GpuSpec] = {
    spec.key: spec
    for spec in (
        GpuSpec("h100-pcie", "H100 PCIe 80GB", 79.1, 756.0, 1513.0, ("h100 pcie",), (9, 0)),
        GpuSpec("h100", "H100 SXM 80GB", 79.1, 989.0, 1979.0, ("h100", "h800"), (9, 0)),
        GpuSpec("h200", "H200 SXM 141GB", 139.8, 989.0, 1979.0, ("h200",), (9, 0)),
        GpuSpec(
            "a100-40",
            "A100 SXM 40GB",
            39.4,
            312.0,
            None,
            ("a100-sxm4-40gb", "a100-pcie-40gb"),
            (8, 0),
        ),
        GpuSpec("a100", "A100 SXM 80GB", 79.1, 312.0, None, ("a100", "a800"), (8, 0)),
    )
}


def gpu_spec(name: str) -> GpuSpec:
    """The spec for a planner key (``h100``) or a device name (``NVIDIA H100 80GB HBM3``)."""
    spec = find_gpu(name)
    if spec is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return spec


def find_gpu(name: str) -> GpuSpec | None:
    """Match a key or a ``torch.cuda.get_device_name()`` string; None when unknown."""
    low = name.strip().lower()
    if low in GPUS:
        return GPUS[low]
    for spec in GPUS.values():
        if any(p in low for p in spec.patterns):
            return spec
    return None


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak TFLOP/s of a device (by key or device name) for ``dtype``; None if unknown.

    ``peak_flops_per_device`` (the trainer's MFU) calls it with the current device's name; MFU
    is conventionally quoted against the bf16 peak even for FP8 runs.
    """
    spec = find_gpu(device_name)
    if spec is None:
        return None
    try:
        return spec.peak_tflops(dtype)
    except ValueError:
        return None


def peak_flops_per_device(dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of this process's current CUDA device; NaN without CUDA or if unknown.

    The trainer's MFU denominator (``logging.peak_tflops`` in the config overrides it).
    """
    import torch  # lazy: importing this module needs no torch

    if not torch.cuda.is_available():
        return float("nan")
    tflops = peak_tflops(torch.cuda.get_device_name(torch.cuda.current_device()), dtype)
    return float("nan") if tflops is None else tflops * 1e12


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
