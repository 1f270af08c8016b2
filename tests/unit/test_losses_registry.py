"""One file per loss family: each declares its knobs through the registry; no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from megatron_adadpo.config import from_dict, load_config
from megatron_adadpo.losses import LOSSES, LossConfig
from megatron_adadpo.losses.registry import FAMILY_MODULES, knob_owners
from tests.unit.test_losses_names import _run_config

LOSSES_DIR = Path(__file__).resolve().parents[2] / "megatron_adadpo" / "losses"
QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"
# TRL 1.16.0's DPOConfig.loss_type values (trl/trainer/dpo_trainer.py `_compute_loss`); TRL's
# "sigmoid" is dpo here, its "sft" is the sft family or loss.sft_weight.
TRL_LOSS_TYPES = (
    "hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down "
    "discopop sigmoid_norm"
).split()


def _imports(path: Path) -> set[str]:
    """``losses`` modules that ``path`` imports anywhere (TYPE_CHECKING blocks included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("megatron_adadpo.losses."):
                out.add(name.split(".")[2])
    return out


def test_no_import_circle_in_losses():
    graph = {p.stem: _imports(p) for p in LOSSES_DIR.glob("*.py")}
    assert "common" not in graph["config"] and not graph["registry"]  # the old circle
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_every_family_is_its_own_file_with_trls_name():
    assert set(LOSSES) == set(FAMILY_MODULES)
    for name in FAMILY_MODULES:
        assert (LOSSES_DIR / f"{name}.py").is_file()
        assert LOSSES[name].compute.__module__ == f"megatron_adadpo.losses.{name}"
    assert set(TRL_LOSS_TYPES) <= set(LOSSES)


def test_knobs_live_with_their_family():
    assert knob_owners() == {
        "ipo_tau": "ipo",
        "simpo_gamma": "simpo",
        "rdpo_alpha": "rdpo",
        "cpo_alpha": "cpo",
        "orpo_lambda": "orpo",
        "discopop_tau": "discopop",
    }
    cfg = LossConfig(name="simpo", simpo_gamma=0.3)
    assert cfg.simpo_gamma == 0.3 and cfg.knobs.simpo_gamma == 0.3
    assert "ipo_tau" not in cfg.to_dict() and cfg.to_dict()["simpo_gamma"] == 0.3
    with pytest.raises(AttributeError, match="rdpo_alpha"):
        cfg.rdpo_alpha  # noqa: B018


def test_a_misplaced_knob_names_its_family():
    with pytest.raises(ValueError) as info:
        LossConfig(name="dpo", simpo_gamma=0.3)
    assert "LossConfig.simpo_gamma=0.3" in str(info.value) and "'simpo'" in str(info.value)
    with pytest.raises(ValueError, match="unknown loss option LossConfig.simpo_gama"):
        LossConfig(name="simpo", simpo_gama=0.3)
    # configs saved before the knobs moved held every family's knob at its default: accepted
    old = LossConfig(name="dpo", ipo_tau=None, simpo_gamma=0.05, rdpo_alpha=0.05, cpo_alpha=1.0)
    assert old == LossConfig(name="dpo")


def test_yaml_keys_stay_flat_under_loss_and_round_trip():
    config = from_dict(_run_config({"name": "discopop", "discopop_tau": "1e-1", "adaptive": True}))
    assert config.loss.discopop_tau == 0.1 and config.to_dict()["loss"]["discopop_tau"] == 0.1
    assert from_dict(config.to_dict()) == config
    quick = load_config(QUICKSTART, ["loss.name=ipo", "loss.ipo_tau=0.25"])
    assert quick.loss.ipo_tau == 0.25
    with pytest.raises(ValueError, match="loss.name='ipo'"):
        load_config(QUICKSTART, ["loss.ipo_tau=0.25"])  # quickstart trains adadpo


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        LossConfig(beta=-1.0, clip_max=0.0, sft_weight=-1.0, ld_alpha=2.0)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    for field in ("beta", "clip_max", "sft_weight", "ld_alpha"):
        assert any(line.startswith(f"LossConfig.{field}=") for line in lines)
