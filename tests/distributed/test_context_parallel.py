"""Context parallelism: each CP rank gets Megatron's zigzag share of every per-token tensor, and
the step's loss, metrics, gradient norm and updated weights equal CP = 1.

Rules reproduced: ``megatron/core/utils.py`` ``get_batch_on_this_cp_rank`` (0.16.1; 0.19's
per-sequence branch) and RoPE's ``rope_utils.get_pos_emb_on_this_cp_rank`` (the positions a CP
rank's rotary embedding uses), compared directly; ``pipeline_parallel/schedules.py``
``get_tensor_shapes`` (p2p buffers ``[S/CP (/TP with SP), b, h]`` from the schedule's
``seq_length``). Attention under CP needs Transformer Engine, so the equivalence runs a
position-wise stand-in model (each position's logits depend on its own token and position only,
which is what CP attention delivers) through the real trainer pieces: ``step_batches`` (the
split), ``ResidentReference`` (forward-only schedule on the split batches), ``train_step``
(Megatron's schedule, the real ``loss_func``, DDP over DP x CP, ``finalize_model_grads``, the
optimizer).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_adadpo.config import from_dict, read_yaml
from megatron_adadpo.layout import ExecutionConfig
from megatron_adadpo.run.context_parallel import zigzag_positions
from megatron_adadpo.run.microbatch import MicroBatch
from tests.launcher import run_ranks

pytestmark = pytest.mark.distributed

QUICKSTART = Path(__file__).resolve().parents[2] / "examples/configs/quickstart.yaml"
VOCAB, HIDDEN, MAX_POS = 48, 16, 64
PAD = 8  # every layout below pads to 8 (CP4's multiple), so token counts compare exactly


PER_TOKEN = ("tokens", "labels", "loss_mask", "position_ids")


def _batch(rows: int = 4, seq: int = 16) -> MicroBatch:
    g = torch.Generator().manual_seed(5)
    return MicroBatch(
        tokens=torch.randint(0, VOCAB, (rows, seq), generator=g),
        labels=torch.randint(0, VOCAB, (rows, seq), generator=g),
        loss_mask=(torch.rand(rows, seq, generator=g) > 0.4).float(),
        position_ids=torch.arange(seq).expand(rows, seq).clone(),
        pair_ids=torch.tensor([3, 8]),
        real_tokens=torch.tensor(rows * seq),
        reference_logps=torch.randn(rows, generator=g),
    )


def _megatron_split(rank, world):
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    from megatron_adadpo.platform.distributed import init_model_parallel
    from megatron_adadpo.platform.megatron import get_batch_on_this_cp_rank

    parallel = init_model_parallel(ExecutionConfig(cp=world))
    batch = _batch()
    per_token = {k: getattr(batch, k).clone() for k in PER_TOKEN}
    megatron = get_batch_on_this_cp_rank(per_token, parallel.cp)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # RoPE indexes on the GPU
    positions = torch.arange(batch.tokens.shape[1], dtype=torch.float32, device=device)
    rope_positions = get_pos_emb_on_this_cp_rank(positions, 0, parallel.cp).cpu()
    ours = batch.on_cp_rank(parallel.cp_rank, parallel.cp_size)
    return megatron, rope_positions, ours


@pytest.mark.parametrize("cp", [2, 4])
def test_split_equals_megatron_get_batch_on_this_cp_rank(cp):
    full = _batch()
    shares = run_ranks(_megatron_split, cp)
    for rank, (megatron, rope_positions, ours) in enumerate(shares):
        for key, value in megatron.items():
            assert torch.equal(getattr(ours, key), value), (rank, key)
            assert getattr(ours, key).shape == (4, 16 // cp)
        assert torch.equal(ours.position_ids[0].float(), rope_positions)  # what RoPE uses
        assert torch.equal(ours.pair_ids, full.pair_ids)  # per pair: whole
        assert torch.equal(ours.reference_logps, full.reference_logps)
        assert torch.equal(ours.real_tokens, full.real_tokens)
        assert ours.sequence_length == 16  # the whole S, for Megatron's p2p buffers
    order = torch.cat([ours.tokens for _, _, ours in shares], dim=1)  # every token once
    assert sorted(order[0].tolist()) == sorted(full.tokens[0].tolist())


def test_zigzag_positions_and_bad_lengths():
    assert zigzag_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by 2\\*CP = 4"):
        zigzag_positions(10, 0, 2)
    batch = _batch()
    assert batch.on_cp_rank(0, 1) is batch


def _stand_in_model(config, seed: int):
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class PositionwiseLM(MegatronModule):
        """``logits[b, s] = tanh(E[token] + P[position]) @ W``: ``[b, s, vocab]``."""

        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            g = torch.Generator().manual_seed(seed)
            self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=g) * 0.5)
            self.position = torch.nn.Parameter(torch.randn(MAX_POS, HIDDEN, generator=g) * 0.5)
            self.output = torch.nn.Parameter(torch.randn(HIDDEN, VOCAB, generator=g) * 0.5)

        def set_input_tensor(self, tensor):
            pass

        def forward(self, tokens, position_ids, attention_mask):
            return torch.tanh(self.embedding[tokens] + self.position[position_ids]) @ self.output

    return PositionwiseLM()


class Pairs:
    """Preference pairs of random lengths (5..20 tokens, prompt 2..4), token ids < VOCAB."""

    pad_id = 0

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(11)
        self.rows = []
        for i in range(n):
            prompt = int(torch.randint(2, 5, (1,), generator=g))
            lengths = torch.randint(prompt + 1, 21, (2,), generator=g).tolist()
            ids = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
            ids[1][:prompt] = ids[0][:prompt]
            self.rows.append(
                {
                    "chosen_ids": ids[0],
                    "rejected_ids": ids[1],
                    "prompt_length": prompt,
                    "pair_id": i,
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def lengths(self):
        """``[N, 3]`` prompt, chosen and rejected completion lengths (as the datasets')."""
        p = [r["prompt_length"] for r in self.rows]
        chosen = [len(r["chosen_ids"]) - n for r, n in zip(self.rows, p, strict=True)]
        rejected = [len(r["rejected_ids"]) - n for r, n in zip(self.rows, p, strict=True)]
        return np.array([p, chosen, rejected]).T


def _train_rank(rank, world, cp, steps, extra=()):
    from megatron_adadpo.model.build import transformer_config
    from megatron_adadpo.platform.distributed import init_model_parallel
    from megatron_adadpo.platform.machine import probe_machine
    from megatron_adadpo.resolve import Machine, resolve
    from megatron_adadpo.run.batches import step_batches
    from megatron_adadpo.run.metrics import reduce_metrics
    from megatron_adadpo.run.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megatron_adadpo.run.reference import ResidentReference
    from megatron_adadpo.run.step import StepContext, train_step

    sets = [f"execution.cp={cp}", "execution.tp=1", "execution.transformer_impl=auto"]
    sets += ["train.global_batch_size=8", "train.micro_batch_size=2", "optimizer.lr=0.05"]
    sets += ["optimizer.warmup_fraction=0.0", "optimizer.decay_style=constant", *extra]
    config = from_dict(read_yaml(QUICKSTART, sets))
    parallel = init_model_parallel(config.execution, seed=1)
    tconfig = transformer_config(config.model, config.execution)
    policy = wrap_ddp([_stand_in_model(tconfig, seed=3)], config.optimizer)
    optimizer = build_optimizer(policy, config.optimizer, bf16=False)
    scheduler = build_scheduler(optimizer, config.optimizer, steps, 8)
    context = StepContext(config.loss, VOCAB, parallel, global_batch_size=8)
    reference = ResidentReference([_stand_in_model(tconfig, seed=0)], policy, context)
    # The stand-in model is this test's context-parallel attention: the run is resolved as on
    # a machine with Transformer Engine, its tensors on this machine's device.
    run = resolve(config, world, Machine(has_cuda=True, has_te=True))
    here = dataclasses.replace(run.kernels, cuda=probe_machine().has_cuda)
    run = dataclasses.replace(run, kernels=here)
    batches = step_batches(config, run, Pairs(), parallel, 0)
    batches.policy = dataclasses.replace(batches.policy, pad_multiple=PAD)
    history = []
    for _ in range(steps):
        micro = batches.next_step()
        assert all(b.tokens.shape[1] * cp % PAD == 0 for b in micro)
        reference.attach(micro)
        result = train_step(policy, optimizer, scheduler, micro, context)
        history.append((reduce_metrics(result.metrics), float(result.grad_norm)))
    weights = {n: p.detach().clone() for n, p in policy[0].module.named_parameters()}
    return history, weights


LAYOUTS = {"dp2": (2, 1), "dp1_cp2": (2, 2), "dp2_cp2": (4, 2), "dp1_cp4": (4, 4)}


@pytest.fixture(scope="module")
def cp1():
    return run_ranks(_train_rank, 1, 1, 3, timeout=180)[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_step_equals_cp1(layout, cp1):
    world, cp = LAYOUTS[layout]
    _assert_same_steps(run_ranks(_train_rank, world, cp, 3, timeout=240), cp1)


def test_ld_dpo_step_equals_cp1():
    """LD-DPO's per-token weights need each token's completion position over the whole
    sequence: the zigzag split (CP2, CP4) must give CP1's sums, losses and updated weights."""
    ld = ["loss.ld_alpha=0.4"]
    want = run_ranks(_train_rank, 1, 1, 3, ld, timeout=180)[0]
    plain = run_ranks(_train_rank, 1, 1, 3, timeout=180)[0]
    step_one = want[0][0][0], plain[0][0][0]  # (history, weights) -> step 1's metrics
    assert step_one[0]["logps/chosen"] != step_one[1]["logps/chosen"]  # the weights apply
    for world, cp in ((2, 2), (4, 4)):
        _assert_same_steps(run_ranks(_train_rank, world, cp, 3, ld, timeout=240), want)


def _assert_same_steps(results: list, cp1) -> None:
    ref_history, ref_weights = cp1
    assert ref_history[0][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == ref
    assert abs(ref_history[1][0]["loss"] - math.log(2)) > 1e-3  # policy moved: not trivial
    for rank, (history, weights) in enumerate(results):
        for step, ((metrics, norm), (ref_metrics, ref_norm)) in enumerate(
            zip(history, ref_history, strict=True), start=1
        ):
            assert set(metrics) == set(ref_metrics)
            for name, ref in ref_metrics.items():  # loss, rewards, log-probs, batch/tokens ...
                assert metrics[name] == pytest.approx(ref, rel=1e-5, abs=1e-6), (step, name)
            assert norm == pytest.approx(ref_norm, rel=1e-5), (rank, step)
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, rtol=1e-5, atol=1e-6)


def test_pipeline_buffers_match_the_local_sequence(monkeypatch):
    """``run_schedule`` hands Megatron the whole ``S``: its p2p buffer shape is then exactly the
    hidden states a CP rank's stage sends, ``[S/CP/TP (SP), 2B, h]``."""
    from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

    from megatron_adadpo.run import step

    captured = {}
    monkeypatch.setattr(step, "get_forward_backward_func", lambda: lambda **kw: captured.update(kw))
    cp, tp, full_seq, rows, hidden = 2, 4, 64, 6, 32
    # variable_seq_lengths: megatron-core 0.19.2 get_tensor_shapes reads it (schedules.py line
    # 2104: True returns [()] and exchanges shapes); False computes the fixed buffer shape.
    config = SimpleNamespace(
        context_parallel_size=cp,
        sequence_parallel=True,
        hidden_size=hidden,
        variable_seq_lengths=False,
    )
    local = _batch(rows, full_seq).on_cp_rank(1, cp)
    step.run_schedule([SimpleNamespace(config=config)], [local], None, forward_only=True)
    shapes = get_tensor_shapes(
        seq_length=captured["seq_length"],
        micro_batch_size=captured["micro_batch_size"],
        decoder_seq_length=None,
        config=config,
        tp_group=SimpleNamespace(size=lambda: tp),
        cp_group=SimpleNamespace(size=lambda: cp),
    )
    assert list(shapes[0]) == [local.tokens.shape[1] // tp, rows, hidden] == [8, 6, 32]
