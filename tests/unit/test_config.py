"""Run-config loading: overrides, type coercion, and every check naming its field and fix."""

import importlib.util
import typing
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from megatron_adadpo import train
from megatron_adadpo.config import ConfigError, load_config
from megatron_adadpo.layout import data_parallel_size
from megatron_adadpo.resolve import CPU, resolve

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"


def cfg(*overrides):
    return load_config(QUICKSTART, list(overrides))


def test_quickstart_loads_and_overrides_apply_in_order():
    c = cfg("loss.beta=0.05", "optimizer.lr=3e-4", "execution.tp=1", "loss.beta=0.2")
    assert c.loss.beta == 0.2 and c.loss.adaptive is True and c.loss.name == "adadpo"
    assert c.optimizer.lr == 3e-4 and isinstance(c.optimizer.lr, float)  # "3e-4" is a string
    assert c.execution.tp == 1 and c.model.num_layers == 4
    assert c.data.inputs == ("examples/data/prefs_train.jsonl",)
    again = load_config(None, [f"{k}" for k in _flatten(c.to_dict())])
    assert again == c  # the resolved config stored with checkpoints reproduces the run


def _flatten(d, prefix=""):
    """``a.b=<yaml>`` overrides that rebuild ``d`` from nothing."""
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "hf_extra":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            yield f"{prefix}{key}={text.removesuffix('...').strip()}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.x=1"], r"unknown config sections \['trainer'\]"),
        (["loss.betta=0.1"], r"unknown keys \['loss.betta'\]"),
        (["loss.beta=-1"], "beta"),
        (["loss.name=kto"], "kto"),
        (["optimizer.lr=abc"], r"optimizer.lr='abc' must be a number"),
        (["train.micro_batch_size=1.5"], "must be an integer"),
        (["optimizer.min_lr=1.0"], r"optimizer.min_lr=1.0 must be in \[0, optimizer.lr"),
        (["execution.tp=3"], r"execution.tp=3 must divide model.num_attention_heads=4"),
        (["execution.pp=3"], r"model.num_layers=4 must be divisible by execution.pp\*vpp = 3"),
        (["execution.pp=2", "execution.vpp=4"], r"execution.pp\*vpp = 8"),
        (["execution.tp=1", "execution.sequence_parallel=true"], "needs execution.tp > 1"),
        (["execution.recompute=partial"], "execution.recompute='partial'"),
        (["execution.fp8=hybrid"], "Transformer Engine"),
        (["execution.transformer_impl=transformer_engine"], "Transformer Engine"),
        (["execution.cp=2"], "execution.cp > 1 needs Transformer Engine"),
        (["reference.mode=precomputed"], "needs reference.path"),
        (["reference.mode=none"], "needs reference log-probs"),
        (["reference.mode=cached"], "reference.mode='cached'"),
        (["eval.inputs=[]"], "eval.interval > 0 needs eval.inputs"),
        (["train.nan_policy=ignore"], "train.nan_policy='ignore'"),
        (["optimizer.decay_style=step"], "optimizer.decay_style='step'"),
        (["execution.pp=2", "data.max_length=127"], None),  # TP1 no SP: multiple of 1 is fine
        (["data.max_length=0"], "data.max_length"),
        (["data.overlength=cut"], "data.overlength"),
        (["execution.logprob_chunk_tokens=-8"], "execution.logprob_chunk_tokens=-8"),
        (["execution.logprob_chunk_tokens=automatic"], "accepted: 0 \\(off\\)"),
        (["execution.logprob_chunk_tokens=true"], "execution.logprob_chunk_tokens=True"),
        (["execution.logprob_chunk_tokens=auto"], None),
        (["execution.logprob_chunk_tokens=1000"], None),
        # values of the wrong type (were tracebacks): one line naming the field
        (["train.train_iters=abc"], r"^train.train_iters='abc' must be an integer$"),
        (["train.seed=[1]"], r"train.seed=\[1\] must be an integer"),
        (["checkpoint.resume=1"], "checkpoint.resume=1 must be true or false"),
        (["logging.run_dir=5"], "logging.run_dir=5 must be a string"),
        (["eval.inputs=x.jsonl"], "eval.inputs='x.jsonl' must be a list"),
        (["model.rope_scaling={factr: 8}"], r"model.rope_scaling: unknown keys \['factr'\]"),
        (["model.rope_scaling={factor: big}"], "model.rope_scaling.factor='big' must be a number"),
        (["model.rope_scaling=8"], "model.rope_scaling=8 must be a mapping"),
        # ranges
        (["train.train_iters=-5"], r"train.train_iters=-5 must be an integer >= 1"),
        (["train.train_iters=0"], r"train.train_iters=0 must be an integer >= 1"),
        (["train.epochs=0"], "train.epochs=0 must be an integer >= 1"),
        (["train.seed=-1"], "train.seed=-1 must be >= 0"),
        (["checkpoint.save_interval=-1"], "checkpoint.save_interval=-1 must be >= 0"),
        (["logging.log_interval=0"], "logging.log_interval=0 must be an integer >= 1"),
        (["logging.peak_tflops=0"], "logging.peak_tflops=0.0 must be > 0"),
        (["eval.interval=-2"], "eval.interval=-2 must be >= 0"),
        (["eval.max_pairs=0"], "eval.max_pairs=0 must be an integer >= 1"),
        (["optimizer.clip_grad=-1"], "optimizer.clip_grad=-1.0 must be >= 0"),
        (["optimizer.adam_beta2=1"], r"optimizer.adam_beta2=1.0 must be in \[0, 1\)"),
        (["optimizer.adam_eps=0"], "optimizer.adam_eps=0.0 must be > 0"),
        (["optimizer.overlap_grad_reduce=true", "optimizer.ddp_bucket_size=0"], "bucket_size=0"),
        (["optimizer.ddp_bucket_size=1000"], "ddp_bucket_size applies only with"),
        (["optimizer.overlap_grad_reduce=true", "optimizer.ddp_bucket_size=1000"], None),
        (["train.data_wait_minutes=0"], "train.data_wait_minutes=0.0 must be > 0"),
        (["train.distributed_timeout_minutes=0"], "distributed_timeout_minutes=0.0 must be > 0"),
        (["data.max_length=512"], "data.max_length=512 exceeds model.max_position_embeddings=256"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    if message is None:
        cfg(*overrides)
        return
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg(*overrides)


def _float_fields():
    """Every field typed ``float`` in the config's section classes (and ``model.rope_scaling``),
    found from the type hints, independently of how the config checks them."""
    from megatron_adadpo.config import Config
    from megatron_adadpo.model.config import RopeScaling

    sections = {"model.rope_scaling": RopeScaling}
    for name, hint in typing.get_type_hints(Config).items():
        sections[name] = next(a for a in (*typing.get_args(hint), hint) if a is not type(None))
    for section, cls in sections.items():
        for key, hint in typing.get_type_hints(cls).items():
            if float in (*typing.get_args(hint), hint):
                yield f"{section}.{key}"


FLOAT_FIELDS = list(_float_fields())


def test_float_fields_are_found():
    assert {"optimizer.lr", "optimizer.min_lr", "loss.beta", "model.rope_scaling.factor"} <= set(
        FLOAT_FIELDS
    )


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_every_float_field_refuses_non_finite_values_naming_itself(field):
    """``optimizer.lr=inf`` was accepted (and died at step 2); ``lr=nan`` blamed ``min_lr``."""
    section, key = field.rsplit(".", 1)
    for text in ("inf", "-inf", "nan", ".inf"):
        override = f"{section}={{{key}: {text}}}" if "rope" in section else f"{field}={text}"
        with pytest.raises(ConfigError) as refused:
            cfg(override)
        value = float(text.lstrip("."))
        assert str(refused.value) == f"{field}={value!r} must be a finite number", override


def test_tensorboard_without_the_package_is_refused(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    with pytest.raises(ConfigError, match="logging.tensorboard: true needs the tensorboard"):
        cfg("logging.tensorboard=true")


def test_world_size_and_batch_divisibility():
    c = cfg("execution.tp=2")
    resolve(c, 4, CPU)
    assert data_parallel_size(c.execution, 4) == 2  # DP = 2
    with pytest.raises(ConfigError, match="3 processes are not divisible by execution.tp"):
        resolve(c, 3, CPU)
    with pytest.raises(ConfigError, match="global_batch_size=16 must be divisible by"):
        resolve(cfg("execution.tp=1", "train.micro_batch_size=3"), 1, CPU)
    vpp = cfg(
        "execution.tp=1",
        "execution.pp=2",
        "execution.vpp=2",
        "train.global_batch_size=12",
        "train.micro_batch_size=4",
    )
    with pytest.raises(ConfigError, match=r"micro-batches \(3\) to be a multiple of"):
        resolve(vpp, 2, CPU)


def test_config_errors_come_before_any_process_group():
    with pytest.raises(ConfigError, match="execution.tp=3"):
        train.main(["--config", str(QUICKSTART), "--set", "execution.tp=3"])
    assert not dist.is_initialized()


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        cfg("loss.beta")
    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  num_layers: 2\n   hidden_size: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: YAML syntax error at line 3, column 15: "):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^--set loss.beta=\[1: YAML syntax error at line 1"):
        cfg("loss.beta=[1")


@pytest.mark.parametrize(
    "tp, bf16, vocab, expected",
    [
        (1, True, 128256, 512),  # 512 MiB / (128256 x 6 B) = 697 tokens -> 512
        (1, False, 128256, 1024),  # 4 B per logit: 1046 -> 1024
        (8, True, 128256, 5376),  # v/tp = 16032: 5581 -> 5376
        (1, True, 1_000_064, 256),  # budget smaller than one multiple: the minimum
    ],
)
def test_auto_logprob_chunk_follows_the_budget(tp, bf16, vocab, expected):
    from megatron_adadpo.layout import ExecutionConfig, logprob_chunk_tokens

    auto = ExecutionConfig(tp=tp, bf16=bf16, logprob_chunk_tokens="auto")
    assert logprob_chunk_tokens(auto, vocab) == expected
    fixed = ExecutionConfig(tp=tp, bf16=bf16, logprob_chunk_tokens=300)
    assert logprob_chunk_tokens(fixed, vocab) == 300
    assert logprob_chunk_tokens(ExecutionConfig(tp=tp), vocab) == 0


def _checkpoint_dir(tmp_path, model, tokenizer_files: dict[str, bytes]):
    """A stand-in converted checkpoint: model.yaml and tokenizer/ (no weights needed)."""
    from megatron_adadpo.model.config import write_model_config

    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    write_model_config(ckpt, model)
    for name, data in tokenizer_files.items():
        (ckpt / "tokenizer" / name).write_bytes(data)
    return ckpt


@pytest.mark.parametrize(
    "field, value",
    [
        ("rotary_base", 500000.0),
        ("norm_epsilon", 1e-6),
        ("max_position_embeddings", 512),
        ("rope_scaling", {"factor": 8.0}),
        ("hidden_size", 256),
    ],
)
def test_init_checkpoint_of_another_model_is_refused_before_building(tmp_path, field, value):
    from megatron_adadpo.model.config import ModelConfig

    model = cfg().model.to_dict() | {field: value}
    if field == "hidden_size":
        model["ffn_hidden_size"] = 512
    tok = Path(cfg().data.tokenizer)
    files = {p.name: p.read_bytes() for p in tok.iterdir()}
    ckpt = _checkpoint_dir(tmp_path, ModelConfig.from_dict(model), files)
    with pytest.raises(ConfigError, match=rf"train.init_checkpoint: checkpoint .*\({field}: "):
        cfg(f"train.init_checkpoint={ckpt}")


def test_tokenizer_other_than_init_checkpoints_is_refused(tmp_path):
    config = cfg()
    tok = Path(config.data.tokenizer)
    files = {p.name: p.read_bytes() for p in tok.iterdir()}
    ckpt = _checkpoint_dir(tmp_path, config.model, files | {"generation_config.json": b"{}"})
    assert cfg(f"train.init_checkpoint={ckpt}").train.init_checkpoint == str(ckpt)  # same files
    other = dict(files)
    other["tokenizer.json"] = files["tokenizer.json"].replace(b"<|user|>", b"<|usr|>")
    ckpt2 = _checkpoint_dir(tmp_path / "b", config.model, other)
    with pytest.raises(ConfigError, match=r"is not the tokenizer of train.init_checkpoint"):
        cfg(f"train.init_checkpoint={ckpt2}")
    with pytest.raises(ConfigError, match=r"set data.tokenizer: .*ckpt/tokenizer"):
        cfg(f"train.init_checkpoint={ckpt2}")
