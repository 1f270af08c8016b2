"""LoRA on Transformer Engine linears and under context parallelism, by rule (TE cannot run
here; the end-to-end runs are in tests/gpu/test_cuda_lora.py).

- the adapter wrapper treats a linear with TE's contract (``parallel_mode``, ``weight``,
  ``sequence_parallel``, ``tp_group``, ``forward(x) -> (y, bias)``) as Megatron's linear of the
  same parallel mode: same split of A / B, same outputs and gradients at TP2 with sequence
  parallelism;
- the TE branch of ``model/build.layer_spec`` with LoRA (TE's classes replaced by Megatron's
  local ones, a TE-shaped spec with fused norm + linear stand-ins) builds a model with the
  local spec's checkpoint keys and logits: the split norms save under the fused keys;
- the adapters are per-token maps, so context parallelism's sequence split commutes with them.
"""

import pytest
import torch

from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model import build
from megatron_adadpo.model.initialization import init_layout_invariant
from megatron_adadpo.model.lora import LoraLinear
from megatron_adadpo.model.norm import RMSNorm
from megatron_adadpo.platform.megatron import tensor_parallel
from megatron_adadpo.resolve.kernels import Kernels
from tests.launcher import run_ranks
from tests.megatron_helpers import TINY, tiny_model
from tests.unit.test_lora_rules import FusedNormLinear, te_shaped_spec

pytestmark = pytest.mark.distributed

RANK = 4


class TEShapedLinear(torch.nn.Module):
    """A linear with TE's contract (megatron-core 0.16.1 ``extensions/transformer_engine.py``:
    ``TELinear.forward`` returns ``(out, None)`` or ``(out, bias)``, lines 669-685; TE keeps
    ``parallel_mode``, ``sequence_parallel`` and ``tp_group``), computing with a Megatron
    linear's weight and TP communication. It is no ``ColumnParallelLinear`` /
    ``RowParallelLinear``: the wrapper must read the parallel mode from the contract."""

    def __init__(self, megatron_linear, parallel_mode: str):
        super().__init__()
        self.megatron = [megatron_linear]  # a list: not a submodule
        self.parallel_mode = parallel_mode
        self.weight = megatron_linear.weight
        self.sequence_parallel = megatron_linear.sequence_parallel
        self.tp_group = megatron_linear.tp_group

    def forward(self, x):
        return self.megatron[0](x)


def _adapted(base, gen) -> LoraLinear:
    layer = LoraLinear(base, RANK, alpha=2.0 * RANK, dropout=0.0)
    with torch.no_grad():  # the same values on both wrappers (drawn from one seeded stream)
        for param in (layer.lora_a, layer.lora_b):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return layer


def _te_vs_megatron(rank, world):
    """Outputs, adapter gradients and adapter attributes of each wrapper, per base linear."""
    run = ExecutionConfig(tp=world, sequence_parallel=True, transformer_impl="local")
    layer = tiny_model(run)[0].decoder.layers[0]
    bases = {
        "column": (layer.self_attention.linear_qkv, TINY.hidden_size, 8 // world),
        "row": (layer.self_attention.linear_proj, TINY.hidden_size // world, 8),
    }
    out = {}
    for mode, (base, width, seq) in bases.items():
        x = torch.randn(seq, 2, width, generator=torch.Generator().manual_seed(rank))
        for kind, wrapped in (("megatron", base), ("te", TEShapedLinear(base, mode))):
            adapted = _adapted(wrapped, torch.Generator().manual_seed(11 + rank))
            y, bias = adapted(x)
            assert bias is None  # no bias in the Llama family's linears
            y.square().sum().backward()
            out[mode, kind] = {
                "y": y.detach(),
                "grads": [adapted.lora_a.grad, adapted.lora_b.grad],
                "attrs": [
                    (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", -1))
                    for p in (adapted.lora_a, adapted.lora_b)
                ]
                + [getattr(adapted.lora_a, "sequence_parallel", False)],
            }
    return out


def test_te_shaped_linear_is_wrapped_like_megatrons():
    for result in run_ranks(_te_vs_megatron, 2):
        for mode in ("column", "row"):
            megatron, te = result[mode, "megatron"], result[mode, "te"]
            assert te["attrs"] == megatron["attrs"]
            torch.testing.assert_close(te["y"], megatron["y"], rtol=0, atol=0)
            for got, want in zip(te["grads"], megatron["grads"], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert result["row", "te"]["attrs"][0] == (True, 1)  # A split like a row base's input
        assert result["column", "te"]["attrs"][1] == (True, 0)  # B like a column base's output


def _cp_rank_positions(seq: int, cp: int, rank: int) -> torch.Tensor:
    """Megatron's load-balanced CP split (``get_batch_on_this_cp_rank``): ``2 * cp`` chunks of
    the sequence, rank ``r`` holding chunks ``r`` and ``2 * cp - 1 - r``."""
    chunks = torch.arange(seq).chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def _split_commutes(rank, world):
    run = ExecutionConfig(tp=1, transformer_impl="local")
    layer = tiny_model(run)[0].decoder.layers[0]
    errors = []
    for base in (layer.self_attention.linear_qkv, layer.mlp.linear_fc2):
        adapted = _adapted(base, torch.Generator().manual_seed(5))
        x = torch.randn(16, 2, base.weight.shape[1], generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            full = adapted(x)[0]
            for cp in (2, 4):
                for cp_rank in range(cp):
                    pos = _cp_rank_positions(16, cp, cp_rank)
                    errors.append((adapted(x[pos])[0] - full[pos]).abs().max())
    return torch.stack(errors)


def test_adapters_commute_with_the_context_parallel_split():
    errors = run_ranks(_split_commutes, 1)[0]
    assert len(errors) == 2 * (2 + 4) and float(errors.max()) <= 1e-6


class LocalBackend:
    """``TESpecProvider``'s methods the split reads, with Megatron's local modules for TE's."""

    def column_parallel_layer_norm_linear(self):
        return FusedNormLinear

    def column_parallel_linear(self):
        return tensor_parallel.ColumnParallelLinear

    def layer_norm(self):
        return RMSNorm


def _split_te_branch(rank, world):
    """Checkpoint keys and logits of the TE branch's model (stand-ins) and the local spec's."""
    run = ExecutionConfig(tp=world, transformer_impl="local")
    local = tiny_model(run)
    build.te_layer_spec = lambda **_: te_shaped_spec()  # this forked rank only
    build.te_spec_provider = LocalBackend
    kernels = Kernels(transformer_engine=True, split_norm_linears=("linear_qkv", "linear_fc1"))
    split = build.build_model(TINY, run, kernels=kernels)
    init_layout_invariant(split, seed=7, vocab_size=TINY.vocab_size)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand_as(tokens)
    out = {}
    for name, chunks in (("local", local), ("split", split)):
        with torch.no_grad():
            logits = chunks[0](tokens, positions, None)
        keys = sorted(v.key for v in chunks[0].sharded_state_dict().values() if hasattr(v, "key"))
        fused = [m for m in chunks[0].modules() if isinstance(m, FusedNormLinear)]
        out[name] = {"logits": logits, "keys": keys, "fused": len(fused)}
    return out


def test_te_branch_with_lora_builds_the_split_spec():
    for result in run_ranks(_split_te_branch, 2):
        local, split = result["local"], result["split"]
        assert split["fused"] == 0 and split["keys"] == local["keys"]
        assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in split["keys"]
        assert torch.equal(split["logits"], local["logits"])
