"""Kernels a run uses on a machine, and the rules they impose (torch-free).

Settled once per run by ``resolve``: the layer spec (``transformer_impl``: ``auto`` is
Transformer Engine on a CUDA machine that has it), the core attention (``attention``: ``auto``
is TE's with the TE spec, torch SDPA with the local spec), Megatron's fused kernels and FP8.
Every rule about kernels is written here once; ``machine=None`` (a config checked before any
machine is known) applies the rule to the best the config allows (``auto`` could be TE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_adadpo.layout import fp8_rows_multiple
from megatron_adadpo.platform.hardware import Machine

if TYPE_CHECKING:
    from megatron_adadpo.layout import ExecutionConfig


@dataclass(frozen=True)
class Fusions:
    """Megatron's fused kernels (``TransformerConfig`` fields of the same names)."""

    bias_activation: bool = False  # SwiGLU as one jit-fused op (saves only its input)
    bias_dropout: bool = False  # the fused residual bias-dropout-add
    apply_rope: bool = False  # Transformer Engine's fused RoPE (Megatron requires TE for it)
    masked_softmax: bool = False  # the local spec's fused softmax (its extension built)
    gradient_accumulation: bool = False  # weight-grad GEMMs into main_grad (apex extension)


@dataclass(frozen=True)
class Kernels:
    """The kernels of a run: layer spec, core attention, fusions, FP8 (see the module doc).

    Attributes:
        cuda: kernels run on a CUDA device (else the CPU, with Megatron's CPU initialisation).
        transformer_engine: the TE layer spec (else the local spec).
        attention: "transformer_engine" | "sdpa" | "megatron_local".
        fusions: the fused kernels on (all off on CPU or with ``execution.fusions: false``).
        fp8: the FP8 format (None: no FP8); ``fp8_recipe`` its scaling recipe.
        fp8_rows_multiple: rank-local rows every FP8 GEMM input needs (``layout.py``).
        split_norm_linears: TE spec linears built apart from their norm, for LoRA's adapters
            (``resolve/lora.split_norm_linears``).
    """

    cuda: bool = False
    transformer_engine: bool = False
    attention: str = "sdpa"
    fusions: Fusions = Fusions()
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_rows_multiple: int = 1
    split_norm_linears: tuple[str, ...] = ()


# Transformer Engine ``check_mxfp8_support``: "Device compute capability 10.0 or higher
# required for MXFP8 execution" (v2.8 transformer_engine/pytorch/fp8.py lines 48-55; v2.12
# quantization.py lines 62-69). Hopper (9.0) has no MXFP8 GEMMs.
MXFP8_MIN_CAPABILITY = (10, 0)


def fp8_recipe_error(recipe: str, capability: tuple[int, int], device: str) -> str | None:
    """Why ``device`` (compute capability ``capability``) cannot run FP8 ``recipe``, or None."""
    if recipe == "mxfp8" and tuple(capability) < MXFP8_MIN_CAPABILITY:
        major, minor = capability
        return (
            f"execution.fp8_recipe=mxfp8 needs compute capability >= 10.0 (Blackwell); {device} "
            f"has {major}.{minor}: use fp8_recipe=delayed, tensorwise or blockwise"
        )
    return None


def uses_transformer_engine(
    execution: ExecutionConfig, machine: Machine | None, unknown: bool = False
) -> bool:
    """``transformer_impl`` on ``machine``; without one, ``auto`` is ``unknown`` (True: could
    be TE, False: surely TE)."""
    if execution.transformer_impl == "auto":
        return unknown if machine is None else machine.has_cuda and machine.has_te
    return execution.transformer_impl == "transformer_engine"


def attention_impl(execution: ExecutionConfig, transformer_engine: bool) -> str:
    """``execution.attention``: ``auto`` is TE's attention with the TE spec, else SDPA."""
    if execution.attention != "auto":
        return execution.attention
    return "transformer_engine" if transformer_engine else "sdpa"


def fusions(execution: ExecutionConfig, machine: Machine, transformer_engine: bool) -> Fusions:
    """Megatron-LM's default fusions where ``machine`` has them (``model/build.py`` documents
    each); off on CPU, where Megatron would route them through ``torch.compile`` or raise."""
    fused = machine.has_cuda and execution.fusions
    return Fusions(
        bias_activation=fused,
        bias_dropout=fused,
        apply_rope=fused and transformer_engine,
        masked_softmax=fused and machine.fused_softmax,
        gradient_accumulation=fused and machine.fused_weight_grad,
    )


def resolve_kernels(execution: ExecutionConfig, machine: Machine) -> Kernels:
    """The kernels ``execution`` runs with on ``machine`` (after ``kernel_errors``)."""
    te = uses_transformer_engine(execution, machine)
    return Kernels(
        cuda=machine.has_cuda,
        transformer_engine=te,
        attention=attention_impl(execution, te),
        fusions=fusions(execution, machine, te),
        fp8=execution.fp8,
        fp8_recipe=execution.fp8_recipe,
        fp8_rows_multiple=fp8_rows_multiple(execution.fp8_recipe, execution.sequence_parallel)
        if execution.fp8
        else 1,
    )


def kernel_errors(execution: ExecutionConfig, machine: Machine | None, batching: str) -> list:
    """Every kernel rule ``execution`` breaks on ``machine`` (None: rules of the config alone),
    under ``data.batching``; each names the field and the fix. Without a machine a rule
    refuses only what no machine could run."""
    could_be_te = uses_transformer_engine(execution, machine, unknown=True)
    errors = _context_parallel_errors(execution, attention_impl(execution, could_be_te), batching)
    surely_te = uses_transformer_engine(execution, machine, unknown=False)
    attention = attention_impl(execution, surely_te)
    if batching == "packed" and attention == "transformer_engine" and not execution.bf16:
        errors.append(
            "data.batching=packed on Transformer Engine's attention runs the THD format, which "
            "has no fp32 attention backend: set execution.bf16=true, or data.batching="
            "token_budget"
        )
    if machine is not None:
        errors += _packed_pad_flag_errors(execution, machine, batching, attention)
    return errors + (_machine_errors(execution, machine) if machine is not None else [])


def _packed_pad_flag_errors(execution, machine: Machine, batching: str, attention: str) -> list:
    """Packed + CP on TE attention where ``PackedSeqParams`` cannot say ``pad_between_seqs``
    (megatron-core 0.16.1; 0.19.2 ``packed_seq_params.py`` line 28): TE <= 2.17 infers it False
    when only the last sequence is padded, common with every sequence padded to ``2 * CP``, and
    its ring attention mislabels that sequence's chunks (TE #3331;
    ``run/microbatch.thd_params``)."""
    if batching != "packed" or attention != "transformer_engine" or execution.cp == 1:
        return []
    if machine.packed_pad_flag:
        return []
    return [
        f"data.batching=packed with execution.cp={execution.cp} on megatron-core "
        f"{machine.megatron_core}: its PackedSeqParams cannot pass pad_between_seqs, which "
        "Transformer Engine <= 2.17 infers wrong when only the last sequence is padded (silently "
        "wrong attention, TE #3331); use data.batching=token_budget, or megatron-core >= 0.19"
    ]


def _context_parallel_errors(execution, attention: str, batching: str) -> list[str]:
    """The rule: context parallelism (and packed rows under it: TE's THD format) needs
    Transformer Engine's attention (Megatron's local and SDPA attention take no CP)."""
    if execution.cp == 1 or attention == "transformer_engine":
        return []
    if execution.transformer_impl == "local":
        why = "the local spec (execution.transformer_impl=local) has none"
    elif execution.attention != "auto":
        why = f"set execution.attention=auto (not {execution.attention})"
    else:
        why = "this machine has no Transformer Engine on a CUDA GPU"
    packed = batching == "packed"
    lead = "data.batching=packed with " if packed else ""
    fix = "data.batching=token_budget" if packed else "execution.cp=1"
    return [f"{lead}execution.cp > 1 needs Transformer Engine attention: {why}; or use {fix}"]


def _machine_errors(execution: ExecutionConfig, machine: Machine) -> list[str]:
    """What ``machine`` lacks for ``execution``: TE on CUDA, FP8 tensor cores, the recipe."""
    errors = []
    wants_te = execution.fp8 or execution.transformer_impl == "transformer_engine"
    if wants_te and not (machine.has_cuda and machine.has_te):
        errors.append(
            "execution.fp8 / transformer_impl=transformer_engine need Transformer Engine on "
            "a CUDA GPU (pip install 'megatron_adadpo[gpu]'); set execution.fp8=null and "
            "execution.transformer_impl=local to run without it"
        )
    if execution.fp8 and machine.has_cuda and machine.compute_capability is not None:
        if not machine.has_fp8:
            errors.append(
                f"execution.fp8={execution.fp8!r} needs FP8 tensor cores; {machine.gpu_name} "
                "has none"
            )
        name = machine.gpu_name or "this GPU"
        error = fp8_recipe_error(execution.fp8_recipe, machine.compute_capability, name)
        errors += [error] if error else []
    return errors
