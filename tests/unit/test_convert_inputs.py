"""HF conversion without Megatron: config mapping, tensor layouts, and the input errors.

Every error here is raised before the converter starts a process group; ``init_single_process``
is replaced by a failing stub so that a missing check can never initialise torch.distributed
inside the pytest process.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from megatron_adadpo.convert import hf_config, hf_io, mapping, megatron_io
from megatron_adadpo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_adadpo.convert.megatron_to_hf import convert_megatron_to_hf
from megatron_adadpo.model.config import ModelConfig
from tests import convert_models as cm

LLAMA31 = {  # the spelling of meta-llama/Llama-3.1-8B's config.json (older transformers)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


@pytest.fixture(autouse=True)
def _no_process_group(monkeypatch):
    def fail():
        raise AssertionError("conversion got past its input checks")

    monkeypatch.setattr(megatron_io, "init_single_process", fail)


def _without_version(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "transformers_version"}


def test_llama31_config_maps_and_round_trips():
    model = hf_config.hf_to_model_config(LLAMA31)
    assert model.num_query_groups == 8 and model.head_dim == 128
    assert model.rotary_base == 500000.0 and model.rope_scaling.factor == 8.0
    assert model.rope_scaling.original_max_position_embeddings == 8192
    assert model.vocab_size == 128256 and model.padded_vocab_size(1) == 128256
    assert not model.add_qkv_bias and not model.tie_word_embeddings
    # through YAML (model.yaml) and back to config.json: same fields, same spelling
    again = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(model.to_dict())))
    assert _without_version(hf_config.model_config_to_hf(again)) == _without_version(LLAMA31)


def test_llama2_config_without_scaling_keeps_null():
    cfg = dict(LLAMA31, rope_scaling=None, rope_theta=10000.0, vocab_size=32000)
    model = hf_config.hf_to_model_config(cfg)
    assert model.rope_scaling is None
    assert _without_version(hf_config.model_config_to_hf(model)) == _without_version(cfg)


@pytest.mark.parametrize("variant", list(cm.VARIANTS))
def test_transformers5_configs_round_trip(variant):
    config = cm.hf_config(variant)
    cfg = json.loads(config.to_json_string(use_diff=True))  # what config.json holds
    cfg["architectures"] = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = hf_config.hf_to_model_config(cfg)
    assert model.add_qkv_bias == variant.startswith("qwen2")
    assert model.tie_word_embeddings == variant.endswith("tied")
    assert (model.rope_scaling is not None) == ("rope_scaling" in cm.VARIANTS[variant][1])
    back = hf_config.model_config_to_hf(model)
    assert _without_version(back) == _without_version(cfg)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architectures": ["GemmaForCausalLM"]}, "architectures=.*GemmaForCausalLM.*supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "mistral"}, "model_type='mistral' does not match"),
    ],
)
def test_unsupported_configs_name_file_and_field(change, match):
    with pytest.raises(hf_config.UnsupportedModelError, match=match) as err:
        hf_config.hf_to_model_config(dict(LLAMA31, **change), where="/x/config.json")
    assert "/x/config.json" in str(err.value)


def _tiny(**kw) -> ModelConfig:
    base = dict(
        num_layers=2,
        hidden_size=16,
        ffn_hidden_size=24,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=300,
        add_qkv_bias=True,
    )
    return ModelConfig(**{**base, **kw})


def test_qkv_is_grouped_per_query_group_and_inverts():
    model = _tiny()
    d = model.head_dim  # 4 heads of 4, 2 groups -> per group [q, q, k, v]
    q = torch.arange(4).repeat_interleave(d).float().unsqueeze(1).expand(-1, 16)
    k = 10 + torch.arange(2).repeat_interleave(d).float().unsqueeze(1).expand(-1, 16)
    v = 20 + torch.arange(2).repeat_interleave(d).float().unsqueeze(1).expand(-1, 16)
    fused = mapping.fuse_qkv(q, k, v, model)
    heads = fused[::d, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]
    parts = mapping.split_qkv(fused, model)
    assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v), strict=True))
    bias = [torch.randn(n) for n in (16, 8, 8)]
    parts = mapping.split_qkv(mapping.fuse_qkv(*bias, model), model)
    assert all(torch.equal(a, b) for a, b in zip(parts, bias, strict=True))


def test_vocab_rows_padded_for_megatron_and_dropped_for_hf():
    model = _tiny()
    entry = mapping.tensor_map(model)[0]
    emb = torch.randn(300, 16)
    padded = mapping.to_megatron(entry, [emb], model)
    assert padded.shape == (384, 16) and not padded[300:].any()
    assert torch.equal(mapping.to_hf(entry, padded, model)[0], emb)
    trained_tp4 = torch.randn(512, 16)  # a checkpoint saved at TP4 has more padding rows
    assert mapping.to_hf(entry, trained_tp4, model)[0].shape == (300, 16)


def test_tensor_map_covers_every_hf_tensor():
    import transformers

    for variant in cm.VARIANTS:
        cfg = cm.hf_config(variant)
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        names = set(hf.state_dict())
        cfg_dict = dict(cfg.to_dict(), architectures=[type(hf).__name__])
        model = hf_config.hf_to_model_config(cfg_dict)
        mapped = {n for e in mapping.tensor_map(model) for n in e.hf}
        leftover = {n for n in names - mapped if not mapping.ignorable_hf_tensor(n, model)}
        assert not leftover, (variant, leftover)
        assert all(tuple(hf.state_dict()[n].shape) == mapping.hf_shape(n, model) for n in mapped)


# ---- input files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return cm.make_hf_model("llama3", tmp_path_factory.mktemp("hf") / "llama3")


@pytest.fixture
def copy_dir(hf_dir, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf_dir, dst)
    return dst


def test_mapped_and_spilled_tensors_are_file_backed_and_exact(hf_dir, tmp_path):
    """The streaming HF -> Megatron path: no copy in memory, storages the writer won't clone."""
    reader = hf_io.SafetensorsReader(hf_dir)
    for name in reader.names():
        mapped, read = reader.map(name), reader.get(name)
        assert mapped.dtype == read.dtype and torch.equal(mapped, read), name
        assert mapped.untyped_storage().nbytes() == read.numel() * read.element_size()
    tensor = torch.randn(7, 5).bfloat16()
    spilled = megatron_io.file_backed(tensor, tmp_path)
    assert torch.equal(spilled, tensor) and spilled.untyped_storage().nbytes() == 70
    assert list(tmp_path.iterdir()) == []  # the scratch file has no name


def _edit_config(directory, **change):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(change)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_missing_shard_is_named(copy_dir, tmp_path):
    shard = sorted(copy_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(hf_io.HFCheckpointError, match=f"missing shard .*{shard.name}.*index"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_truncated_or_corrupt_shard_is_named(copy_dir):
    shard = sorted(copy_dir.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\x01")
    with pytest.raises(hf_io.HFCheckpointError, match=f"{shard.name} is not a safetensors file"):
        hf_io.SafetensorsReader(copy_dir).get("model.embed_tokens.weight")


def test_no_safetensors(copy_dir, tmp_path):
    for f in copy_dir.glob("model*.safetensors*"):
        f.unlink()
    (copy_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf_io.HFCheckpointError, match="safe_serialization=True"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_missing_config(copy_dir, tmp_path):
    (copy_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_unsupported_architecture_names_config_file(copy_dir, tmp_path):
    _edit_config(copy_dir, architectures=["PhiForCausalLM"], model_type="phi")
    with pytest.raises(hf_config.UnsupportedModelError, match=r"config\.json: architectures"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_unsupported_rope_type_names_config_file(copy_dir, tmp_path):
    _edit_config(copy_dir, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4})
    with pytest.raises(hf_config.UnsupportedModelError, match="config.json: rope_type='yarn'"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_tokenizer_larger_than_embedding(copy_dir, tmp_path):
    cm.make_tokenizer(copy_dir, size=cm.VOCAB + 5)
    with pytest.raises(hf_io.HFCheckpointError, match="tokenizer .* 305 tokens .* 300 rows"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_config_vocab_differs_from_embedding(copy_dir, tmp_path):
    _edit_config(copy_dir, vocab_size=cm.VOCAB + 4)
    with pytest.raises(hf_io.HFCheckpointError, match="vocab_size=304 but .* has 300 rows"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_layer_count_mismatch(copy_dir, tmp_path):
    _edit_config(copy_dir, num_hidden_layers=1)
    with pytest.raises(hf_io.HFCheckpointError, match="num_hidden_layers"):
        convert_hf_to_megatron(copy_dir, tmp_path / "out")


def test_unknown_dtype(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--dtype 'fp16' is not supported; use one of"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", dtype="fp16")


def _fake_checkpoint(directory, model: ModelConfig):
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text("{}")
    (directory / "model.yaml").write_text(yaml.safe_dump(model.to_dict()))
    return directory


def test_export_errors(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        convert_megatron_to_hf(tmp_path, tmp_path / "o")
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / "latest").write_text("iter_0000009\n")
    with pytest.raises(FileNotFoundError, match="iter_0000009, which is not a complete"):
        convert_megatron_to_hf(tmp_path / "run", tmp_path / "o")
    model = hf_config.hf_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    ckpt = _fake_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(FileNotFoundError, match="--tokenizer-dir"):
        convert_megatron_to_hf(ckpt, tmp_path / "o")
    big = tmp_path / "tok"
    cm.make_tokenizer(big, size=cm.VOCAB + 1)
    with pytest.raises(hf_io.HFCheckpointError, match="301 tokens"):
        convert_megatron_to_hf(ckpt, tmp_path / "o", tokenizer_dir=big)
    with pytest.raises(ValueError, match="--dtype"):
        convert_megatron_to_hf(ckpt, tmp_path / "o", tokenizer_dir=hf_dir, dtype="half")


def test_mistral_sliding_window_is_kept_and_warned(caplog):
    cfg = json.loads(cm.hf_config("mistral").to_json_string(use_diff=True))
    cfg.update(architectures=["MistralForCausalLM"], sliding_window=32)
    with caplog.at_level("WARNING"):
        model = hf_config.hf_to_model_config(cfg, where="m/config.json")
    assert "sliding_window=32" in caplog.text and "m/config.json" in caplog.text
    assert hf_config.model_config_to_hf(model)["sliding_window"] == 32


def test_output_must_be_new_or_empty(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_megatron_to_hf(tmp_path, tmp_path / "out")
