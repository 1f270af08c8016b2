"""The run's parallel shape (pure Python: no torch import).

``ExecutionConfig`` says how the model runs (TP / PP / VPP / CP, sequence parallel, precision,
recompute, kernels); ``pad_multiple`` is the sequence-length multiple the layout needs and
``logprob_chunk_tokens`` the rule that settles ``auto`` chunks. The rules a layout must
satisfy are ``resolve/layout.py``'s (``layout_errors``); the resolver settles every choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
