"""The run's parallel shape and every rule it must satisfy (pure Python: no torch import).

``ExecutionConfig`` says how the model runs (TP / PP / VPP / CP, sequence parallel, precision,
recompute, kernels). ``layout_errors`` holds every rule a layout must satisfy, for the config's
validation (``megatron_adadpo.config``) and the planner (``megatron_adadpo.planner``) alike;
``pad_multiple`` is the sequence-length multiple the layout needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_adadpo.model.config import ModelConfig

RECOMPUTE_CHOICES = (None, "selective", "full")
FP8_CHOICES = (None, "hybrid", "e4m3")
# megatron/core/enums.py Fp8Recipe (0.16-0.19), less "custom" (a user-supplied TE recipe object)
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_ALGOS = ("max", "most_recent")  # TE DelayedScaling.amax_compute_algo
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
# TE's FP8 GEMM rule (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec, v2.2 - v2.9):
# every FP8 GEMM operand needs prod(shape[:-1]) % 8 == 0 and shape[-1] % 16 == 0.
FP8_ROWS_MULTIPLE = 8
FP8_COLS_MULTIPLE = 16
# TE v2.8 - v2.13 ``assert_dim_for_all_gather`` (utils.py: 2.8 line 444, 2.12 line 450): with
# sequence parallelism each TE linear's rank-local input must be ``quantizer.is_quantizable``:
# rows and last dim divisible by the block (mxfp8_tensor.py 2.8 lines 70-78,
# MXFP8_BLOCK_SCALING_SIZE = 32; float8_blockwise_tensor.py 2.8 lines 195-203, block_len 128).
FP8_SP_BLOCK = {"mxfp8": 32, "blockwise": 128}
ATTENTION_CHOICES = ("auto", "sdpa", "megatron_local")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the model runs: parallel layout, precision, recompute, kernels."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # virtual pipeline stages per pipeline rank (interleaved schedule)
    cp: int = 1
    sequence_parallel: bool = False
    bf16: bool = False
    fp8: str | None = None  # None | "hybrid" | "e4m3" (Transformer Engine)
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" | "mxfp8" | "blockwise"
    recompute: str | None = None  # None | "selective" | "full"
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"  # "auto" | "local" | "transformer_engine"
    # Output layer + log-probs over chunks of this many tokens (0: whole micro-batch; "auto":
    # from AUTO_CHUNK_BUDGET_BYTES, see logprob_chunk_tokens)
    logprob_chunk_tokens: int | str = 0
    # GPU kernels and FP8 scaling ---------------------------------------------------------------
    # Megatron's fused GPU kernels where this machine has them (SwiGLU, bias-dropout-add, RoPE,
    # masked softmax, gradient-accumulation GEMM; model/build.py ``kernel_fusions``); always off
    # on CPU. The planner's activation model follows it (unfused SwiGLU stores one more tensor).
    fusions: bool = True
    # FP8 delayed scaling (fp8_recipe "delayed"): amax window and reduction, scaling margin.
    # Defaults are Megatron-LM's Llama-3 FP8 example (examples/llama/train_llama3_8b_h100_fp8.sh).
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # "max" | "most_recent"
    fp8_margin: int = 0
    # core attention: "auto" (TE's with the TE spec, else torch SDPA) | "sdpa" | "megatron_local"
    attention: str = "auto"

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: ``tp * pp * cp``."""
        return self.tp * self.pp * self.cp

    @property
    def pad_multiple(self) -> int:
        return pad_multiple(
            self.tp, self.cp, self.sequence_parallel, fp8=bool(self.fp8), recipe=self.fp8_recipe
        )


def fp8_rows_multiple(recipe: str, sequence_parallel: bool) -> int:
    """Rank-local rows every FP8 GEMM input needs: 8 (``assert_dim_for_fp8_exec``), or with
    sequence parallelism the recipe's block (``FP8_SP_BLOCK``: mxfp8 32, blockwise 128)."""
    block = FP8_SP_BLOCK.get(recipe, 1) if sequence_parallel else 1
    return math.lcm(FP8_ROWS_MULTIPLE, block)


def pad_multiple(
    tp: int = 1,
    cp: int = 1,
    sequence_parallel: bool = False,
    fp8: bool = False,
    recipe: str = "delayed",
) -> int:
    """The multiple ``m`` the sequence length ``S`` is padded to: every ``S = k*m`` runs.

    Rules, with ``t = tp`` under sequence parallelism (else 1):

    - Megatron context parallelism cuts the sequence into ``2*cp`` equal chunks
      (``get_batch_on_this_cp_rank``): ``S % (2*cp) == 0`` when ``cp > 1``;
    - sequence parallelism scatters each rank's ``S/cp`` tokens over TP:
      ``(S/cp) % t == 0``;
    - FP8 (TE ``assert_dim_for_fp8_exec``): each GEMM input ``[S/cp/t, b, h]`` (the
      rank-local tensor, before the sequence-parallel all-gather) needs
      ``(S/cp/t) * b % 8 == 0``; this holds for every micro-batch size ``b`` (packed rows
      have ``b = 1``) when ``(S/cp/t) % 8 == 0``; with sequence parallelism the ``mxfp8`` /
      ``blockwise`` recipes need ``% 32`` / ``% 128`` (``fp8_rows_multiple``).

    Together: ``m = cp * lcm(2 if cp > 1 else 1, t * r)`` with ``r`` the FP8 rows multiple
    (1 without FP8), the smallest such multiple. E.g. TP8+SP, CP2, FP8: 128; TP2+SP: 2; CP2: 4.
    """
    rows = fp8_rows_multiple(recipe, sequence_parallel) if fp8 else 1
    local = (tp if sequence_parallel else 1) * rows
    return cp * math.lcm(2 if cp > 1 else 1, local)


AUTO_CHUNK_BUDGET_BYTES = 512 * 2**20  # one chunk's logit transients with "auto"
AUTO_CHUNK_MULTIPLE = 256  # "auto" chunks are a multiple of this many tokens (and at least it)


def chunk_bytes_per_logit(bf16: bool) -> int:
    """Transient bytes per ``[chunk, v/tp]`` element of the chunked output layer: the fp32
    logits (turned into the softmax, then the gradient, in place), plus in bf16 the bf16
    logits while they are cast and the bf16 gradient: 6 (4 in fp32)."""
    return 6 if bf16 else 4


def logprob_chunk_tokens(execution: ExecutionConfig, padded_vocab_size: int) -> int:
    """Tokens per chunk of the chunked output layer + log-prob path (0 = not chunked).

    A number is used as given; ``"auto"`` takes the largest multiple of
    ``AUTO_CHUNK_MULTIPLE`` tokens whose transients,
    ``chunk * padded_vocab_size / tp * chunk_bytes_per_logit``, fit in
    ``AUTO_CHUNK_BUDGET_BYTES`` (512 MiB), and at least ``AUTO_CHUNK_MULTIPLE``: a fixed
    budget, not the device's free memory, so a run's numerics do not depend on the machine.
    """
    value = execution.logprob_chunk_tokens
    if value != "auto":
        return int(value)
    per_token = padded_vocab_size // execution.tp * chunk_bytes_per_logit(execution.bf16)
    tokens = AUTO_CHUNK_BUDGET_BYTES // per_token // AUTO_CHUNK_MULTIPLE * AUTO_CHUNK_MULTIPLE
    return max(tokens, AUTO_CHUNK_MULTIPLE)


def data_parallel_size(execution: ExecutionConfig, world_size: int) -> int:
    """``world_size / (tp * pp * cp)``; call after ``layout_errors`` reported no world error."""
    return world_size // execution.model_parallel_size


def layout_errors(
    model: ModelConfig,
    execution: ExecutionConfig,
    *,
    micro_batch_size: int,
    global_batch_size: int,
    world_size: int | None = None,
    batching: str = "fixed",
) -> list[str]:
    """Every reason the layout cannot run, each naming the field and the fix (``[]`` = fine).

    Without ``world_size`` the rules that need it (divisibility of the world by TP*PP*CP, the
    global batch's rule, interleaved micro-batch count) are skipped. The global batch's rule
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
    if e.transformer_impl == "local":
        if e.cp > 1:
            errors.append(
                "execution.cp > 1 needs Transformer Engine attention (transformer_impl auto or "
                "transformer_engine); set execution.cp=1 for the local spec"
            )
        if e.fp8:
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
    if e.attention != "auto" and e.cp > 1:
        return [
            f"execution.cp > 1 needs Transformer Engine attention; set execution.attention=auto "
            f"(not {e.attention}) or execution.cp=1"
        ]
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
