"""MEDS events -> what every evaluation needs: per-patient summaries, visits, sparse code matrices.

A :class:`Cohort` is one group of patients (real train, real held_out, synthetic) read from
MEDS shards. Fidelity, utility and privacy all work from the same three views of it:

- ``people``: one row per patient (gender, race, age and year at the first visit, visits,
  events, and a hash of the patient's code sequence for exact-copy checks);
- ``visits``: one row per visit (type, start, end);
- :func:`code_matrix`: a patients x codes ``scipy.sparse.csr_matrix`` of counts over a shared
  :class:`CodeIndex`, never a dense matrix.

Clinical codes are every code except person attributes (``GENDER/``, ``RACE/``,
``ETHNICITY/``), ``MEDS_BIRTH`` and the visit structure (``VISIT/``, ``DISCHARGE/``), which
have their own summaries (see docs/method.md, section 11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from ehrgpt.errors import EhrgptError
from ehrgpt.meds_format import columns as mc

#: Code prefixes that are not clinical codes (person attributes and the visit structure).
NON_CLINICAL_PREFIXES = (
    mc.GENDER_PREFIX,
    mc.RACE_PREFIX,
    mc.ETHNICITY_PREFIX,
    mc.VISIT_PREFIX,
    mc.DISCHARGE_PREFIX,
)
_STATIC_PREFIXES = (mc.GENDER_PREFIX, mc.RACE_PREFIX, mc.ETHNICITY_PREFIX)
_COLUMNS = ("subject_id", "time", "code", "numeric_value", "visit_id", "end")
_DAY_US = 86_400 * 1_000_000


def is_clinical() -> pl.Expr:
    """A polars predicate on ``code``: true for clinical codes.

    >>> df = pl.DataFrame({"code": ["GENDER/8532", "MEDS_BIRTH", "VISIT/9202", "SNOMED/1",
    ...                             "MEDS_DEATH", "DISCHARGE/8536"]})
    >>> df.filter(is_clinical())["code"].to_list()
    ['SNOMED/1', 'MEDS_DEATH']
    """
    code = pl.col("code")
    return ~code.str.starts_with(NON_CLINICAL_PREFIXES[0]).or_(
        *[code.str.starts_with(p) for p in NON_CLINICAL_PREFIXES[1:]],
        code == mc.BIRTH_CODE,
    )


def read_events(shards: Sequence[Path]) -> pl.DataFrame:
    """The columns of MEDS shards the evaluation uses; ``visit_id`` and ``end`` are null when a
    dataset lacks them."""
    if not shards:
        return pl.DataFrame(
            schema={
                "subject_id": pl.Int64,
                "time": pl.Datetime("us"),
                "code": pl.String,
                "numeric_value": pl.Float32,
                "visit_id": pl.Int64,
                "end": pl.Datetime("us"),
            }
        )
    frames = []
    for shard in shards:
        lf = pl.scan_parquet(shard)
        names = lf.collect_schema().names()
        missing = [c for c in ("subject_id", "code") if c not in names]
        if missing:
            raise EhrgptError(
                f"{shard} is not a MEDS data shard: it lacks column(s) {', '.join(missing)}."
            )
        frames.append(
            lf.select(
                pl.col("subject_id").cast(pl.Int64),
                (pl.col("time") if "time" in names else pl.lit(None))
                .cast(pl.Datetime("us"))
                .alias("time"),
                pl.col("code").cast(pl.String),
                (pl.col("numeric_value") if "numeric_value" in names else pl.lit(None))
                .cast(pl.Float32)
                .alias("numeric_value"),
                (pl.col("visit_id") if "visit_id" in names else pl.lit(None))
                .cast(pl.Int64)
                .alias("visit_id"),
                (pl.col("end") if "end" in names else pl.lit(None))
                .cast(pl.Datetime("us"))
                .alias("end"),
            )
        )
    return pl.concat(frames).collect()


def summarise_people(events: pl.DataFrame) -> pl.DataFrame:
    """One row per patient: gender, race, birth, first visit, age and year then, visits,
    clinical events, ``sequence_hash`` (the ordered clinical codes, hashed), and the last
    clinical event with the age then (``age_last``, exact years).

    The first visit is the earliest ``VISIT/`` row, or the earliest clinical event when a
    dataset has no visit rows. Age is whole years at the first visit.

    >>> import datetime as dt
    >>> ev = pl.DataFrame({
    ...     "subject_id": [1, 1, 1, 1, 1, 1],
    ...     "time": [None, dt.datetime(1950, 6, 1), dt.datetime(2000, 5, 1),
    ...              dt.datetime(2000, 5, 1), dt.datetime(2001, 1, 1), dt.datetime(2001, 1, 1)],
    ...     "code": ["GENDER/8532", "MEDS_BIRTH", "VISIT/9202", "SNOMED/1", "VISIT/9202",
    ...              "SNOMED/2"]})
    >>> p = summarise_people(ev)
    >>> p.select("gender", "race", "age", "first_year", "n_visits", "n_events").row(0)
    ('GENDER/8532', 'RACE/UNKNOWN', 49, 2000, 2, 2)
    >>> round(p["age_last"][0], 2)
    50.59
    """
    ev = events.lazy()
    static = (
        ev.filter(pl.col("code").str.starts_with(mc.GENDER_PREFIX))
        .group_by("subject_id")
        .agg(pl.col("code").min().alias("gender"))
        .join(
            ev.filter(pl.col("code").str.starts_with(mc.RACE_PREFIX))
            .group_by("subject_id")
            .agg(pl.col("code").min().alias("race")),
            on="subject_id",
            how="full",
            coalesce=True,
        )
    )
    clinical = ev.filter(is_clinical())
    per = (
        ev.group_by("subject_id")
        .agg(
            pl.col("time").filter(pl.col("code") == mc.BIRTH_CODE).min().alias("birth"),
            pl.col("time")
            .filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX))
            .min()
            .alias("first_visit_row"),
            (pl.col("code").str.starts_with(mc.VISIT_PREFIX)).sum().alias("n_visits"),
            pl.col("time").filter(is_clinical()).min().alias("first_event"),
            pl.col("time").filter(is_clinical()).max().alias("last_event"),
        )
        .join(
            clinical.sort("subject_id", "time", "code", nulls_last=False)
            .group_by("subject_id")
            .agg(
                pl.len().alias("n_events"),
                pl.col("code").str.join("\x1f").hash(seed=0).alias("sequence_hash"),
            ),
            on="subject_id",
            how="left",
        )
        .join(static, on="subject_id", how="left")
    )
    first = pl.coalesce("first_visit_row", "first_event")
    age_days = (first - pl.col("birth")).dt.total_days()
    return (
        per.with_columns(
            first.alias("first_visit"),
            pl.col("gender").fill_null(mc.GENDER_PREFIX + mc.UNKNOWN),
            pl.col("race").fill_null(mc.RACE_PREFIX + mc.UNKNOWN),
            pl.col("n_events").fill_null(0).cast(pl.Int64),
            pl.col("n_visits").cast(pl.Int64),
        )
        .with_columns(
            _whole_years(pl.col("birth"), pl.col("first_visit")).alias("age"),
            pl.col("first_visit").dt.year().alias("first_year"),
            (age_days / 365.25).alias("age_exact"),
            ((pl.col("last_event") - pl.col("birth")).dt.total_days() / 365.25).alias("age_last"),
        )
        .drop("first_visit_row", "first_event")
        .sort("subject_id")
        .collect()
    )


def _whole_years(birth: pl.Expr, when: pl.Expr) -> pl.Expr:
    """Age in whole years (a birthday not yet reached counts one year less)."""
    years = when.dt.year() - birth.dt.year()
    before = (when.dt.month() < birth.dt.month()) | (
        (when.dt.month() == birth.dt.month()) & (when.dt.day() < birth.dt.day())
    )
    return (years - before.cast(pl.Int32)).cast(pl.Int64)


def summarise_visits(events: pl.DataFrame) -> pl.DataFrame:
    """One row per visit row: subject, type code, start, end (start when missing), length of
    stay in days, and the gap in days since the end of the patient's previous visit (null for
    the first; at least 0).

    >>> import datetime as dt
    >>> ev = pl.DataFrame({"subject_id": [1, 1], "code": ["VISIT/9201", "VISIT/9202"],
    ...     "time": [dt.datetime(2000, 1, 1), dt.datetime(2000, 1, 20)],
    ...     "end": [dt.datetime(2000, 1, 5), None]})
    >>> summarise_visits(ev).select("type", "los_days", "gap_days").rows()
    [('VISIT/9201', 4.0, None), ('VISIT/9202', 0.0, 15.0)]
    """
    visits = (
        events.lazy()
        .filter(pl.col("code").str.starts_with(mc.VISIT_PREFIX) & pl.col("time").is_not_null())
        .select(
            "subject_id",
            pl.col("code").alias("type"),
            pl.col("time").alias("start"),
            pl.max_horizontal(pl.coalesce("end", "time"), pl.col("time")).alias("end"),
        )
        .sort("subject_id", "start")
    )
    los = (pl.col("end") - pl.col("start")).dt.total_microseconds() / _DAY_US
    prev_end = pl.col("end").shift(1).over("subject_id")
    gap = (pl.col("start") - prev_end).dt.total_microseconds() / _DAY_US
    return visits.with_columns(
        los.cast(pl.Float64).alias("los_days"),
        pl.when(gap.is_not_null())
        .then(pl.max_horizontal(gap, pl.lit(0.0)))
        .cast(pl.Float64)
        .alias("gap_days"),
    ).collect()


@dataclass
class Cohort:
    """One group of patients: its events, people and visits (see the module docstring)."""

    name: str
    events: pl.DataFrame
    people: pl.DataFrame
    visits: pl.DataFrame

    @classmethod
    def from_events(cls, name: str, events: pl.DataFrame) -> Cohort:
        return cls(name, events, summarise_people(events), summarise_visits(events))

    @classmethod
    def from_shards(cls, name: str, shards: Sequence[Path]) -> Cohort:
        return cls.from_events(name, read_events(shards))

    @property
    def n(self) -> int:
        return self.people.height

    @property
    def subject_ids(self) -> np.ndarray:
        return self.people["subject_id"].to_numpy()

    def sample(self, n: int, seed: int = 0) -> Cohort:
        """At most ``n`` patients, drawn without replacement (the cohort itself if smaller)."""
        if self.n <= n:
            return self
        ids = self.people["subject_id"].sample(n, seed=seed, shuffle=True)
        keep = pl.DataFrame({"subject_id": ids})
        return Cohort(
            self.name,
            self.events.join(keep, on="subject_id", how="semi"),
            self.people.join(keep, on="subject_id", how="semi"),
            self.visits.join(keep, on="subject_id", how="semi"),
        )


def clinical_code_counts(events: pl.DataFrame) -> pl.DataFrame:
    """Per clinical code: events (``n_events``) and distinct patients (``n_patients``).

    >>> ev = pl.DataFrame({"subject_id": [1, 1, 2, 2], "code": ["A/1", "A/1", "A/1", "VISIT/9"]})
    >>> clinical_code_counts(ev).rows()
    [('A/1', 3, 2)]
    """
    return (
        events.lazy()
        .filter(is_clinical())
        .group_by("code")
        .agg(pl.len().alias("n_events"), pl.col("subject_id").n_unique().alias("n_patients"))
        .with_columns(pl.col("n_events").cast(pl.Int64), pl.col("n_patients").cast(pl.Int64))
        .sort("code")
        .collect()
    )


def tokens_per_patient(shards: Sequence[Path], tok) -> pl.DataFrame:
    """Tokens of each patient of MEDS shards as the tokenizer ``tok`` encodes them (the
    encoding of ``ehrgpt prepare``): ``subject_id``, ``n_tokens``.

    >>> import datetime as dt, tempfile
    >>> from ehrgpt.tokenizer.vocab import EhrTokenizer
    >>> tok = EhrTokenizer.build("day", code_counts={"SNOMED/1": 1, "VISIT/9202": 1},
    ...                          n_subjects=1)
    >>> shard = Path(tempfile.mkdtemp()) / "0.parquet"
    >>> pl.DataFrame({"subject_id": [1, 1, 1, 1],
    ...     "time": [None, dt.datetime(1950, 6, 1), dt.datetime(2000, 5, 1),
    ...              dt.datetime(2000, 5, 1)],
    ...     "code": ["GENDER/8532", "MEDS_BIRTH", "VISIT/9202", "SNOMED/1"],
    ...     "visit_id": [None, None, 7, 7]}).write_parquet(shard)
    >>> tokens_per_patient([shard], tok).rows()  # year age gender race [VS] visit code [VE]
    [(1, 8)]
    """
    from ehrgpt.tokenizer.encode import encode_shard

    frames = [
        encode_shard(pl.read_parquet(shard), tok)[0].select(
            "subject_id", pl.col("n_tokens").cast(pl.Int64)
        )
        for shard in shards
    ]
    if not frames:
        return pl.DataFrame(schema={"subject_id": pl.Int64, "n_tokens": pl.Int64})
    return pl.concat(frames).sort("subject_id")


@dataclass(frozen=True)
class CodeIndex:
    """A fixed order of codes: the columns of every code matrix compared with each other.

    >>> idx = CodeIndex.of(["B/2", "A/1", "B/2"])
    >>> idx.codes, len(idx)
    (('A/1', 'B/2'), 2)
    """

    codes: tuple[str, ...]

    @classmethod
    def of(cls, codes) -> CodeIndex:
        return cls(tuple(sorted(set(codes))))

    def __len__(self) -> int:
        return len(self.codes)

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {"code": list(self.codes), "col": np.arange(len(self.codes), dtype=np.int64)},
            schema={"code": pl.String, "col": pl.Int64},
        )


def code_matrix(
    events: pl.DataFrame,
    subject_ids: np.ndarray,
    index: CodeIndex,
    *,
    binary: bool = False,
) -> sp.csr_matrix:
    """Patients (rows, in ``subject_ids`` order) x codes of ``index`` (columns): event counts,
    or 0/1 with ``binary``. Codes outside the index are left out.

    >>> ev = pl.DataFrame({"subject_id": [7, 7, 7, 9], "code": ["A/1", "A/1", "B/2", "B/2"]})
    >>> code_matrix(ev, np.array([9, 7, 8]), CodeIndex.of(["A/1", "B/2"])).toarray().tolist()
    [[0.0, 1.0], [2.0, 1.0], [0.0, 0.0]]
    """
    rows = pl.DataFrame(
        {"subject_id": np.asarray(subject_ids, dtype=np.int64)},
        schema={"subject_id": pl.Int64},
    ).with_row_index("row")
    counts = (
        events.lazy()
        .filter(is_clinical())
        .join(index.frame().lazy(), on="code", how="inner")
        .join(rows.lazy(), on="subject_id", how="inner")
        .group_by("row", "col")
        .agg(pl.len().alias("n"))
        .collect()
    )
    data = np.ones(counts.height, np.float32) if binary else counts["n"].to_numpy()
    return sp.csr_matrix(
        (
            data.astype(np.float32),
            (counts["row"].to_numpy().astype(np.int64), counts["col"].to_numpy()),
        ),
        shape=(len(subject_ids), len(index)),
    )


# -- inputs ---------------------------------------------------------------------------------


def _is_meds(folder: Path) -> bool:
    return (folder / "data").is_dir() and any((folder / "data").rglob("*.parquet"))


def _has_person_table(folder: Path) -> bool:
    return any(
        p.name.lower().split(".")[0] == "person"
        for p in folder.iterdir()
        if not p.name.startswith(".")
    )


def real_splits(run: Path) -> tuple[Path, dict[str, list[Path]]]:
    """The MEDS folder of a prepared run (``RUN/meds``) or a MEDS folder, and its shards by
    split (``data/<split>/*.parquet``).

    >>> import tempfile
    >>> real_splits(Path(tempfile.mkdtemp()))
    Traceback (most recent call last):
    ...
    ehrgpt.errors.EhrgptError: ...
    """
    run = Path(run)
    meds_dir = run / "meds" if _is_meds(run / "meds") else run
    if not _is_meds(meds_dir):
        raise EhrgptError(
            f"--real {run} is neither a prepared run (RUN/meds) nor a MEDS folder with "
            "data/<split>/*.parquet; run `ehrgpt prepare` first."
        )
    splits: dict[str, list[Path]] = {}
    for shard in sorted((meds_dir / "data").rglob("*.parquet")):
        split = shard.relative_to(meds_dir / "data").parts[0]
        splits.setdefault(split if split != shard.name else "train", []).append(shard)
    return meds_dir, splits


def synthetic_meds(path: Path, work_dir: Path, *, progress: bool = False) -> Path:
    """The MEDS folder of synthetic patients given as ``ehrgpt generate`` output (``S/meds``),
    a MEDS folder, or an OMOP CDM (a DuckDB file, or a folder of CSV / parquet tables with a
    person table), which is converted with the project's OMOP -> MEDS code into ``work_dir``.
    """
    path = Path(path)
    if not path.exists():
        raise EhrgptError(f"--synthetic {path} does not exist.")
    if path.is_dir():
        for candidate in (path / "meds", path):
            if _is_meds(candidate):
                return candidate
        if _has_person_table(path):
            return _omop_to_meds(path, work_dir, progress)
        for name in ("omop.duckdb", "cdm.duckdb"):
            if (path / name).is_file():
                return _omop_to_meds(path / name, work_dir, progress)
        raise EhrgptError(
            f"--synthetic {path} is neither a MEDS folder (data/**/*.parquet), ehrgpt generate "
            "output (with meds/), nor an OMOP CDM folder with a person table; point it at one "
            "of those."
        )
    return _omop_to_meds(path, work_dir, progress)


def _omop_to_meds(source: Path, work_dir: Path, progress: bool) -> Path:
    from ehrgpt.quality import QualityReport
    from ehrgpt.sources.omop import open_omop
    from ehrgpt.sources.omop_to_meds import omop_to_meds

    staging = work_dir / "staging"
    try:
        db = open_omop(str(source), staging)
    except Exception as exc:
        if isinstance(exc, EhrgptError):
            raise
        raise EhrgptError(
            f"--synthetic {source} cannot be read as an OMOP CDM DuckDB file ({exc}); give a "
            "MEDS folder, ehrgpt generate output or an OMOP CDM."
        ) from None
    try:
        omop_to_meds(db, work_dir / "meds", staging, QualityReport(), progress=progress)
    finally:
        db.con.close()
    return work_dir / "meds"
