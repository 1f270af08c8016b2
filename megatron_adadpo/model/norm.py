"""RMSNorm for the local layer spec that supports sequence parallelism."""

from __future__ import annotations

import torch

from megatron_adadpo.platform.megatron import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = w * x / sqrt(mean(x^2) + eps)``, computed in fp32 as HF Llama does.

    Shapes: ``[s, b, h]`` -> ``[s, b, h]``. The weight is marked ``sequence_parallel`` when the
    config enables it, so ``finalize_model_grads`` all-reduces its gradient over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm on the fp32 copy: the same formula (one kernel where torch fuses it)
        normed = torch.nn.functional.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        return self.weight * normed.to(x.dtype)
