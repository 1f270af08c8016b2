"""Tiny random HF Llama-family models (built offline from configs) and Megatron logits helpers.

Shared by the conversion tests. Vocab 300 is not a multiple of 128, so TP padding is exercised
(padded to 384 at TP1, 512 at TP2).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
SEQ = 24

# name -> (config class, config kwargs). One per family variant the converter supports.
VARIANTS = {
    "llama2": (
        "LlamaConfig",
        dict(num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5),
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
            bos_token_id=1,
            eos_token_id=[2, 3],
        ),
    ),
    "llama32_tied": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=None, rope_theta=1000000.0)),
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
}


def hf_config(variant: str):
    import transformers

    cls_name, extra = VARIANTS[variant]
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
    )
    base.update(extra)
    return getattr(transformers, cls_name)(**base)


def make_tokenizer(directory: Path, size: int = VOCAB - 20) -> None:
    """A word-level fast tokenizer with ``size`` tokens (smaller than the embedding, as usual)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1")
    fast.save_pretrained(str(directory))


def make_hf_model(variant: str, directory: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """Save a random tiny HF model (several safetensors shards) + tokenizer into ``directory``."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(variant)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model = model.to(dtype)
    model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="60KB")
    make_tokenizer(directory)
    return directory


def tokens(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def megatron_logits(chunks, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocab logits ``[b, s, vocab]`` of a (TP x PP, no VPP) model; None off the last stage.

    Pipeline stages pass the hidden states with plain send/recv (one micro-batch).
    """
    import torch.distributed as dist

    from megatron_adadpo.platform.megatron import parallel_state, tensor_parallel

    chunk = chunks[0]
    chunk.eval()
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    if not first:
        h = torch.empty(s, b, chunk.config.hidden_size)
        dist.recv(h, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        chunk.set_input_tensor(h)
    out = chunk(ids, pos, mask)
    if not last:
        dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    full = tensor_parallel.gather_from_tensor_model_parallel_region(out)
    return full[..., :vocab].float()
