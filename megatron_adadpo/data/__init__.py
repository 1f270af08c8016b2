"""Preference data pipeline: records -> tokenized pairs -> DP-aware sampler -> `[2B, S]` batches.

Public API (imported on first use, so that `megatron_adadpo.data.config` imports nothing heavy):
    DataConfig                    settings (config.py)
    load_preference_dataset       preprocessed dir or raw inputs (cached) -> PreferenceDataset
    preprocess                    raw inputs -> on-disk pairs + manifest (tools/preprocess_data.py)
    PreferenceDataset             ds[i] -> chosen_ids, rejected_ids, prompt_length, pair_id
    PreferenceSampler             per-rank micro-batches of pair indices, resumable
    collate_pairs, pad_multiple   interleaved [c0, r0, c1, r1, ...] micro-batch tensors
    load_tokenizer                HF tokenizer dir or sentencepiece model, one BOS/EOS policy
    RowRejected                   a row refused by a stage (reason, detail)
    DataError, DataReport, RowIssue   bad rows (with their location) and counts
"""

from __future__ import annotations

from megatron_adadpo.lazy import lazy_exports

_EXPORTS = {
    "collate_pairs": ".collate",
    "pad_multiple": ".collate",
    "DataConfig": ".config",
    "PreferenceDataset": ".indexed",
    "read_manifest": ".indexed",
    "check_manifest": ".pipeline",
    "load_preference_dataset": ".pipeline",
    "preprocess": ".pipeline",
    "PreferenceRecord": ".records",
    "normalize_row": ".records",
    "DataError": ".report",
    "DataReport": ".report",
    "RowIssue": ".report",
    "RowRejected": ".report",
    "PreferenceSampler": ".sampler",
    "PairTokenizer": ".tokenize",
    "TokenizedPair": ".tokenize",
    "load_tokenizer": ".tokenize",
    "tokenize_record": ".tokenize",
    "truncate_pair": ".truncation",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
