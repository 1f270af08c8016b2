"""The per-token options' settings: ``loss.ld_alpha`` (range, refused for sft),
``loss.use_weighting``, ``logging.token_metrics`` (which per-token statistics the step asks for),
and the precomputed reference's recorded ``ld_alpha`` (``run/state/consistency.py``)."""

from pathlib import Path

import pytest

from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.losses import LossConfig
from megatron_adadpo.resolve import CPU, resolve
from megatron_adadpo.run.sequences import step_stats
from megatron_adadpo.run.state.consistency import check_precomputed_loss, ld_alpha_error
from megatron_adadpo.run.step import StepContext

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"


def cfg(*overrides):
    return load_config(QUICKSTART, list(overrides))


@pytest.mark.parametrize("alpha", [0, -0.5, 1.5])
def test_ld_alpha_outside_zero_one_is_refused_naming_the_field(alpha):
    with pytest.raises(ValueError, match=r"ld_alpha=.* a float in \(0, 1\], or None \(off\)"):
        cfg(f"loss.ld_alpha={alpha}")


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 1.0])
def test_ld_alpha_in_range_is_kept(alpha):
    assert cfg(f"loss.ld_alpha={alpha}").loss.ld_alpha == alpha
    assert cfg().loss.ld_alpha is None  # off by default


def test_ld_alpha_with_sft_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="None for name='sft': it has no answer pair"):
        LossConfig(name="sft", ld_alpha=0.5)


def test_use_weighting_must_be_a_bool():
    with pytest.raises(
        ValueError, match=r"use_weighting='yes' is invalid; accepted: True or False"
    ):
        LossConfig(use_weighting="yes")
    assert cfg("loss.use_weighting=true").loss.use_weighting is True


def _stats(*overrides):
    config = cfg(*overrides)
    return step_stats(StepContext.from_config(config, resolve(config, 2, CPU), parallel=None))


def test_token_metrics_switch_and_wpo_choose_the_statistics():
    assert _stats() == ("logit_sum", "entropy", "top1")  # TRL's metrics on by default
    assert _stats("logging.token_metrics=false") == ("logit_sum",)
    wpo = _stats("logging.token_metrics=false", "loss.use_weighting=true")
    assert wpo == ("logit_sum", "log_sum_sq_probs")  # WPO's weights need it regardless


def test_precomputed_ld_alpha_must_match_the_run():
    run = cfg("loss.ld_alpha=0.5")
    assert ld_alpha_error({"ld_alpha": 0.5}, run, "REF") is None
    assert ld_alpha_error({}, cfg(), "REF") is None  # files from before LD-DPO: unweighted
    error = ld_alpha_error({}, run, "REF")
    assert error == (
        "reference.path=REF was precomputed with loss.ld_alpha=None, but this run has "
        "loss.ld_alpha=0.5 (LD-DPO weights the reference's log-prob sums too); re-run "
        "tools/precompute_reference.py with this config"
    )
    with pytest.raises(ConfigError, match="precomputed with loss.ld_alpha=0.3"):
        check_precomputed_loss({"ld_alpha": 0.3}, run, "REF")
