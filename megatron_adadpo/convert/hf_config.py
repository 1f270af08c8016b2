"""HF ``config.json`` <-> ``ModelConfig`` for the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5).

Fields the Megatron model needs are derived; every other field of ``config.json`` is kept
verbatim in ``ModelConfig.hf_extra`` so that the export writes the same ``config.json`` back.
Both RoPE spellings are read and written back in the spelling they came in: transformers >= 5
(``rope_parameters = {"rope_type", "rope_theta", ...}``) and the older one (``rope_theta`` +
``rope_scaling``).
"""

from __future__ import annotations

import logging

from megatron_adadpo.model.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Fields rebuilt from ModelConfig on export (everything else round-trips through hf_extra).
_DERIVED = (
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "transformers_version",
)


class UnsupportedModelError(ValueError):
    """The HF checkpoint uses an architecture or option this converter cannot reproduce."""


def hf_to_model_config(cfg: dict, where: str = "config.json") -> ModelConfig:
    """``ModelConfig`` for an HF ``config.json`` dict; ``where`` names the file in errors."""
    arch = _architecture(cfg, where)
    model_type = ARCHITECTURES[arch]
    _require(cfg.get("hidden_act", "silu") == "silu", where, "hidden_act", cfg.get("hidden_act"))
    _require(not cfg.get("mlp_bias", False), where, "mlp_bias", True)
    if model_type == "qwen2":
        qkv_bias = True
    else:
        _require(not cfg.get("attention_bias", False), where, "attention_bias", True)
        qkv_bias = False
    _warn_sliding_window(cfg, where)
    theta, scaling = _read_rope(cfg, where)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    extra = {k: v for k, v in cfg.items() if k not in _DERIVED}
    extra.setdefault("model_type", model_type)
    return ModelConfig(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        vocab_size=cfg["vocab_size"],
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rotary_base=float(theta),
        rope_scaling=scaling,
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        add_qkv_bias=qkv_bias,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_method_std=cfg.get("initializer_range", 0.02),
        hf_architecture=arch,
        hf_extra=extra,
    )


def model_config_to_hf(model: ModelConfig) -> dict:
    """The HF ``config.json`` dict for ``model`` (original field order and spelling kept)."""
    import transformers

    arch = model.hf_architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model.hf_architecture={arch!r} cannot be exported; supported: {sorted(ARCHITECTURES)}"
        )
    if model.add_qkv_bias and ARCHITECTURES[arch] != "qwen2":
        raise UnsupportedModelError(
            f"model.add_qkv_bias=True has no {arch} equivalent; set model.hf_architecture="
            "Qwen2ForCausalLM"
        )
    out = dict(model.hf_extra)
    out.update(
        architectures=[arch],
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_word_embeddings,
        initializer_range=model.init_method_std,
        transformers_version=transformers.__version__,
    )
    out.setdefault("model_type", ARCHITECTURES[arch])
    out.setdefault("hidden_act", "silu")
    if "head_dim" in out or model.head_dim != model.hidden_size // model.num_attention_heads:
        out["head_dim"] = model.head_dim
    _write_rope(out, model)
    return dict(sorted(out.items()))


def _architecture(cfg: dict, where: str) -> str:
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{where}: architectures={archs} is not supported; this converter handles "
            f"{sorted(ARCHITECTURES)} (Llama 2/3.x, Mistral, Qwen2/2.5). Other families need "
            "Megatron-Bridge on a GPU machine."
        )
    expected = ARCHITECTURES[archs[0]]
    if cfg.get("model_type", expected) != expected:
        raise UnsupportedModelError(
            f"{where}: model_type={cfg['model_type']!r} does not match architectures={archs} "
            f"(expected {expected!r}); fix config.json"
        )
    return archs[0]


def _require(ok: bool, where: str, field: str, value) -> None:
    if not ok:
        raise UnsupportedModelError(
            f"{where}: {field}={value!r} is not supported by the Llama-family converter "
            "(SwiGLU MLP without biases, no output-projection bias)"
        )


def _warn_sliding_window(cfg: dict, where: str) -> None:
    window = cfg.get("sliding_window")
    used = cfg.get("use_sliding_window", cfg.get("model_type") == "mistral")
    if used and window and window < cfg.get("max_position_embeddings", 0):
        log.warning(
            "%s: sliding_window=%s is not applied by the Megatron model (full causal attention); "
            "results are identical for sequences up to %s tokens",
            where,
            window,
            window,
        )


def _read_rope(cfg: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope_type={rope_type!r} is not supported (supported: {list(ROPE_TYPES)}); "
            "the Megatron model implements plain RoPE and Llama-3 scaling only"
        )
    if rope_type == "default":
        return theta, None
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise UnsupportedModelError(
            f"{where}: llama3 rope scaling lacks {missing}; fix config.json"
        )
    return theta, RopeScaling(**{k: scaling[k] for k in _LLAMA3_KEYS})


def _write_rope(out: dict, model: ModelConfig) -> None:
    theta = model.rotary_base
    s = model.rope_scaling
    llama3 = {"rope_type": "llama3", **{k: getattr(s, k) for k in _LLAMA3_KEYS}} if s else None
    if isinstance(out.get("rope_parameters"), dict) or not (
        "rope_theta" in out or "rope_scaling" in out
    ):
        params = dict(out.get("rope_parameters") or {})
        if llama3 is None:
            for k in _LLAMA3_KEYS:
                params.pop(k, None)
            params["rope_type"] = "default"
        else:
            params.update(llama3)
        params["rope_theta"] = theta
        out["rope_parameters"] = dict(sorted(params.items()))
        return
    out["rope_theta"] = theta
    if llama3 is None:
        if out.get("rope_scaling") is not None:
            out["rope_scaling"] = None
        return
    scaling = dict(out.get("rope_scaling") or {})
    scaling.pop("type", None)
    scaling.update(llama3)
    out["rope_scaling"] = scaling
