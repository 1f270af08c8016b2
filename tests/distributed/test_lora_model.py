"""LoRA adapters on the TP linears (``model/lora.py``), checked against merged weights in fp64,
and the adapters-off reference against a separate resident model from the base checkpoint."""

import pytest
import torch

from megatron_adadpo.config import ConfigError
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.model.initialization import global_param_names, shard_of_full
from megatron_adadpo.model.lora import LoraLinear, adapters_disabled, add_adapters
from megatron_adadpo.model.lora_config import LAYER_TARGETS, LoraSection
from tests.distributed.train_harness import REPO
from tests.launcher import run_ranks
from tests.megatron_helpers import TINY, tiny_model

pytestmark = pytest.mark.distributed

FULL_RANK = 64  # min(out, in) of every TINY target: an adapter of this rank holds any update


def _update(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A known full update ``dW`` ``[out, in]`` (fp64) for the layer ``name``."""
    gen = torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name)))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05


def _full_shape(param: torch.nn.Parameter, tp: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


def _logits(chunks, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return chunks[0](tokens, positions, None)


def _merged_vs_adapted(rank, world, sp):
    """Logits (this rank's vocab shard) of the base with known updates merged into its weights,
    and of the base plus full-rank adapters holding the same updates; and the adapters-off
    logits against the plain base."""
    run = ExecutionConfig(tp=world, sequence_parallel=sp, transformer_impl="local")
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    merged = [c.double() for c in tiny_model(run)]
    adapted = [c.double() for c in tiny_model(run)]
    base_logits = _logits(adapted, tokens)
    with torch.no_grad():
        for name, weight in global_param_names(merged[0]).items():
            layer = name.rsplit(".", 2)[-2]
            if layer in LAYER_TARGETS and name.endswith("weight"):
                full = _update(name, _full_shape(weight, world))
                weight += shard_of_full(full, weight, gated_fc1=layer == "linear_fc1")
    lora = LoraSection(rank=FULL_RANK, alpha=FULL_RANK, target_modules=list(LAYER_TARGETS))
    layers = add_adapters(adapted, lora, seed=5)
    names = {id(p): n for n, p in global_param_names(adapted[0]).items()}
    with torch.no_grad():
        for layer in layers:
            a, b = layer.lora_a, layer.lora_b
            prefix = names[id(a)].rsplit(".", 1)[0]
            out = _full_shape(b, world)[0]
            full = _update(f"{prefix}.weight", (out, _full_shape(a, world)[1]))
            u, s, vh = torch.linalg.svd(full, full_matrices=False)  # dW = (U S) Vh, rank <= 64
            fc1 = prefix.endswith("linear_fc1")
            b.copy_(shard_of_full(u * s, b, gated_fc1=fc1))
            a.copy_(shard_of_full(vh, a, gated_fc1=False))
    with adapters_disabled(adapted):
        off_logits = _logits(adapted, tokens)
    return {
        "merged": _logits(merged, tokens),
        "adapted": _logits(adapted, tokens),
        "off": off_logits,
        "base": base_logits,
        "trainable": sorted(n for n, p in adapted[0].named_parameters() if p.requires_grad),
    }


@pytest.mark.parametrize("world,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "sp"])
def test_full_rank_adapters_equal_the_merged_update_fp64(world, sp):
    for result in run_ranks(_merged_vs_adapted, world, sp):
        error = (result["adapted"] - result["merged"]).abs().max().item()
        moved = (result["merged"] - result["base"]).abs().max().item()
        assert moved > 1e-2  # the updates change the model
        assert error < 1e-10, f"adapted vs merged {error:.3e}"
        assert torch.equal(result["off"], result["base"])  # adapters off: the base model
        assert result["trainable"] and all(
            n.endswith((".lora_a", ".lora_b")) for n in result["trainable"]
        )


def test_adapters_wrap_only_the_named_layers():
    def body(rank, world):
        run = ExecutionConfig(tp=1, transformer_impl="local")
        chunks = tiny_model(run)
        lora = LoraSection(rank=4, target_modules=["linear_proj", "linear_fc2"])
        add_adapters(chunks, lora, seed=1)
        wrapped = [n for n, m in chunks[0].named_modules() if isinstance(m, LoraLinear)]
        return wrapped, {k: v.key for k, v in chunks[0].sharded_state_dict().items()}

    wrapped, keys = run_ranks(body, 1)[0]
    assert len(wrapped) == 2 * TINY.num_layers
    assert all(n.endswith(("self_attention.linear_proj", "mlp.linear_fc2")) for n in wrapped)
    # the base keeps its checkpoint key (base checkpoints load), the adapters add two keys
    proj, key = "decoder.layers.0.self_attention.linear_proj", "decoder.layers.self_attention"
    assert keys[f"{proj}.base.weight"] == f"{key}.linear_proj.weight"  # layer: an offset
    assert keys[f"{proj}.lora_a"] == f"{key}.linear_proj.lora_a" and f"{proj}.lora_b" in keys
    assert not any(k.endswith("linear_qkv.lora_a") for k in keys)


def test_lora_section_checks():
    from megatron_adadpo.config import load_config

    config = str(REPO / "examples/configs/quickstart.yaml")
    base = ["execution.transformer_impl=local", "reference.mode=null"]  # unset: resolved
    on = load_config(config, [*base, "lora.rank=4"])
    assert on.reference_mode == "adapters_off" and on.lora.alpha == 32.0
    assert load_config(config, base).reference_mode == "resident"
    cases = {
        "lora.rank=0": "lora.rank",
        "lora.dropout=1.0": "lora.dropout",
        "lora.target_modules=[linear_q]": "lora.target_modules",
        "reference.mode=adapters_off": "needs a lora: section",
    }
    for setting, named in cases.items():
        with pytest.raises(ConfigError, match=named):
            load_config(config, [*base, setting])
    chunked = ["execution.logprob_chunk_tokens=64", "lora.target_modules=[output_layer]"]
    with pytest.raises(ConfigError, match="logprob_chunk_tokens"):
        load_config(config, [*base, *chunked])


SFT_TINY = REPO / "examples/checkpoints/sft_tiny"


def _reference_vs_resident(rank, world, argv):
    """Reference sums of the LoRA policy with its adapters off (adapters made non-zero), of a
    separate resident model loaded from the base checkpoint, and of the adapted policy."""
    from dataclasses import replace

    from megatron_adadpo import train
    from megatron_adadpo.config import load_config
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.lora import lora_layers
    from megatron_adadpo.run.reference import attach_forward_logps, freeze
    from megatron_adadpo.run.state import checkpoints
    from megatron_adadpo.run.trainer import Trainer

    args = train.parse_args(argv)
    config = load_config(args.config, args.set)
    trainer = Trainer(config)
    gen = torch.Generator().manual_seed(11 + rank)
    with torch.no_grad():
        for layer in lora_layers(trainer.policy):
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * 0.05)
    batches = trainer.batches.next_step()
    copies = [replace(b) for b in batches], [replace(b) for b in batches]  # MicroBatch copies
    trainer.reference.attach(batches)
    resident = build_model(config.model, config.execution)
    checkpoints.load_model(resident, config.train.init_checkpoint, config.model)
    attach_forward_logps(freeze(resident), copies[0], trainer.context)
    attach_forward_logps(trainer.policy, copies[1], trainer.context)  # adapters on
    trainer.close()

    def values(items):
        return torch.cat([b.reference_logps for b in items if b.reference_logps is not None])

    return {
        "mode": config.reference_mode,
        "off": values(batches),
        "resident": values(copies[0]),
        "on": values(copies[1]),
    }


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32_tp2", "bf16"])
def test_adapters_off_reference_equals_resident_base(bf16, tmp_path, cache_dir):
    """fp32 on TP2 to 1e-6; bf16 (one rank) exactly: the adapters-off pass is the bf16 base
    model's own computation, the same dtype path as a separate bf16 model."""
    extra = [
        *(["execution.bf16=true", "execution.tp=1"] if bf16 else []),
        f"train.init_checkpoint={SFT_TINY}",
        f"logging.run_dir={tmp_path / 'run'}",
        f"data.cache_dir={cache_dir}",
        "reference.mode=null",
        "lora.rank=8",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "eval.interval=0",
        "logging.progress=false",
    ]
    argv = ["--config", str(REPO / "examples/configs/quickstart.yaml")]
    for item in extra:
        argv += ["--set", item]
    world = 1 if bf16 else 2
    for result in run_ranks(_reference_vs_resident, world, argv, timeout=240):
        assert result["mode"] == "adapters_off" and result["off"].numel() == 16
        if bf16:
            assert torch.equal(result["off"], result["resident"])
        else:
            assert (result["off"] - result["resident"]).abs().max() <= 1e-6
        assert (result["on"] - result["resident"]).abs().max() > 1e-3  # the adapters matter
