"""Every rule a run's layout must satisfy (pure Python: no torch import).

``layout_errors`` lists every reason a layout (``ExecutionConfig``: TP / PP / VPP / CP, sequence
parallel, precision, kernels) cannot run with the model and batch sizes, on a world size and a
machine when they are known; the resolver (``resolve/resolver.py``) and the planner read it.
The kernel rules (context parallelism's attention, Transformer Engine, FP8 on the machine) are
``resolve/kernels.py``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_adadpo.layout import (
    ATTENTION_CHOICES,
    FP8_AMAX_ALGOS,
    FP8_CHOICES,
    FP8_COLS_MULTIPLE,
    FP8_RECIPES,
    FP8_ROWS_MULTIPLE,
    FP8_SP_BLOCK,
    RECOMPUTE_CHOICES,
    TRANSFORMER_IMPLS,
    ExecutionConfig,
)
from megatron_adadpo.platform.hardware import Machine
from megatron_adadpo.resolve.kernels import kernel_errors

if TYPE_CHECKING:
    from megatron_adadpo.model.config import ModelConfig


def layout_errors(
    model: ModelConfig,
    execution: ExecutionConfig,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    world_size: int | None = None,
    batching: str = "fixed",
    machine: Machine | None = None,
) -> list[str]:
    """Every reason the layout cannot run, each naming the field and the fix (``[]`` = fine).

    The kernel rules (``resolve/kernels.kernel_errors``) apply on ``machine``, or without one
    to the best the config allows. Without ``world_size`` the rules that need it (divisibility
    of the world by TP*PP*CP, the global batch's rule, interleaved micro-batch count) are
    skipped. The global batch's rule
    depends on ``batching`` (``data.batching``): ``fixed`` runs ``G / (micro_batch_size * DP)``
    micro-batches per rank (Megatron's ``MegatronPretrainingSampler`` layout), so ``G`` must be
    divisible by ``micro_batch_size * DP`` (and the count by PP when interleaved);
    ``token_budget`` / ``packed`` ignore ``micro_batch_size`` and hand each step's own
    micro-batch count to the schedule (``num_microbatches``, no Megatron num-microbatches
    calculator), so ``G >= DP`` (every rank gets a pair: ``data/batching.deal_by_tokens``), and
    ``G`` divisible by ``DP * PP`` when interleaved (equal pair counts per rank, a multiple of
    PP, so that ``_split_to_multiple`` can always reach a multiple of PP micro-batches).
    """
    sizes = {"execution.tp": execution.tp, "execution.pp": execution.pp}
    sizes |= {"execution.cp": execution.cp}
    sizes |= {"train.micro_batch_size": micro_batch_size}
    sizes |= {"train.global_batch_size": global_batch_size}
    bad = [f"{k}={v!r} must be a positive integer" for k, v in sizes.items() if not _positive(v)]
    if bad:
        return bad
    errors = _model_errors(model, execution) + _choice_errors(execution)
    errors += _chunk_errors(execution)
    errors += _fp8_errors(model, execution)
    errors += _attention_errors(execution)
    if execution.attention in ATTENTION_CHOICES:
        errors += kernel_errors(execution, machine, batching)
    if world_size is not None:
        errors += _world_errors(
            execution, world_size, micro_batch_size, global_batch_size, batching
        )
    return errors


def _model_errors(model: ModelConfig, e: ExecutionConfig) -> list[str]:
    errors = []
    if model.num_attention_heads % e.tp or model.query_groups % e.tp:
        errors.append(
            f"execution.tp={e.tp} must divide model.num_attention_heads="
            f"{model.num_attention_heads} and model.num_query_groups={model.query_groups}"
        )
    stages = e.pp * (e.vpp or 1)
    if model.num_layers % stages:
        errors.append(
            f"model.num_layers={model.num_layers} must be divisible by execution.pp*vpp = {stages}"
        )
    return errors


def _choice_errors(e: ExecutionConfig) -> list[str]:
    errors = []
    if e.vpp is not None and (e.vpp < 2 or e.pp < 2):
        errors.append("execution.vpp (virtual stages) needs vpp >= 2 and pp >= 2, or null")
    if e.sequence_parallel and e.tp == 1:
        errors.append("execution.sequence_parallel needs execution.tp > 1")
    if e.recompute not in RECOMPUTE_CHOICES:
        errors.append(f"execution.recompute={e.recompute!r}; accepted: null, selective, full")
    if e.recompute_num_layers < 1:
        errors.append(f"execution.recompute_num_layers={e.recompute_num_layers} must be >= 1")
    if e.transformer_impl not in TRANSFORMER_IMPLS:
        errors.append(
            f"execution.transformer_impl={e.transformer_impl!r}; accepted: "
            "auto, local, transformer_engine"
        )
    if e.fp8 not in FP8_CHOICES:
        errors.append(f"execution.fp8={e.fp8!r}; accepted: null, hybrid, e4m3")
    if e.transformer_impl == "local" and e.fp8:
        errors.append(
            "execution.fp8 needs Transformer Engine (transformer_impl auto or "
            "transformer_engine); set execution.fp8=null for the local spec"
        )
    return errors


def _chunk_errors(e: ExecutionConfig) -> list[str]:
    chunk = e.logprob_chunk_tokens
    if chunk == "auto" or _positive(chunk) or (type(chunk) is int and chunk == 0):
        return []
    return [
        f"execution.logprob_chunk_tokens={chunk!r}; accepted: 0 (off), a positive number of "
        "tokens per chunk, or auto"
    ]


def _fp8_errors(model: ModelConfig, e: ExecutionConfig) -> list[str]:
    """FP8 options, and the model dimensions TE's FP8 GEMMs accept (``assert_dim_for_fp8_exec``
    on each TE linear's input ``[rows, in]`` and weight ``[out/tp, in]``: ``in % 16``,
    ``out % 8``)."""
    errors = []
    if e.fp8_recipe not in FP8_RECIPES:
        errors.append(f"execution.fp8_recipe={e.fp8_recipe!r}; accepted: {', '.join(FP8_RECIPES)}")
    if e.fp8_amax_compute_algo not in FP8_AMAX_ALGOS:
        errors.append(
            f"execution.fp8_amax_compute_algo={e.fp8_amax_compute_algo!r}; accepted: max, "
            "most_recent"
        )
    if not _positive(e.fp8_amax_history_len):
        errors.append(f"execution.fp8_amax_history_len={e.fp8_amax_history_len!r} must be >= 1")
    if not isinstance(e.fp8_margin, int) or e.fp8_margin < 0:
        errors.append(f"execution.fp8_margin={e.fp8_margin!r} must be an integer >= 0")
    if not e.fp8 or model.num_attention_heads % e.tp or model.query_groups % e.tp:
        return errors
    h, d, t = model.hidden_size, model.head_dim, e.tp
    gemm_inputs = {  # the last dim of each FP8 GEMM input: hidden (qkv, fc1), proj, fc2
        "model.hidden_size": h,
        "model.num_attention_heads*head_dim/tp": model.num_attention_heads * d // t,
        "model.ffn_hidden_size/tp": model.ffn_hidden_size / t,
    }
    for name, value in gemm_inputs.items():
        if value % FP8_COLS_MULTIPLE:
            errors.append(
                f"execution.fp8 needs {name} = {value:g} divisible by {FP8_COLS_MULTIPLE} "
                "(Transformer Engine FP8 GEMM rule); use execution.fp8=null or another tp"
            )
    block = FP8_SP_BLOCK.get(e.fp8_recipe) if e.sequence_parallel else None
    if block and h % block:
        errors.append(
            f"execution.fp8_recipe={e.fp8_recipe} with sequence_parallel needs model.hidden_size "
            f"= {h} divisible by {block} (Transformer Engine's all-gather rule); use another "
            "fp8_recipe"
        )
    qkv_rows = (model.num_attention_heads + 2 * model.query_groups) * d // t
    if qkv_rows % FP8_ROWS_MULTIPLE:
        errors.append(
            f"execution.fp8 needs the QKV weight's {qkv_rows} rows per TP rank divisible by "
            f"{FP8_ROWS_MULTIPLE} (Transformer Engine FP8 GEMM rule); use execution.fp8=null"
        )
    return errors


def _attention_errors(e: ExecutionConfig) -> list[str]:
    if e.attention not in ATTENTION_CHOICES:
        return [f"execution.attention={e.attention!r}; accepted: auto, sdpa, megatron_local"]
    return []


def _world_errors(
    e: ExecutionConfig, world: int, micro: int, global_batch: int, batching: str
) -> list[str]:
    model = e.model_parallel_size
    if world % model:
        return [
            f"{world} processes are not divisible by execution.tp*pp*cp = {model}; launch a "
            "multiple of it or change the layout"
        ]
    dp = world // model
    if batching != "fixed":
        return _budget_batch_errors(e, dp, global_batch, batching)
    if global_batch % (micro * dp):
        return [
            f"train.global_batch_size={global_batch} must be divisible by "
            f"train.micro_batch_size*DP = {micro}*{dp}"
        ]
    num_micro = global_batch // (micro * dp)
    if e.vpp and num_micro % e.pp:
        return [
            f"the interleaved schedule needs the number of micro-batches ({num_micro}) to be a "
            f"multiple of execution.pp={e.pp}; change train.global_batch_size"
        ]
    return []


def _budget_batch_errors(e: ExecutionConfig, dp: int, global_batch: int, mode: str) -> list:
    """The global batch's rule under ``token_budget`` / ``packed`` (see ``layout_errors``)."""
    if e.vpp and global_batch % (dp * e.pp):
        return [
            f"train.global_batch_size={global_batch} must be divisible by DP*execution.pp = "
            f"{dp}*{e.pp} under data.batching={mode} with the interleaved schedule (each "
            "data-parallel rank's pairs form a multiple of PP micro-batches)"
        ]
    if global_batch < dp:
        return [
            f"train.global_batch_size={global_batch} must be at least DP = {dp} under "
            f"data.batching={mode} (every data-parallel rank needs a pair)"
        ]
    return []


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
