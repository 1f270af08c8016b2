"""HF <-> Megatron checkpoint conversion for the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5).

Entry points: ``convert_hf_to_megatron`` and ``convert_megatron_to_hf`` (CLIs in ``tools/``).
"""

from megatron_adadpo.convert.hf_to_megatron import convert_hf_to_megatron
from megatron_adadpo.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf"]
