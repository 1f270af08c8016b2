"""The ``reference`` section's rules: ``reference.checkpoint`` (a reference other than the
policy's start) and what the precomputed values record about the reference model."""

from pathlib import Path

import pytest

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.model.config import write_model_config
from megatron_adadpo.run.state.consistency import (
    check_reference_model,
    recorded_reference_model,
    reference_model,
)

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"


def cfg(*overrides):
    return load_config(QUICKSTART, list(overrides))


def _checkpoint(root: Path, model, weights: bytes = b"w") -> Path:
    """A stand-in converted checkpoint: model.yaml and one weight file (its bytes fingerprinted)."""
    root.mkdir(parents=True)
    write_model_config(root, model)
    (root / "weights.distcp").write_bytes(weights)
    return root


def test_reference_checkpoint_is_checked_like_init_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"reference.checkpoint=.*nowhere does not exist"):
        cfg(f"reference.checkpoint={tmp_path / 'nowhere'}")
    model = cfg().model.to_dict() | {"rotary_base": 500000.0}
    from megatron_adadpo.model.config import ModelConfig

    other = _checkpoint(tmp_path / "other", ModelConfig.from_dict(model))
    with pytest.raises(ConfigError, match=r"reference.checkpoint: checkpoint .*\(rotary_base: "):
        cfg(f"reference.checkpoint={other}")
    ok = _checkpoint(tmp_path / "ok", cfg().model)
    assert cfg(f"reference.checkpoint={ok}").reference.checkpoint == str(ok)


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["reference.mode=none", "loss.name=simpo"], "reference.mode=none"),
        (["loss.name=simpo"], "loss.name=simpo is reference-free"),
    ],
)
def test_reference_checkpoint_without_a_reference_is_refused(tmp_path, overrides, why):
    ok = _checkpoint(tmp_path / "ok", cfg().model)
    with pytest.raises(ConfigError, match=rf"reference.checkpoint=.* has no effect: {why}"):
        cfg(*overrides, f"reference.checkpoint={ok}")


def test_the_recorded_reference_is_the_checkpoint_else_the_start(tmp_path):
    a = _checkpoint(tmp_path / "a", cfg().model, b"A")
    b = _checkpoint(tmp_path / "b", cfg().model, b"B")
    from_b = reference_model(cfg(f"train.init_checkpoint={b}"))
    policy_a_ref_b = cfg(f"train.init_checkpoint={a}", f"reference.checkpoint={b}")
    assert reference_model(policy_a_ref_b) == from_b  # precomputed either way: one record
    assert reference_model(cfg(f"train.init_checkpoint={a}")) != from_b
    check_reference_model(from_b, policy_a_ref_b, "DIR")
    with pytest.raises(ConfigError, match=r"differs in: checkpoint.*reference.checkpoint=.*/b:"):
        check_reference_model(
            reference_model(cfg(f"reference.checkpoint={a}")), policy_a_ref_b, "D"
        )
    legacy = {"starting_model": {**from_b, "init_checkpoint": from_b["checkpoint"]}}
    del legacy["starting_model"]["checkpoint"]  # written before reference.checkpoint
    assert recorded_reference_model(legacy) == from_b
    with pytest.raises(ConfigError, match="records no reference model"):
        check_reference_model(recorded_reference_model({}), policy_a_ref_b, "DIR")


# ----------------------------------------------------------------------------- TR-DPO
def test_mixup_follows_the_tr_dpo_rule_in_fp64():
    """k updates of a tiny model: ref_k = alpha * policy_k + (1 - alpha) * ref_{k-1}, written
    out in fp64 here (TRL's SyncRefModelCallback rule); alpha = 1 copies; a bf16 reference is
    mixed in fp32 and rounded once."""
    import torch

    from megatron_adadpo.run.reference import mix_parameters

    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    want = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p))
        mix_parameters(ref, policy, 0.3)
        for name, p in policy.named_parameters():
            want[name] = 0.3 * p.detach() + 0.7 * want[name]
    for name, p in ref.named_parameters():
        assert torch.allclose(p, want[name], rtol=0, atol=1e-15), name
    mix_parameters(ref, policy, 1.0)
    for a, b in zip(ref.parameters(), policy.parameters(), strict=True):
        assert torch.equal(a, b)
    low, source = torch.nn.Linear(4, 3).bfloat16(), torch.nn.Linear(4, 3).double()
    want = 0.6 * source.weight.detach() + 0.4 * low.weight.detach().double()
    mix_parameters(low, source, 0.6)
    assert low.weight.dtype == torch.bfloat16
    assert torch.allclose(low.weight.double(), want, rtol=2**-8, atol=0)  # one bf16 rounding


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reference.sync_steps=-1"], r"reference.sync_steps=-1 must be an integer >= 0"),
        (["reference.sync_steps=1", "reference.mixup_alpha=0"], r"must be in \(0, 1\]"),
        (["reference.mixup_alpha=0.9"], r"mixup_alpha=0.9 has no effect with reference.sync"),
        (
            ["reference.sync_steps=4", "reference.mode=precomputed", "reference.path=x"],
            r"reference.sync_steps=4 \(TR-DPO\) .* precomputed .* set reference.mode=resident",
        ),
        (["reference.sync_steps=4", "loss.name=simpo"], r"sync_steps=4 has no effect: loss"),
        (  # LoRA's default reference: the trainer had no sync for it (AttributeError, step 1)
            ["reference.sync_steps=1", "lora.rank=8", "reference.mode=null"],
            r"sync_steps=1 \(TR-DPO\).*mode=adapters_off.*set reference.mode=resident",
        ),
        (
            ["reference.sync_steps=2", "lora.rank=8", "reference.mode=adapters_off"],
            r"sync_steps=2 \(TR-DPO\) .* reference.mode=adapters_off .* or reference.sync_steps=0",
        ),
    ],
)
def test_tr_dpo_settings_are_refused_where_they_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg(*overrides)


def test_tr_dpo_settings_load():
    ref = cfg("reference.sync_steps=8", "reference.mixup_alpha=1").reference
    assert (ref.sync_steps, ref.mixup_alpha) == (8, 1.0)
    with_lora = cfg("reference.sync_steps=2", "lora.rank=8", "reference.mode=resident")
    assert with_lora.reference_mode == "resident" and with_lora.reference.sync_steps == 2


def test_resume_across_a_change_of_tr_dpo_is_refused_naming_the_fields():
    from megatron_adadpo.run.state.resume import check_reference_sync, reference_sync

    on = reference_sync(cfg("reference.sync_steps=4", "reference.mixup_alpha=1"))
    assert on == {"sync_steps": 4, "mixup_alpha": 1.0} and reference_sync(cfg()) is None
    check_reference_sync(on, dict(on), Path("ckpt"))
    check_reference_sync(None, None, Path("ckpt"))
    with pytest.raises(ConfigError, match=r"saved without TR-DPO .* reference.sync_steps=0"):
        check_reference_sync(None, on, Path("ckpt"))
    with pytest.raises(
        ConfigError, match=r"continues TR-DPO with reference.sync_steps=4, reference.mixup_alpha=1"
    ):
        check_reference_sync(on, {**on, "mixup_alpha": 0.5}, Path("ckpt"))
