"""The run's datasets on every rank: rank 0 tokenizes (or opens) them first, the others wait.

Tokenizing raw ``data.inputs`` on the fly can take longer than the process group's timeout, so
the other ranks wait on a gloo group of their own with ``train.data_wait_minutes`` as its
timeout; running out of it is an error that says what rank 0 was doing and the fix. The
tokenizer's vocabulary and the data's largest token id are checked against the model's before
any model exists (the files' checksums were verified when the dataset was opened).
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from megatron_adadpo.config import Config
from megatron_adadpo.config_checks import CHOSEN_ONLY_LOSSES
from megatron_adadpo.data import load_preference_dataset
from megatron_adadpo.run.state.consistency import check_vocab


class DataWaitTimeout(ValueError):
    """A rank waited longer than ``train.data_wait_minutes`` for rank 0's data."""


def load_dataset(config: Config, eval_split: bool = False):
    """``data`` (or the ``eval.inputs`` pairs) on this rank; rank 0 fills the cache first."""
    data = config.data.replace(inputs=tuple(config.eval.inputs)) if eval_split else config.data
    if config.loss.name in CHOSEN_ONLY_LOSSES:  # rows need no rejected answer
        data = data.replace(rejected_optional=True)
    minutes = config.train.data_wait_minutes
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes))
    if dist.get_rank() == 0:
        dataset = load_preference_dataset(data)
    try:
        dist.barrier(group=group)
    except RuntimeError as err:  # gloo: "Timed out waiting ..." / a peer that left
        raise DataWaitTimeout(
            f"rank {dist.get_rank()} waited {minutes:g} min (train.data_wait_minutes) for rank 0 "
            f"to tokenize {'eval.inputs' if eval_split else 'data.inputs'} into the cache "
            f"({' '.join(str(err).split())[:120]}); tokenize once beforehand with "
            "tools/preprocess_data.py and set data.preprocessed, or raise "
            "train.data_wait_minutes"
        ) from None
    finally:
        dist.destroy_process_group(group)
    if dist.get_rank() != 0:
        dataset = load_preference_dataset(data)
    tokenizer = data.tokenizer or data.preprocessed
    check_vocab(config, dataset.vocab_size, tokenizer, dataset.max_token_id, dataset.directory)
    return dataset
