"""Every loss family (and the adaptive option) trains LoRA adapters: at step 1 (``B = 0``) the
adapters' gradients are the full model's weight gradients seen through them, ``dL/dB =
(alpha / r) dL/dW A^T`` and ``dL/dA = (alpha / r) B^T dL/dW = 0``, and the step's metrics equal
the full-parameter run's (the adapters-off reference is the resident one)."""

import zlib

import pytest
import torch

from tests.distributed.train_harness import argv, first_step
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

RANK, ALPHA, SEED = 4, 8.0, 1234  # SEED: quickstart.yaml's train.seed (draws A)
LORA = [f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "reference.mode=null"]
CASES = {
    "adadpo": ["loss.name=dpo", "loss.adaptive=true"],
    "dpo": ["loss.name=dpo", "loss.adaptive=false"],
    "ipo": ["loss.name=ipo"],
    "robust": ["loss.name=robust"],
    "rdpo": ["loss.name=rdpo"],
    "simpo_adaptive": ["loss.name=simpo", "loss.adaptive=true"],
    "cpo": ["loss.name=cpo"],
    "orpo": ["loss.name=orpo"],
    "sft": ["loss.name=sft", "loss.adaptive=false"],
}


def _a(name: str, shape) -> torch.Tensor:
    """The initial ``A`` of adapter ``name`` (``U(-1/sqrt(in), 1/sqrt(in))``, seeded by name)."""
    gen = torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * shape[1] ** -0.5


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_gradients_are_the_full_gradients_through_the_adapters(case, tmp_path, cache_dir):
    extra = ["train.train_iters=1", *CASES[case]]
    full = run_ranks(first_step, 1, argv(tmp_path / "full", cache_dir, *extra))[0]
    lora = run_ranks(first_step, 1, argv(tmp_path / "lora", cache_dir, *extra, *LORA))[0]
    checked = 0
    for name, grad_b in lora["grads"].items():
        if not name.endswith(".lora_b"):
            continue
        prefix = name.removesuffix(".lora_b")
        grad_w = full["grads"][f"{prefix}.weight"]
        a = _a(f"{prefix}.lora_a", (RANK, grad_w.shape[1]))
        want = ALPHA / RANK * grad_w @ a.T
        err = (grad_b - want).norm() / want.norm().clamp(min=1e-30)
        assert err <= 1e-5, f"{case}: {name} differs by {err:.2e}"
        assert lora["grads"][f"{prefix}.lora_a"].abs().max() == 0
        checked += 1
    assert checked == 4 * 4  # 4 layers x (qkv, proj, fc1, fc2)
    for key, value in full["metrics"].items():
        got = lora["metrics"][key]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)
