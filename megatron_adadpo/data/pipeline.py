"""Preprocess inputs into the on-disk format, and load a dataset for training.

`preprocess` reads every source in order, tokenizes rows in `num_workers` processes (rows go to
workers in chunks, results come back in order, so the output does not depend on the worker
count), writes the pairs, the report and the manifest. A row refused by any stage raises
`RowRejected`; `_process_chunk` turns it into a `RowIssue` at the row's location (the one place
that does). `load_preference_dataset` opens a preprocessed directory (checking its manifest and
its files' checksums: a damaged one is refused) or preprocesses raw inputs into a cache keyed by
the identity hash (a damaged cache entry is rebuilt, with a warning).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .config import REJECTED_OPTIONAL, TRUNCATION_MODE, DataConfig, default_cache_dir
from .indexed import (
    MANIFEST,
    PairWriter,
    PreferenceDataset,
    compute_identity,
    publish,
    write_manifest,
)
from .integrity import DataIntegrityError, seal, verify
from .outputs import check_output_dir, manifest_or_none, new_partial
from .records import normalize_row
from .report import DataError, DataReport, RowIssue, RowRejected
from .sources import InputSource, Location
from .tokenize import PairTokenizer, load_tokenizer, tokenize_record
from .truncation import Truncated, truncate_pair

logger = logging.getLogger(__name__)
ROWS_PER_CHUNK = 256
_WORKER_STATE: dict[str, Any] = {}  # this process's config and tokenizer


def _init_worker(config: DataConfig) -> None:
    """Pool initializer: the config and tokenizer `_process_chunk` uses in this process."""
    if _WORKER_STATE.get("config") != config:  # forked workers inherit the parent's tokenizer
        _WORKER_STATE["config"] = config
        _WORKER_STATE["tok"] = load_tokenizer(config.tokenizer, config.tokenizer_kind)


def _process_row(cfg: DataConfig, tok: PairTokenizer, pair_id: int, row: Any) -> Truncated:
    """One row -> its tokenized, truncated pair; raises RowRejected when a stage refuses it."""
    if isinstance(row, RowRejected):  # refused while reading its source
        raise row
    fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    record = normalize_row(row, pair_id, fields, cfg.schema, cfg.rejected_optional)
    pair = tokenize_record(tok, record, cfg.chat_template, cfg.chat_template_tail)
    return truncate_pair(
        pair,
        cfg.max_length,
        cfg.max_prompt_length,
        cfg.overlength,
        tok.bos_id,
        cfg.truncation_mode,
    )


def _process_chunk(chunk: list[tuple[int, Location, Any]]) -> tuple[DataReport, tuple]:
    """Rows -> (chunk report, (flat tokens, sequence lengths [3 per pair], pair ids))."""
    cfg, tok = _WORKER_STATE["config"], _WORKER_STATE["tok"]
    report, parts, lengths, pair_ids = DataReport(), [], [], []
    for pid, loc, row in chunk:
        report.rows_read += 1
        try:
            item = _process_row(cfg, tok, pid, row)
        except RowRejected as e:
            issue = RowIssue(loc.source, loc.index, loc.index_kind, e.reason, e.detail)
            report.issues.append(issue)
            continue
        pair = item.pair
        parts += [pair.prompt, pair.chosen, pair.rejected]
        lengths += [len(pair.prompt), len(pair.chosen), len(pair.rejected)]
        pair_ids.append(pair.pair_id)
        report.pairs_written += 1
        report.prompt_truncated += item.prompt_truncated
        report.chosen_truncated += item.chosen_truncated
        report.rejected_truncated += item.rejected_truncated
        report.length_histogram[lengths[-3] + max(lengths[-2], lengths[-1])] += 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return report, (tokens, lengths, pair_ids)


def _numbered_rows(sources: list[InputSource]) -> Iterator[tuple[int, Location, Any]]:
    rows = itertools.chain.from_iterable(src.rows() for src in sources)
    for pair_id, (loc, row) in enumerate(rows):
        yield pair_id, loc, row


def _chunks(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class _Plan(NamedTuple):
    """What a preprocessing run reads, and the identity hash of what it would write."""

    sources: list[InputSource]
    tok: PairTokenizer
    identity: str
    tok_id: dict[str, Any]
    inputs: list[dict[str, str]]


def _plan(cfg: DataConfig) -> _Plan:
    """Open sources and tokenizer; hash everything that determines the output (once)."""
    if cfg.tokenizer is None:
        raise ValueError("data.tokenizer is unset: preprocessing needs a tokenizer")
    sources = [InputSource(s, cfg.split) for s in cfg.inputs]
    tok = load_tokenizer(cfg.tokenizer, cfg.tokenizer_kind)
    tok_id = tok.identity()
    inputs = [{"name": s.name, "sha256": s.fingerprint()} for s in sources]
    ident = compute_identity(tok_id, cfg.identity_settings(), [i["sha256"] for i in inputs])
    return _Plan(sources, tok, ident, tok_id, inputs)


def _tokenize_into(
    writer: PairWriter,
    cfg: DataConfig,
    sources: list[InputSource],
    tok: PairTokenizer,
    progress: bool,
) -> DataReport:
    """Every row of `sources` -> pairs appended to `writer` (in row order); returns the report."""
    from tqdm import tqdm

    report = DataReport()
    chunks = _chunks(_numbered_rows(sources), ROWS_PER_CHUNK)
    bar = tqdm(desc="tokenizing pairs", unit="row", disable=not progress, mininterval=0.5)
    _WORKER_STATE.update(config=cfg, tok=tok)
    if cfg.num_workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = mp.get_context("fork").Pool(cfg.num_workers, _init_worker, (cfg,))
        results = pool.imap(_process_chunk, chunks, chunksize=1)
    else:
        pool, results = None, map(_process_chunk, chunks)
    try:
        for chunk_report, (tokens, lengths, pair_ids) in results:
            report.merge(chunk_report)
            writer.add_pairs(tokens, lengths, pair_ids)
            bar.update(chunk_report.rows_read)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return report


def preprocess(
    config: DataConfig,
    output_dir: str,
    progress: bool = True,
    force: bool = False,
    plan: _Plan | None = None,
    guard_output: bool = False,
) -> tuple[dict[str, Any], DataReport | None]:
    """Tokenize `config.inputs` into `output_dir`; returns (manifest, report).

    A no-op returning (existing manifest, None) when `output_dir` already holds a manifest with
    the same identity (same tokenizer, template, settings and input contents) and files that
    match its checksums, unless `force`.
    `guard_output` (a user's `--output`): refuse a directory holding anything but a
    preprocessed dataset, one of the inputs, or another dataset unless `force`
    (`outputs.check_output_dir`).

    Raises:
        DataError: bad rows with `config.on_error == "fail"` (nothing is written).
        ValueError: no pair survived, or a configuration problem (naming the field).
    """
    plan = plan or _plan(config)
    sources, tok, ident, tok_id, inputs = plan
    if guard_output:
        check_output_dir(output_dir, config, [i["name"] for i in inputs], replace=force)
    old = manifest_or_none(output_dir)
    if old is not None and old.get("identity") == ident and not force and _intact(output_dir, old):
        return old, None
    start = time.perf_counter()
    partial = new_partial(output_dir)  # unique per writer; dead writers' leftovers removed
    writer = PairWriter(partial, tok.vocab_size)
    try:
        report = _tokenize_into(writer, config, sources, tok, progress)
        writer.finalize()
        _refuse_unusable(report, config, output_dir)
        integrity = seal(partial, writer.max_token_id)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest = {
        "format": "megatron_adadpo.preference_pairs",
        "version": 1,
        "identity": ident,
        "tokenizer": {**tok_id, "path": os.path.abspath(config.tokenizer)},
        "settings": config.identity_settings(),
        "on_error": config.on_error,
        "inputs": inputs,
        "num_pairs": report.pairs_written,
        "counts": report.counts(),
        "length_histogram": report.histogram(config.max_length),
        "token_dtype": writer.token_dtype,
        "seconds": round(time.perf_counter() - start, 3),
        "num_workers": config.num_workers,
        "integrity": integrity,
    }
    report.write(partial)
    write_manifest(partial, manifest)
    if report.issues:
        logger.warning(
            "%s: %s; every dropped row is listed in %s",
            output_dir,
            report.summary(),
            os.path.join(output_dir, "data_report.json"),
        )
    current = manifest_or_none(output_dir)
    if current not in (None, old) and current.get("identity") == ident and not force:
        shutil.rmtree(partial, ignore_errors=True)  # a concurrent writer finished first
        return current, report
    publish(partial, output_dir)
    return manifest, report


def _intact(directory: str, manifest: dict[str, Any]) -> bool:
    """Whether the files of ``directory`` verify against ``manifest`` (warns when not)."""
    try:
        verify(directory, manifest, fix="")
    except DataIntegrityError as err:
        logger.warning("%s %s: writing %s again", err.path, err.problem, directory)
        return False
    return True


def _refuse_unusable(report: DataReport, config: DataConfig, output_dir: str) -> None:
    """Bad rows with ``on_error: fail`` (``DataError``), or no pair left (``ValueError``); the
    report goes to ``output_dir/data_report.json`` either way."""
    if report.bad_rows and config.on_error == "fail":
        os.makedirs(output_dir, exist_ok=True)
        path = DataReport(issues=report.bad_rows).write(output_dir)
        raise DataError(report.bad_rows, report_path=path)
    if report.pairs_written == 0:
        os.makedirs(output_dir, exist_ok=True)
        raise ValueError(report.nothing_survived(report.write(output_dir)))


def check_manifest(manifest: dict[str, Any], config: DataConfig, directory: str) -> None:
    """Refuse a preprocessed directory whose settings or tokenizer differ from `config`."""
    from .tokenize import resolve_tokenizer, tokenizer_files_sha256

    fix = f"re-run tools/preprocess_data.py for {directory} or change the data config"
    if manifest["settings"].get(REJECTED_OPTIONAL) and not config.rejected_optional:
        raise ValueError(
            f"{directory} was preprocessed with --rejected-optional (rows without a rejected "
            f"answer hold a copy of the chosen one), which only loss.name=sft can train on: {fix}"
        )
    wanted = {TRUNCATION_MODE: "keep_start", **config.identity_settings()}
    for key, want in wanted.items():
        have = manifest["settings"].get(key, "keep_start" if key == TRUNCATION_MODE else None)
        if key == REJECTED_OPTIONAL and have is None:
            continue  # preference pairs: every row has its rejected answer, sft can use them
        if have != want:
            raise ValueError(
                f"{directory} was preprocessed with {key}={have!r}, config has "
                f"data.{key}={want!r}: {fix}"
            )
    if config.tokenizer is not None:
        source = resolve_tokenizer(config.tokenizer, config.tokenizer_kind)[1]
        if tokenizer_files_sha256(source) != manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"{directory} was preprocessed with tokenizer {manifest['tokenizer']['path']}, "
                f"whose files differ from data.tokenizer={config.tokenizer}: {fix}"
            )


def load_preference_dataset(config: DataConfig, split: str | None = None) -> PreferenceDataset:
    """The tokenized pairs for training.

    Uses `config.preprocessed` when set (its manifest must match the config's tokenizer and
    settings, its files their checksums); otherwise tokenizes `config.inputs` once into
    `<cache_dir>/<identity[:16]>/` and reuses that cache while tokenizer, settings and inputs
    are unchanged. A cache entry whose files fail their checksums (or that has none) is
    rebuilt, with a warning naming it. Safe when several ranks call it at once (each may
    preprocess; the first to finish publishes), but calling it on rank 0 first and then on the
    others after a barrier avoids the duplicate work.

    Args:
        config: The data settings (on_error applies to the raw inputs).
        split: Overrides `config.split` for `hf:` specs and DatasetDict directories.
    """
    if split is not None:
        config = config.replace(split=split)
    if config.preprocessed:
        ds = PreferenceDataset(config.preprocessed)
        check_manifest(ds.manifest, config, config.preprocessed)
        return ds
    plan = _plan(config)
    cache_dir = config.cache_dir or default_cache_dir()
    directory = os.path.join(cache_dir, plan.identity[:16])
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        try:
            dataset = PreferenceDataset(directory)
        except DataIntegrityError as err:
            logger.warning(
                "%s %s: rebuilding this entry of the data cache %s (data.cache_dir)",
                err.path,
                err.problem,
                cache_dir,
            )
            preprocess(config, directory, progress=False, force=True, plan=plan)
            return PreferenceDataset(directory)
        if dataset.identity == plan.identity:
            return dataset
    preprocess(config, directory, progress=False, plan=plan)
    return PreferenceDataset(directory)
