"""The one Megatron seam (``platform/megatron.py``, and ``safe_dcp.py`` for loading): only it
imports Megatron; its wrappers around what Megatron has no public API for behave as documented
on this version (the GPU check script runs the same checks on megatron-core 0.19); light modules
stay light."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launcher import run_ranks

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_adadpo"
SEAM = PACKAGE / "platform" / "megatron.py"
# The seam's parts for loading checkpoints without running their code (Megatron's load
# strategy) and for Megatron's optimizer.
SEAMS = (SEAM, PACKAGE / "platform" / "safe_dcp.py", PACKAGE / "platform" / "megatron_optimizer.py")


def test_only_the_seam_imports_megatron():
    pattern = re.compile(r"^\s*(from megatron[. ]|import megatron\b)", re.M)
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path not in SEAMS and pattern.search(path.read_text())
    ]
    assert offenders == []


def test_config_imports_neither_megatron_nor_torch():
    code = (
        "import sys, megatron_adadpo.config, megatron_adadpo.layout, megatron_adadpo.model.config\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')]\n"
        "print(len(heavy), heavy[:5])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("0 "), out.stdout


def _hf_llama3_inv_freq(base, dim, factor, low, high, original_max):
    """HF ``_compute_llama3_parameters`` written out in fp64 (transformers' rope utils)."""
    inv = [1.0 / base ** (i / dim) for i in range(0, dim, 2)]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < original_max / high:
            out.append(f)
        elif wavelen > original_max / low:
            out.append(f / factor)
        else:
            smooth = (original_max / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def _rope_inv_freq(rank, world, scaling):
    import dataclasses

    from megatron_adadpo.layout import ExecutionConfig
    from tests.megatron_helpers import TINY, tiny_model

    model = dataclasses.replace(TINY, rotary_base=500000.0, rope_scaling=scaling)
    chunks = tiny_model(ExecutionConfig(transformer_impl="local"), model)
    return chunks[0].rotary_pos_emb.inv_freq


@pytest.mark.distributed
@pytest.mark.parametrize(
    "scaling",
    [
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},  # Llama 3.1: GPTModel's public arguments
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},  # Llama 3.2
        {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 6.0,
         "original_max_position_embeddings": 64},  # other parameters: the seam's fallback
    ],
)  # fmt: skip
def test_llama3_rope_scaling_matches_hf_formula(scaling):
    inv_freq = run_ranks(_rope_inv_freq, 1, scaling)[0]
    expected = _hf_llama3_inv_freq(
        500000.0,
        16,  # head dim of the tiny model
        scaling["factor"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
        scaling["original_max_position_embeddings"],
    )
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert not torch.allclose(expected, _hf_llama3_inv_freq(500000.0, 16, 1.0, 1.0, 4.0, 8192))


def _cross_entropy_groups(rank, world):
    import torch.distributed as dist

    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.platform.distributed import init_model_parallel
    from megatron_adadpo.platform.megatron import vocab_parallel_cross_entropy

    groups = init_model_parallel(ExecutionConfig())
    logits = torch.randn(3, 2, 8)
    target = torch.randint(0, 8, (3, 2))
    expected = -torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    same = vocab_parallel_cross_entropy(logits.clone(), target, groups.tp)
    default = vocab_parallel_cross_entropy(logits.clone(), target)
    try:
        vocab_parallel_cross_entropy(logits.clone(), target, dist.new_group([0]))
        foreign = "accepted"
    except ValueError as err:
        foreign = str(err)
    return same, default, expected, foreign


@pytest.mark.distributed
def test_cross_entropy_never_drops_its_group():
    from megatron_adadpo.platform.megatron import _VPCE_TAKES_TP_GROUP

    same, default, expected, foreign = run_ranks(_cross_entropy_groups, 1)[0]
    torch.testing.assert_close(same, expected)
    torch.testing.assert_close(default, expected)
    if _VPCE_TAKES_TP_GROUP:  # megatron-core >= 0.17 reduces over the group it is given
        assert foreign == "accepted"
    else:
        assert "reduces over parallel_state's tensor-parallel group only" in foreign


def test_save_strategy_sets_writer_threads():
    from megatron_adadpo.platform.megatron import dist_checkpointing, save_strategy

    default = dist_checkpointing.serialization.get_default_save_sharded_strategy()
    strategy = save_strategy(thread_count=7)
    assert type(strategy) is type(default) and strategy.thread_count == 7
    assert (strategy.backend, strategy.version) == (default.backend, default.version)


def _final_hidden_states(rank, world, tied):
    import dataclasses

    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.platform.megatron import final_hidden_states, output_layer_weight
    from tests.megatron_helpers import TINY, tiny_model

    model = dataclasses.replace(TINY, tie_word_embeddings=tied)
    gpt = tiny_model(ExecutionConfig(transformer_impl="local"), model)[0]
    tokens = torch.randint(0, model.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10).expand(2, -1)
    logits = gpt(tokens, positions, None)  # [b, s, v]
    hidden = final_hidden_states(gpt, tokens, positions, None)  # [s, b, h]
    weight, sequence_parallel = output_layer_weight(gpt)
    expected = gpt.embedding.word_embeddings.weight if tied else gpt.output_layer.weight
    out = {
        "logits": logits.detach(),
        "from_hidden": torch.einsum("sbh,vh->bsv", hidden, weight).detach(),
        "weight_is_expected": weight is expected,
        "sequence_parallel": sequence_parallel,
        "logits_after": gpt(tokens, positions, None).detach(),  # the model is left intact
    }
    gpt.output_layer.gather_output = True  # a full-vocab output the chunked path cannot give
    try:
        output_layer_weight(gpt)
        out["refusal"] = "accepted"
    except ValueError as err:
        out["refusal"] = str(err)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tied", [False, True])
def test_final_hidden_states_are_the_output_layers_input(tied):
    out = run_ranks(_final_hidden_states, 1, tied)[0]
    torch.testing.assert_close(out["from_hidden"], out["logits"], rtol=1e-5, atol=1e-5)
    assert out["weight_is_expected"] and out["sequence_parallel"] is False
    assert "set execution.logprob_chunk_tokens=0" in out["refusal"]
    assert torch.equal(out["logits_after"], out["logits"])


def test_hidden_states_processor_takes_gpt_model_0_19_arguments():
    """megatron-core 0.19.0 ``gpt_model.py`` ``_postprocess`` calls ``output_processor`` with
    these keyword arguments only; the seam's processor must return ``hidden_states`` as is."""
    from megatron_adadpo.platform.megatron import _hidden_states_only

    names = (
        "output_layer output_weight labels loss_mask input_ids position_ids attention_mask "
        "decoder_input inference_context packed_seq_params runtime_gather_output context "
        "compute_language_model_loss scale_logits config"
    ).split()
    hidden = torch.randn(3, 2, 4)
    assert _hidden_states_only(hidden_states=hidden, **dict.fromkeys(names)) is hidden
