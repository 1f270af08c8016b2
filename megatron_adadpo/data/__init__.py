"""Preference data pipeline: records -> tokenized pairs -> DP-aware sampler -> `[2B, S]` batches.

Public API:
    DataConfig                    settings (config.py)
    load_preference_dataset       preprocessed dir or raw inputs (cached) -> PreferenceDataset
    preprocess                    raw inputs -> on-disk pairs + manifest (tools/preprocess_data.py)
    PreferenceDataset             ds[i] -> chosen_ids, rejected_ids, prompt_length, pair_id
    PreferenceSampler             per-rank micro-batches of pair indices, resumable
    collate_pairs, pad_multiple   interleaved [c0, r0, c1, r1, ...] micro-batch tensors
    load_tokenizer                HF tokenizer dir or sentencepiece model, one BOS/EOS policy
    DataError, DataReport, RowIssue   bad rows and counts
"""

from .collate import collate_pairs, pad_multiple
from .config import DataConfig
from .indexed import PreferenceDataset, read_manifest
from .pipeline import check_manifest, load_preference_dataset, preprocess
from .records import PreferenceRecord, normalize_row
from .report import DataError, DataReport, RowIssue
from .sampler import PreferenceSampler
from .tokenize import PairTokenizer, TokenizedPair, load_tokenizer, tokenize_record
from .truncation import truncate_pair

__all__ = [
    "DataConfig",
    "DataError",
    "DataReport",
    "PairTokenizer",
    "PreferenceDataset",
    "PreferenceRecord",
    "PreferenceSampler",
    "RowIssue",
    "TokenizedPair",
    "check_manifest",
    "collate_pairs",
    "load_preference_dataset",
    "load_tokenizer",
    "normalize_row",
    "pad_multiple",
    "preprocess",
    "read_manifest",
    "tokenize_record",
    "truncate_pair",
]
