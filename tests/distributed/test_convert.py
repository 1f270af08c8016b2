"""HF <-> Megatron conversion: logits at TP1 / TP2 / PP2, bit-identical round trip, trained export.

One tiny random HF model per supported family variant (tests/convert_models.py). Conversions
and layouts are batched into few forked process groups (each dist_checkpointing save ~3-5 s).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests import convert_models as cm
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

VARIANTS = list(cm.VARIANTS)
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
TOL = 1e-5


def _convert_all(rank, world, jobs):
    from megatron_adadpo.convert import convert_hf_to_megatron, convert_megatron_to_hf

    for kind, src, dst, dtype in jobs:
        if kind == "to_megatron":
            convert_hf_to_megatron(src, dst, dtype=dtype, progress=False)
        else:
            convert_megatron_to_hf(src, dst, progress=False, max_shard_bytes=40_000)


def _logits_all(rank, world, tp, pp, ckpts):
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.config import read_model_config
    from megatron_adadpo.platform import distributed as parallel
    from megatron_adadpo.run.state.checkpoints import load_model

    parallel.init_model_parallel(ExecutionConfig(tp=tp, pp=pp))
    out = {}
    for name, ckpt in ckpts.items():
        model = read_model_config(ckpt)
        chunks = build_model(model, ExecutionConfig(tp=tp, pp=pp))
        load_model(chunks, ckpt, model)
        out[name] = cm.megatron_logits(chunks, cm.tokens(), model.vocab_size)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """HF models, their Megatron conversions and the HF exports of those (fp32; + llama3 bf16)."""
    root = tmp_path_factory.mktemp("convert")
    names = {v: (v, torch.float32) for v in VARIANTS}
    names["llama3_bf16"] = ("llama3", torch.bfloat16)
    dirs = {}
    for name, (variant, dtype) in names.items():
        d = root / name
        cm.make_hf_model(variant, d / "hf", dtype=dtype)
        dirs[name] = d
    jobs = [("to_megatron", d / "hf", d / "mg", None) for d in dirs.values()]
    jobs += [("to_hf", d / "mg", d / "hf_back", None) for d in dirs.values()]
    # fp32 weights saved as bf16 (converted tensors are spilled to scratch files, not mapped)
    dirs["llama3_to_bf16"] = cast = root / "llama3_to_bf16"
    jobs += [("to_megatron", dirs["llama3"] / "hf", cast / "mg", "bf16")]
    jobs += [("to_hf", cast / "mg", cast / "hf_back", None)]
    run_ranks(_convert_all, 1, jobs, timeout=240)
    return dirs


_LOGITS_CACHE: dict = {}


def _layout_logits(work, layout):
    if layout not in _LOGITS_CACHE:
        tp, pp = LAYOUTS[layout]
        ckpts = {v: work[v] / "mg" for v in VARIANTS}
        _LOGITS_CACHE[layout] = run_ranks(_logits_all, tp * pp, tp, pp, ckpts, timeout=240)[-1]
    return _LOGITS_CACHE[layout]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_logits_equal_hf(work, variant, layout):
    ref = cm.hf_logits(work[variant] / "hf", cm.tokens())
    got = _layout_logits(work, layout)[variant]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", [*VARIANTS, "llama3_bf16"])
def test_round_trip_bit_identical(work, name):
    d = work[name]
    src, back = _tensors(d / "hf"), _tensors(d / "hf_back")
    assert sorted(src) == sorted(back)
    for key, tensor in src.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    cfg, cfg_back = (json.loads((p / "config.json").read_text()) for p in (d / "hf", d / "hf_back"))
    assert cfg_back == cfg
    gen, gen_back = (
        json.loads((p / "generation_config.json").read_text()) for p in (d / "hf", d / "hf_back")
    )
    assert gen_back == gen
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (d / "hf_back" / f).read_bytes() == (d / "hf" / f).read_bytes()
    index = json.loads((d / "hf_back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    assert len(set(index["weight_map"].values())) > 1  # small max_shard_bytes -> several shards


def test_dtype_conversion_round_trip(work):
    src, back = _tensors(work["llama3"] / "hf"), _tensors(work["llama3_to_bf16"] / "hf_back")
    assert sorted(src) == sorted(back)
    for key, tensor in src.items():  # values rounded to bf16 (exported in the HF config dtype)
        assert torch.equal(back[key], tensor.bfloat16().to(back[key].dtype)), key


def test_megatron_checkpoint_contents(work):
    d = work["qwen2_tied"] / "mg"
    model = yaml.safe_load((d / "model.yaml").read_text())
    assert model["add_qkv_bias"] and model["tie_word_embeddings"]
    assert model["hf_architecture"] == "Qwen2ForCausalLM"
    assert (d / "tokenizer" / "tokenizer.json").is_file()
    assert (d / "tokenizer" / "generation_config.json").is_file()
    assert yaml.safe_load((work["llama3_bf16"] / "mg" / "model.yaml").read_text())["rope_scaling"]


def test_hf_export_loads_with_auto_model(work):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(work["llama3_bf16"] / "hf_back"))
    assert model.dtype == torch.bfloat16
    assert model.config.rope_parameters["rope_type"] == "llama3"
    tok = transformers.AutoTokenizer.from_pretrained(str(work["llama3_bf16"] / "hf_back"))
    assert len(tok) == cm.VOCAB - 20


# ---- a model trained a few steps at TP2 x PP2 exports to HF with the same logits ------------


def _train_tp2pp2(rank, world, ckpt, run_dir, steps):
    """SGD on next-token CE through Megatron's pipeline schedule; saves a training-style ckpt."""
    from megatron_adadpo.layout import ExecutionConfig
    from megatron_adadpo.model.build import build_model
    from megatron_adadpo.model.config import read_model_config
    from megatron_adadpo.platform import distributed as parallel
    from megatron_adadpo.platform.megatron import get_forward_backward_func, parallel_state
    from megatron_adadpo.run.state.checkpoints import save_model

    tp, pp = 2, 2
    parallel.init_model_parallel(ExecutionConfig(tp=tp, pp=pp))
    model = read_model_config(ckpt)
    chunks = build_model(model, ExecutionConfig(tp=tp, pp=pp))
    from megatron_adadpo.run.state.checkpoints import load_model

    load_model(chunks, ckpt, model)
    ids = cm.tokens(batch=4)
    seq = ids.shape[1]
    pos = torch.arange(seq).unsqueeze(0).expand(2, seq)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)

    def forward_step(data_iterator, gpt):
        batch = next(data_iterator)
        out = gpt(batch, pos, mask, labels=torch.roll(batch, -1, dims=1))

        def loss_func(per_token):
            total = per_token.float().sum()
            return total, torch.tensor(per_token.numel(), dtype=torch.int), {"loss": total}

        return out, loss_func

    losses = []
    for _ in range(steps):
        for p in chunks[0].parameters():
            p.grad = None
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(list(ids.chunk(2))),
            model=chunks,
            num_microbatches=2,
            seq_length=seq,
            micro_batch_size=2,
            forward_only=False,
        )
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(p.grad, alpha=-0.05 / ids.numel())
        if parallel_state.is_pipeline_last_stage():
            losses.append(sum(r["loss"].item() for r in reports))
    step_dir = run_dir / "checkpoints" / f"iter_{steps:07d}"
    save_model(chunks, step_dir, model)
    if rank == 0:
        (run_dir / "checkpoints" / "latest").write_text(step_dir.name + "\n")
        config = {"model": model.to_dict(), "checkpoint": {"load": str(ckpt)}}
        (step_dir / "config.yaml").write_text(yaml.safe_dump(config))
    logits = cm.megatron_logits(chunks, cm.tokens(), model.vocab_size)
    return logits, losses


def test_trained_tp2pp2_checkpoint_exports_to_hf(work, tmp_path):
    src = work["llama3"]
    steps = 3
    results = run_ranks(_train_tp2pp2, 4, src / "mg", tmp_path / "run", steps, timeout=240)
    logits, losses = results[-1]
    assert losses[-1] < losses[0]  # it trained
    out = tmp_path / "hf"
    # a run dir: `latest` -> iter dir; tokenizer found through config.yaml's checkpoint path
    run_ranks(_convert_all, 1, [("to_hf", tmp_path / "run", out, None)], timeout=120)
    exported = cm.hf_logits(out, cm.tokens())
    assert (exported - logits).abs().max().item() <= TOL
    before = cm.hf_logits(src / "hf", cm.tokens())
    assert (exported - before).abs().max().item() > 1e-3  # the weights did change
