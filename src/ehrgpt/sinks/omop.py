"""MEDS rows -> OMOP CDM 5.4 tables, and a writer that appends them to DuckDB, files or PostgreSQL.

:func:`meds_to_omop` turns a chunk of MEDS rows (ehrgpt's event schema, whole subjects) into
the CDM 5.4 tables ``person``, ``observation_period``, ``visit_occurrence``,
``condition_occurrence``, ``drug_exposure``, ``procedure_occurrence``, ``device_exposure``,
``measurement``, ``observation`` and ``death``, every column of each table present with its
CDM type. Each clinical concept goes to the table of its domain (``omop_domain`` of the codes
metadata, or ``domain_id`` of a concept table); a concept of no known clinical domain goes to
``observation`` and is counted. No row is dropped (the reference drops Observation and Device).

:class:`OmopWriter` appends converted chunks to a DuckDB file, a folder of parquet or CSV files
(``table/part-000.parquet``), or a PostgreSQL schema (``COPY FROM STDIN``), one atomic unit per
chunk, and adds the ``concept`` rows the chunk uses that the target lacks.

Identifiers. ``person_id = subject_id + id_offset``; visit, event and observation-period ids
run from ``id_offset`` (one sequence shared by all tables, continued across chunks). Synthetic
persons must never share an id with real ones: pass an ``id_offset`` above the real maximum
person id, e.g. :data:`SYNTHETIC_ID_OFFSET` (``10**12``); ids are BIGINT for that reason. The
writer refuses a chunk whose person ids already exist in the target.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ehrgpt import meds_columns as mc
from ehrgpt.errors import EhrgptError
from ehrgpt.sinks.meds import as_event_frame

log = logging.getLogger(__name__)

__all__ = [
    "CDM_TABLES",
    "EHR_TYPE_CONCEPT",
    "EVENT_TABLES",
    "SYNTHETIC_ID_OFFSET",
    "CdmColumn",
    "OmopTables",
    "OmopWriteSummary",
    "OmopWriter",
    "code_concepts",
    "concept_rows",
    "conform",
    "domain_table",
    "meds_to_omop",
]

#: Type concept "EHR" given to every row (``*_type_concept_id``); pass another if it fits better.
EHR_TYPE_CONCEPT = 32817
#: A safe base for synthetic ids: far above the person ids of any real OMOP installation.
SYNTHETIC_ID_OFFSET = 10**12


@dataclass(frozen=True)
class CdmColumn:
    """One CDM 5.4 column: name, SQL type and whether it is NOT NULL."""

    name: str
    type: str
    required: bool = False


def _table(spec: str) -> tuple[CdmColumn, ...]:
    """Columns from ``'name TYPE, name TYPE!'`` (``!`` marks NOT NULL).

    >>> _table("person_id BIGINT!, month_of_birth INTEGER")[0]
    CdmColumn(name='person_id', type='BIGINT', required=True)
    """
    cols = []
    for item in spec.split(","):
        name, typ = item.split()
        cols.append(CdmColumn(name, typ.rstrip("!"), typ.endswith("!")))
    return tuple(cols)


_V50 = "VARCHAR(50)"
#: The CDM 5.4 tables ehrgpt writes, with every column in DDL order. Record ids are BIGINT
#: (synthetic ids live above 10**12); concept ids, years and counts INTEGER.
CDM_TABLES: dict[str, tuple[CdmColumn, ...]] = {
    "person": _table(
        "person_id BIGINT!, gender_concept_id INTEGER!, year_of_birth INTEGER!, "
        "month_of_birth INTEGER, day_of_birth INTEGER, birth_datetime TIMESTAMP, "
        "race_concept_id INTEGER!, ethnicity_concept_id INTEGER!, location_id BIGINT, "
        f"provider_id BIGINT, care_site_id BIGINT, person_source_value {_V50}, "
        f"gender_source_value {_V50}, gender_source_concept_id INTEGER, "
        f"race_source_value {_V50}, race_source_concept_id INTEGER, "
        f"ethnicity_source_value {_V50}, ethnicity_source_concept_id INTEGER"
    ),
    "observation_period": _table(
        "observation_period_id BIGINT!, person_id BIGINT!, observation_period_start_date DATE!, "
        "observation_period_end_date DATE!, period_type_concept_id INTEGER!"
    ),
    "visit_occurrence": _table(
        "visit_occurrence_id BIGINT!, person_id BIGINT!, visit_concept_id INTEGER!, "
        "visit_start_date DATE!, visit_start_datetime TIMESTAMP, visit_end_date DATE!, "
        "visit_end_datetime TIMESTAMP, visit_type_concept_id INTEGER!, provider_id BIGINT, "
        f"care_site_id BIGINT, visit_source_value {_V50}, visit_source_concept_id INTEGER, "
        f"admitted_from_concept_id INTEGER, admitted_from_source_value {_V50}, "
        f"discharged_to_concept_id INTEGER, discharged_to_source_value {_V50}, "
        "preceding_visit_occurrence_id BIGINT"
    ),
    "condition_occurrence": _table(
        "condition_occurrence_id BIGINT!, person_id BIGINT!, condition_concept_id INTEGER!, "
        "condition_start_date DATE!, condition_start_datetime TIMESTAMP, "
        "condition_end_date DATE, condition_end_datetime TIMESTAMP, "
        "condition_type_concept_id INTEGER!, condition_status_concept_id INTEGER, "
        "stop_reason VARCHAR(20), provider_id BIGINT, visit_occurrence_id BIGINT, "
        f"visit_detail_id BIGINT, condition_source_value {_V50}, "
        f"condition_source_concept_id INTEGER, condition_status_source_value {_V50}"
    ),
    "drug_exposure": _table(
        "drug_exposure_id BIGINT!, person_id BIGINT!, drug_concept_id INTEGER!, "
        "drug_exposure_start_date DATE!, drug_exposure_start_datetime TIMESTAMP, "
        "drug_exposure_end_date DATE!, drug_exposure_end_datetime TIMESTAMP, "
        "verbatim_end_date DATE, drug_type_concept_id INTEGER!, stop_reason VARCHAR(20), "
        "refills INTEGER, quantity NUMERIC, days_supply INTEGER, sig TEXT, "
        f"route_concept_id INTEGER, lot_number {_V50}, provider_id BIGINT, "
        "visit_occurrence_id BIGINT, visit_detail_id BIGINT, "
        f"drug_source_value {_V50}, drug_source_concept_id INTEGER, "
        f"route_source_value {_V50}, dose_unit_source_value {_V50}"
    ),
    "procedure_occurrence": _table(
        "procedure_occurrence_id BIGINT!, person_id BIGINT!, procedure_concept_id INTEGER!, "
        "procedure_date DATE!, procedure_datetime TIMESTAMP, procedure_end_date DATE, "
        "procedure_end_datetime TIMESTAMP, procedure_type_concept_id INTEGER!, "
        "modifier_concept_id INTEGER, quantity INTEGER, provider_id BIGINT, "
        f"visit_occurrence_id BIGINT, visit_detail_id BIGINT, procedure_source_value {_V50}, "
        f"procedure_source_concept_id INTEGER, modifier_source_value {_V50}"
    ),
    "device_exposure": _table(
        "device_exposure_id BIGINT!, person_id BIGINT!, device_concept_id INTEGER!, "
        "device_exposure_start_date DATE!, device_exposure_start_datetime TIMESTAMP, "
        "device_exposure_end_date DATE, device_exposure_end_datetime TIMESTAMP, "
        "device_type_concept_id INTEGER!, unique_device_id VARCHAR(255), "
        "production_id VARCHAR(255), quantity INTEGER, provider_id BIGINT, "
        "visit_occurrence_id BIGINT, visit_detail_id BIGINT, "
        f"device_source_value {_V50}, device_source_concept_id INTEGER, "
        f"unit_concept_id INTEGER, unit_source_value {_V50}, unit_source_concept_id INTEGER"
    ),
    "measurement": _table(
        "measurement_id BIGINT!, person_id BIGINT!, measurement_concept_id INTEGER!, "
        "measurement_date DATE!, measurement_datetime TIMESTAMP, "
        "measurement_time VARCHAR(10), measurement_type_concept_id INTEGER!, "
        "operator_concept_id INTEGER, value_as_number NUMERIC, value_as_concept_id INTEGER, "
        "unit_concept_id INTEGER, range_low NUMERIC, range_high NUMERIC, provider_id BIGINT, "
        "visit_occurrence_id BIGINT, visit_detail_id BIGINT, "
        f"measurement_source_value {_V50}, measurement_source_concept_id INTEGER, "
        f"unit_source_value {_V50}, unit_source_concept_id INTEGER, "
        f"value_source_value {_V50}, measurement_event_id BIGINT, "
        "meas_event_field_concept_id INTEGER"
    ),
    "observation": _table(
        "observation_id BIGINT!, person_id BIGINT!, observation_concept_id INTEGER!, "
        "observation_date DATE!, observation_datetime TIMESTAMP, "
        "observation_type_concept_id INTEGER!, value_as_number NUMERIC, "
        "value_as_string VARCHAR(60), value_as_concept_id INTEGER, "
        "qualifier_concept_id INTEGER, unit_concept_id INTEGER, provider_id BIGINT, "
        "visit_occurrence_id BIGINT, visit_detail_id BIGINT, "
        f"observation_source_value {_V50}, observation_source_concept_id INTEGER, "
        f"unit_source_value {_V50}, qualifier_source_value {_V50}, "
        f"value_source_value {_V50}, observation_event_id BIGINT, "
        "obs_event_field_concept_id INTEGER"
    ),
    "death": _table(
        "person_id BIGINT!, death_date DATE!, death_datetime TIMESTAMP, "
        "death_type_concept_id INTEGER, cause_concept_id INTEGER, "
        f"cause_source_value {_V50}, cause_source_concept_id INTEGER"
    ),
    "concept": _table(
        "concept_id INTEGER!, concept_name VARCHAR(255)!, domain_id VARCHAR(20)!, "
        "vocabulary_id VARCHAR(20)!, concept_class_id VARCHAR(20)!, "
        "standard_concept VARCHAR(1), concept_code VARCHAR(50)!, valid_start_date DATE!, "
        "valid_end_date DATE!, invalid_reason VARCHAR(1)"
    ),
}


@dataclass(frozen=True)
class _EventSpec:
    """Column names of one clinical event table."""

    table: str
    id: str
    concept: str
    start_date: str
    start_datetime: str
    end_date: str | None
    end_datetime: str | None
    type_concept: str
    source_value: str


def _spec(table: str, stem: str, start: str, end: str | None, id_col: str = "") -> _EventSpec:
    return _EventSpec(
        table,
        id_col or f"{table}_id",
        f"{stem}_concept_id",
        f"{start}_date",
        f"{start}_datetime",
        f"{end}_date" if end else None,
        f"{end}_datetime" if end else None,
        f"{stem}_type_concept_id",
        f"{stem}_source_value",
    )


_EVENT_SPECS: dict[str, _EventSpec] = {
    s.table: s
    for s in (
        _spec("condition_occurrence", "condition", "condition_start", "condition_end"),
        _spec("drug_exposure", "drug", "drug_exposure_start", "drug_exposure_end"),
        _spec("procedure_occurrence", "procedure", "procedure", "procedure_end"),
        _spec("device_exposure", "device", "device_exposure_start", "device_exposure_end"),
        _spec("measurement", "measurement", "measurement", None),
        _spec("observation", "observation", "observation", None),
    )
}
#: The clinical event tables, in the order their ids are given.
EVENT_TABLES: tuple[str, ...] = tuple(_EVENT_SPECS)

#: OMOP domain (its first part, as in ``Condition/Meas``) -> event table.
_DOMAIN_TABLES = {
    "Condition": "condition_occurrence",
    "Drug": "drug_exposure",
    "Procedure": "procedure_occurrence",
    "Device": "device_exposure",
    "Measurement": "measurement",
    "Meas": "measurement",
    "Observation": "observation",
    "Obs": "observation",
}
_STRUCTURE_PREFIXES = (
    mc.GENDER_PREFIX,
    mc.RACE_PREFIX,
    mc.ETHNICITY_PREFIX,
    mc.VISIT_PREFIX,
    mc.DISCHARGE_PREFIX,
    mc.FALLBACK_CONCEPT_PREFIX,
)
_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S%.f"


# -- types and shapes ---------------------------------------------------------------------


def _polars_type(sql_type: str) -> pl.DataType:
    """The polars dtype of a CDM column type.

    >>> _polars_type("BIGINT"), _polars_type("VARCHAR(50)"), _polars_type("NUMERIC")
    (Int64, String, Float64)
    """
    if sql_type == "BIGINT":
        return pl.Int64()
    if sql_type == "INTEGER":
        return pl.Int32()
    if sql_type == "DATE":
        return pl.Date()
    if sql_type == "TIMESTAMP":
        return pl.Datetime("us")
    if sql_type == "NUMERIC":
        return pl.Float64()
    return pl.String()


def _varchar_length(sql_type: str) -> int | None:
    m = re.fullmatch(r"VARCHAR\((\d+)\)", sql_type)
    return int(m.group(1)) if m else None


def conform(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` as CDM 5.4 ``table``: every column in DDL order, CDM types, VARCHARs cut.

    Columns the frame lacks become null; a null in a NOT NULL column raises ``EhrgptError``.

    >>> df = conform("death", pl.DataFrame({"person_id": [7], "death_date": ["2020-01-02"]}
    ...              ).with_columns(pl.col("death_date").str.to_date()))
    >>> df.columns[:3], df.schema["death_type_concept_id"]
    (['person_id', 'death_date', 'death_datetime'], Int32)
    """
    exprs = []
    for col in CDM_TABLES[table]:
        dtype = _polars_type(col.type)
        expr = pl.col(col.name).cast(dtype) if col.name in frame.columns else pl.lit(None, dtype)
        length = _varchar_length(col.type)
        if length is not None:
            expr = expr.str.slice(0, length)
        exprs.append(expr.alias(col.name))
    out = frame.select(exprs)
    bad = [c.name for c in CDM_TABLES[table] if c.required and out[c.name].null_count()]
    if bad:
        raise EhrgptError(
            f"OMOP table {table} would get nulls in its NOT NULL column(s) {', '.join(bad)}."
        )
    return out


def domain_table(domain: pl.Expr) -> pl.Expr:
    """The event table of an OMOP domain (null when the domain is not a clinical one).

    >>> pl.DataFrame({"d": ["Condition", "Meas/Procedure", "Device", "Gender", None]}).select(
    ...     domain_table(pl.col("d")))["d"].to_list()
    ['condition_occurrence', 'measurement', 'device_exposure', None, None]
    """
    return (
        domain.str.split("/")
        .list.first()
        .replace_strict(_DOMAIN_TABLES, default=None, return_dtype=pl.String)
    )


def code_concepts(codes: pl.DataFrame, concept_table: pl.DataFrame | None = None) -> pl.DataFrame:
    """Each code's OMOP concept: ``code, concept_id, domain_id, vocabulary_id, concept_code,
    concept_name``.

    From the codes metadata (``omop_concept_id``, ``omop_domain``, ``omop_vocabulary``,
    ``description``, all optional), from the code itself (``GENDER/8532``, ``VISIT/9201``,
    ``OMOP_CONCEPT/123``; ``{vocabulary}/{code}`` for the rest), then from a concept table
    (looked up by vocabulary and code, and by id for the domain). ``concept_id`` is null when
    nothing maps the code.

    >>> codes = pl.DataFrame({"code": ["SNOMED/1", "GENDER/8532", "OMOP_CONCEPT/5", "X/9"],
    ...                       "omop_concept_id": [11, None, None, None],
    ...                       "omop_domain": ["Condition", None, None, None]})
    >>> concept = pl.DataFrame({"concept_id": [99], "vocabulary_id": ["X"],
    ...                         "concept_code": ["9"], "domain_id": ["Drug"]})
    >>> code_concepts(codes, concept).select("code", "concept_id", "domain_id").rows()
    [('SNOMED/1', 11, 'Condition'), ('GENDER/8532', 8532, None), ('OMOP_CONCEPT/5', 5, None), ('X/9', 99, 'Drug')]
    """  # noqa: E501

    def opt(name: str, dtype: pl.DataType) -> pl.Expr:
        return pl.col(name).cast(dtype) if name in codes.columns else pl.lit(None, dtype)

    code = pl.col("code")
    structure = code.str.starts_with(_STRUCTURE_PREFIXES[0])
    for prefix in _STRUCTURE_PREFIXES[1:]:
        structure = structure | code.str.starts_with(prefix)
    tail_id = code.str.split("/").list.last().cast(pl.Int64, strict=False)
    out = codes.select(
        code.cast(pl.String),
        pl.coalesce(opt("omop_concept_id", pl.Int64()), pl.when(structure).then(tail_id)).alias(
            "concept_id"
        ),
        opt("omop_domain", pl.String()).alias("domain_id"),
        pl.coalesce(
            opt("omop_vocabulary", pl.String()),
            pl.when(~structure).then(code.str.extract(r"^([^/]+)/", 1)),
        ).alias("vocabulary_id"),
        pl.when(~structure).then(code.str.extract(r"^[^/]+/(.+)$", 1)).alias("concept_code"),
        opt("description", pl.String()).alias("concept_name"),
    ).unique("code", keep="first", maintain_order=True)
    if concept_table is not None and not concept_table.is_empty():
        ct = concept_table.select(
            pl.col("concept_id").cast(pl.Int64),
            pl.col("vocabulary_id").cast(pl.String),
            pl.col("concept_code").cast(pl.String),
            (pl.col("domain_id") if "domain_id" in concept_table.columns else pl.lit(None))
            .cast(pl.String)
            .alias("_domain"),
            (pl.col("concept_name") if "concept_name" in concept_table.columns else pl.lit(None))
            .cast(pl.String)
            .alias("_name"),
        )
        by_code = ct.unique(["vocabulary_id", "concept_code"], keep="first").rename(
            {"concept_id": "_cid"}
        )
        out = out.join(
            by_code.select("vocabulary_id", "concept_code", "_cid"),
            on=["vocabulary_id", "concept_code"],
            how="left",
            nulls_equal=False,
        ).with_columns(pl.coalesce("concept_id", "_cid").alias("concept_id"))
        by_id = ct.unique("concept_id", keep="first").select("concept_id", "_domain", "_name")
        out = (
            out.drop("_cid")
            .join(by_id, on="concept_id", how="left")
            .with_columns(
                pl.coalesce("domain_id", "_domain").alias("domain_id"),
                pl.coalesce("concept_name", "_name").alias("concept_name"),
            )
            .drop("_domain", "_name")
        )
    return out


def concept_rows(
    concept_ids: Iterable[int], codes: pl.DataFrame, concept_table: pl.DataFrame | None = None
) -> pl.DataFrame:
    """CDM ``concept`` rows for ``concept_ids``: from the concept table where it has them, else
    made from the codes metadata (vocabulary and code from ``{vocabulary}/{code}``).

    Ids that neither knows (structure concepts such as gender without a concept table, or
    ``OMOP_CONCEPT/<id>`` codes) get no row: ehrgpt's OMOP reader maps them back by id.

    >>> codes = pl.DataFrame({"code": ["SNOMED/1"], "omop_concept_id": [11],
    ...                       "omop_domain": ["Condition"], "description": ["Flu"]})
    >>> concept_rows([11, 8532], codes).select("concept_id", "vocabulary_id", "concept_code").rows()
    [(11, 'SNOMED', '1')]
    """
    ids = sorted({int(i) for i in concept_ids if i})
    parts = []
    if concept_table is not None and ids:
        have = concept_table.filter(pl.col("concept_id").cast(pl.Int64).is_in(ids))
        parts.append(conform("concept", _concept_defaults(have)))
    made = (
        code_concepts(codes)
        .filter(
            pl.col("concept_id").is_in(ids)
            & pl.col("vocabulary_id").is_not_null()
            & pl.col("concept_code").is_not_null()
        )
        .with_columns(pl.coalesce("concept_name", "code").alias("concept_name"))
        .unique("concept_id", keep="first", maintain_order=True)
    )
    if parts:
        made = made.filter(~pl.col("concept_id").is_in(parts[0]["concept_id"].cast(pl.Int64)))
    parts.append(conform("concept", _concept_defaults(made)))
    return pl.concat(parts).sort("concept_id")


def _concept_defaults(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill the NOT NULL concept columns a minimal concept frame may lack."""
    import datetime as dt

    defaults = {
        "concept_name": pl.lit("Unknown"),
        "domain_id": pl.lit("Observation"),
        "concept_class_id": pl.lit("Undefined"),
        "valid_start_date": pl.lit(dt.date(1970, 1, 1)),
        "valid_end_date": pl.lit(dt.date(2099, 12, 31)),
    }
    return frame.with_columns(
        (pl.coalesce(pl.col(c), d) if c in frame.columns else d).alias(c)
        for c, d in defaults.items()
    )


# -- MEDS -> OMOP ---------------------------------------------------------------------------


class OmopTables(dict[str, pl.DataFrame]):
    """The CDM tables of one chunk (table name -> frame), with ``next_id`` (the first id a
    following chunk may use) and ``notes`` (counts of what was inferred or rerouted)."""

    def __init__(
        self, tables: Mapping[str, pl.DataFrame], *, next_id: int, notes: Counter[str]
    ) -> None:
        super().__init__(tables)
        self.next_id = next_id
        self.notes = notes


_KIND_ATTR, _KIND_BIRTH, _KIND_DEATH = "attr", "birth", "death"
_KIND_VISIT, _KIND_DISCHARGE, _KIND_EVENT = "visit", "discharge", "event"


def _kind() -> pl.Expr:
    code = pl.col(mc.CODE)
    return (
        pl.when(code.str.starts_with(mc.GENDER_PREFIX))
        .then(pl.lit(_KIND_ATTR))
        .when(code.str.starts_with(mc.RACE_PREFIX) | code.str.starts_with(mc.ETHNICITY_PREFIX))
        .then(pl.lit(_KIND_ATTR))
        .when(code == mc.BIRTH_CODE)
        .then(pl.lit(_KIND_BIRTH))
        .when(code == mc.DEATH_CODE)
        .then(pl.lit(_KIND_DEATH))
        .when(code.str.starts_with(mc.VISIT_PREFIX))
        .then(pl.lit(_KIND_VISIT))
        .when(code.str.starts_with(mc.DISCHARGE_PREFIX))
        .then(pl.lit(_KIND_DISCHARGE))
        .otherwise(pl.lit(_KIND_EVENT))
        .alias("_kind")
    )


def _with_ids(frame: pl.DataFrame, name: str, first: int) -> pl.DataFrame:
    return frame.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + first).alias(name))


def _lookup(frame: pl.DataFrame, column: str, ids: pl.DataFrame, alias: str) -> pl.DataFrame:
    """Add ``alias``: the concept id of the code in ``column`` (null when unmapped)."""
    table = ids.select(pl.col("code").alias(column), pl.col("concept_id").alias(alias))
    return frame.join(table, on=column, how="left", nulls_equal=False)


def meds_to_omop(
    frame: pl.DataFrame,
    codes: pl.DataFrame,
    *,
    id_offset: int,
    concept_table: pl.DataFrame | None = None,
    first_id: int | None = None,
    type_concept_id: int = EHR_TYPE_CONCEPT,
) -> OmopTables:
    """OMOP CDM 5.4 tables from MEDS rows (ehrgpt's event schema; whole subjects).

    - ``person``: ``person_id = subject_id + id_offset``; gender, race and ethnicity concept
      ids from ``GENDER/``, ``RACE/``, ``ETHNICITY/`` rows (0 for ``UNKNOWN`` or absent); year,
      month, day and datetime of birth from ``MEDS_BIRTH`` (without it: the year of the first
      event, counted in ``notes``).
    - ``visit_occurrence``: one row per ``VISIT/`` row, from its time to its ``end`` (else its
      discharge, else its last event); ``discharged_to_concept_id`` from the ``DISCHARGE/`` row
      of the same visit. Rows naming a visit that has no ``VISIT/`` row get a visit of concept 0
      spanning them (counted).
    - clinical rows to the table of their concept's domain; values to ``value_as_number``,
      ``unit_concept_id`` (from ``unit``), ``value_as_concept_id`` (from ``value_code``),
      ``value_as_string`` (observation); a drug's numeric value to ``quantity``.
    - ``death`` from ``MEDS_DEATH`` or a discharge to 4216643 "Patient died";
      ``observation_period`` from each person's first to last date.

    Ids of visits, events and observation periods run from ``first_id`` (default
    ``id_offset``); the result's ``next_id`` is where the next chunk continues.

    >>> import datetime as dt
    >>> d = dt.datetime
    >>> rows = pl.DataFrame({
    ...     "subject_id": [1, 1, 1, 1, 1, 1],
    ...     "time": [None, d(1950, 3, 4), d(2020, 1, 1), d(2020, 1, 1), d(2020, 1, 3), d(2020, 1, 3)],
    ...     "code": ["GENDER/8532", "MEDS_BIRTH", "VISIT/9201", "SNOMED/1", "LOINC/2",
    ...              "DISCHARGE/4216643"],
    ...     "numeric_value": [None, None, None, None, 7.5, None],
    ...     "visit_id": [None, None, 1, 1, 1, 1],
    ...     "end": [None, None, d(2020, 1, 3), None, None, None],
    ...     "unit": [None, None, None, None, "UCUM/kg", None]})
    >>> codes = pl.DataFrame({"code": ["SNOMED/1", "LOINC/2", "UCUM/kg"],
    ...                       "omop_concept_id": [11, 22, 33],
    ...                       "omop_domain": ["Condition", "Measurement", "Unit"]})
    >>> t = meds_to_omop(rows, codes, id_offset=1000)
    >>> t["person"].select("person_id", "gender_concept_id", "year_of_birth", "race_concept_id").row(0)
    (1001, 8532, 1950, 0)
    >>> t["visit_occurrence"].select("visit_occurrence_id", "visit_concept_id", "visit_end_date",
    ...                              "discharged_to_concept_id").row(0)
    (1000, 9201, datetime.date(2020, 1, 3), 4216643)
    >>> t["measurement"].select("measurement_id", "value_as_number", "unit_concept_id").row(0)
    (1002, 7.5, 33)
    >>> t["death"]["death_date"].to_list(), t.next_id
    ([datetime.date(2020, 1, 3)], 1004)
    """  # noqa: E501
    if id_offset < 0:
        raise EhrgptError(f"id_offset must be 0 or more (got {id_offset}).")
    rows = as_event_frame(frame)
    if rows[mc.SUBJECT_ID].null_count() or (rows[mc.SUBJECT_ID] < 0).any():
        raise EhrgptError(
            "MEDS rows given to the OMOP sink need a subject_id of 0 or more "
            "(person_id = subject_id + id_offset)."
        )
    notes: Counter[str] = Counter()
    next_id = id_offset if first_id is None else int(first_id)
    used = pl.concat(
        [rows.select(pl.col(c).alias("code")) for c in (mc.CODE, mc.UNIT, mc.VALUE_CODE)]
    ).drop_nulls()
    used = used.unique().join(codes.unique("code", keep="first"), on="code", how="left")
    concepts = code_concepts(used, concept_table)
    rows = rows.with_columns(
        _kind(),
        (pl.col(mc.SUBJECT_ID) + id_offset).alias("person_id"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
    )

    person, rows = _persons(rows, concepts, notes)
    visits, visit_map, rows = _visits(rows, concepts, notes, type_concept_id, next_id)
    next_id += visits.height
    tables: dict[str, pl.DataFrame] = {"person": person, "visit_occurrence": visits}
    events = _events(rows, concepts, visit_map, notes)
    for name in EVENT_TABLES:
        part = events.filter(pl.col("_table") == name).sort("person_id", mc.TIME, mc.CODE, "_row")
        tables[name] = _event_table(_EVENT_SPECS[name], part, next_id, type_concept_id, notes)
        next_id += part.height
    tables["death"] = _deaths(rows, concepts, notes, type_concept_id)
    period = _observation_periods(tables, type_concept_id, next_id)
    next_id += period.height
    tables["observation_period"] = period
    order = ["person", "observation_period", "visit_occurrence", *EVENT_TABLES, "death"]
    out = {name: conform(name, tables[name]) for name in order}
    return OmopTables(out, next_id=next_id, notes=+notes)


def _persons(
    rows: pl.DataFrame, concepts: pl.DataFrame, notes: Counter[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    kind, code, time = pl.col("_kind"), pl.col(mc.CODE), pl.col(mc.TIME)

    def attr(prefix: str) -> pl.Expr:
        return code.filter(code.str.starts_with(prefix)).min()

    people = rows.group_by(mc.SUBJECT_ID, maintain_order=True).agg(
        pl.col("person_id").first(),
        time.filter(kind == _KIND_BIRTH).min().alias("birth"),
        time.filter((kind != _KIND_BIRTH) & time.is_not_null()).min().alias("first_time"),
        attr(mc.GENDER_PREFIX).alias("gender"),
        attr(mc.RACE_PREFIX).alias("race"),
        attr(mc.ETHNICITY_PREFIX).alias("ethnicity"),
        code.filter(code.str.starts_with(mc.GENDER_PREFIX)).n_unique().alias("n_gender"),
    )
    if (people["n_gender"] > 1).any():
        notes["persons with several genders (the first code kept)"] += int(
            (people["n_gender"] > 1).sum()
        )
    undated = people.filter(pl.col("birth").is_null() & pl.col("first_time").is_null())
    if undated.height:
        gone = rows.filter(pl.col(mc.SUBJECT_ID).is_in(undated[mc.SUBJECT_ID].implode()))
        notes["persons without any date (not written)"] += undated.height
        notes["rows of persons without any date (not written)"] += gone.height
        rows = rows.filter(~pl.col(mc.SUBJECT_ID).is_in(undated[mc.SUBJECT_ID].implode()))
        people = people.filter(pl.col("birth").is_not_null() | pl.col("first_time").is_not_null())
    notes["persons without MEDS_BIRTH (year of birth from the first event)"] += int(
        people["birth"].null_count()
    )
    # Rows without a time (static codes other than person attributes) are dated at birth.
    anchor = people.select(mc.SUBJECT_ID, pl.coalesce("birth", "first_time").alias("_anchor"))
    undated_rows = (time.is_null()) & (kind != _KIND_ATTR) & (kind != _KIND_DEATH)
    n_undated = int(rows.select(undated_rows.sum()).item())
    if n_undated:
        notes["rows without a time (dated at birth)"] += n_undated
        rows = (
            rows.join(anchor, on=mc.SUBJECT_ID, how="left")
            .with_columns(pl.when(undated_rows).then("_anchor").otherwise(time).alias(mc.TIME))
            .drop("_anchor")
        )
    for col in ("gender", "race", "ethnicity"):
        people = _lookup(people, col, concepts, f"{col}_concept_id")
    born = pl.col("birth")
    year = pl.coalesce(born, "first_time").dt.year()
    person = people.select(
        "person_id",
        pl.col("gender_concept_id").fill_null(0),
        year.alias("year_of_birth"),
        born.dt.month().alias("month_of_birth"),
        born.dt.day().alias("day_of_birth"),
        born.alias("birth_datetime"),
        pl.col("race_concept_id").fill_null(0),
        pl.col("ethnicity_concept_id").fill_null(0),
        pl.col(mc.SUBJECT_ID).cast(pl.String).alias("person_source_value"),
        pl.col("gender").alias("gender_source_value"),
        pl.col("race").alias("race_source_value"),
        pl.col("ethnicity").alias("ethnicity_source_value"),
    ).sort("person_id")
    return person, rows


def _visits(
    rows: pl.DataFrame,
    concepts: pl.DataFrame,
    notes: Counter[str],
    type_concept_id: int,
    first_id: int,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """visit_occurrence rows, the map (subject_id, visit_id) -> visit_occurrence_id, and the rows
    with ``_discharge_used`` marking the discharge rows that became a visit's discharge."""
    key = [mc.SUBJECT_ID, mc.VISIT_ID]
    kind, vid, time = pl.col("_kind"), pl.col(mc.VISIT_ID), pl.col(mc.TIME)
    visit_rows = rows.filter(kind == _KIND_VISIT).sort(time, "_row")
    keyed = visit_rows.filter(vid.is_not_null()).unique(key, keep="first", maintain_order=True)
    notes["VISIT rows repeating a visit id (merged)"] += (
        visit_rows.filter(vid.is_not_null()).height - keyed.height
    )
    unkeyed = visit_rows.filter(vid.is_null())
    members = rows.filter(kind.is_in([_KIND_EVENT, _KIND_DISCHARGE]) & vid.is_not_null())
    missing = (
        members.join(keyed.select(key), on=key, how="anti")
        .group_by(key, maintain_order=True)
        .agg(
            pl.col("person_id").first(),
            time.min(),
            pl.lit(mc.visit_code(None)).alias(mc.CODE),
            pl.lit(None, pl.Datetime("us")).alias(mc.END),
            pl.col("_row").min(),
        )
    )
    notes["visits made for rows naming a visit without a VISIT row"] += missing.height
    cols = [*key, "person_id", mc.TIME, mc.CODE, mc.END, "_row"]
    visits = pl.concat([keyed.select(cols), unkeyed.select(cols), missing.select(cols)])

    discharges = (
        rows.filter((kind == _KIND_DISCHARGE) & vid.is_not_null())
        .sort(time, "_row")
        .group_by(key, maintain_order=True)
        .agg(
            pl.col(mc.CODE).first().alias("_discharge"),
            time.first().alias("_discharge_time"),
            pl.col("_row").first().alias("_discharge_row"),
        )
    )
    last_member = members.group_by(key).agg(time.max().alias("_last"))
    visits = (
        visits.join(discharges, on=key, how="left", nulls_equal=False)
        .join(last_member, on=key, how="left", nulls_equal=False)
        .with_columns(
            pl.max_horizontal(time, pl.coalesce(mc.END, "_discharge_time", "_last", time)).alias(
                "_end"
            )
        )
        .sort("person_id", time, vid, "_row", nulls_last=True)
    )
    visits = _with_ids(visits, "visit_occurrence_id", first_id)
    visits = _lookup(visits, mc.CODE, concepts, "visit_concept_id")
    visits = _lookup(visits, "_discharge", concepts, "discharged_to_concept_id")
    table = visits.select(
        "visit_occurrence_id",
        "person_id",
        pl.col("visit_concept_id").fill_null(0),
        time.dt.date().alias("visit_start_date"),
        time.alias("visit_start_datetime"),
        pl.col("_end").dt.date().alias("visit_end_date"),
        pl.col("_end").alias("visit_end_datetime"),
        pl.lit(type_concept_id).alias("visit_type_concept_id"),
        pl.col(mc.CODE).alias("visit_source_value"),
        pl.when(pl.col("_discharge").is_not_null())
        .then(pl.col("discharged_to_concept_id").fill_null(0))
        .alias("discharged_to_concept_id"),
        pl.col("_discharge").alias("discharged_to_source_value"),
    )
    visit_map = visits.filter(vid.is_not_null()).select(*key, "visit_occurrence_id")
    used = discharges["_discharge_row"].implode()
    rows = rows.with_columns(pl.col("_row").is_in(used).fill_null(False).alias("_discharge_used"))
    return table, visit_map, rows


def _events(
    rows: pl.DataFrame, concepts: pl.DataFrame, visit_map: pl.DataFrame, notes: Counter[str]
) -> pl.DataFrame:
    """Clinical rows with their concept, unit and value concepts, visit and target table."""
    kind = pl.col("_kind")
    # Discharge rows that are no visit's discharge (no visit id, or a second one) stay events.
    stray = (kind == _KIND_DISCHARGE) & ~pl.col("_discharge_used")
    n_stray = int(rows.select(stray.sum()).item())
    if n_stray:
        notes["DISCHARGE rows that are no visit's discharge (-> observation)"] += n_stray
    events = rows.filter((kind == _KIND_EVENT) | stray)
    events = _lookup(events, mc.CODE, concepts, "_concept_id")
    events = _lookup(events, mc.UNIT, concepts, "_unit_concept_id")
    events = _lookup(events, mc.VALUE_CODE, concepts, "_value_concept_id")
    domains = concepts.select(pl.col("code").alias(mc.CODE), pl.col("domain_id").alias("_domain"))
    events = events.join(domains, on=mc.CODE, how="left").join(
        visit_map, on=[mc.SUBJECT_ID, mc.VISIT_ID], how="left", nulls_equal=False
    )
    by_domain = domain_table(pl.col("_domain"))
    by_source = pl.when(pl.col(mc.OMOP_TABLE).is_in(EVENT_TABLES)).then(pl.col(mc.OMOP_TABLE))
    events = events.with_columns(
        pl.coalesce(by_domain, by_source, pl.lit("observation")).alias("_table"),
        pl.when(by_domain.is_not_null())
        .then(pl.lit(None, pl.String))
        .when(by_source.is_not_null())
        .then(pl.lit("code without a clinical domain (table of its source row)"))
        .when(pl.col("_domain").is_not_null())
        .then(pl.lit("domain ") + pl.col("_domain") + pl.lit(" (-> observation)"))
        .otherwise(pl.lit("code without a domain (-> observation)"))
        .alias("_reason"),
    )
    for reason, n in events.group_by("_reason").len().drop_nulls().iter_rows():
        notes[reason] += n
    notes["codes without an OMOP concept (concept 0)"] += int(events["_concept_id"].null_count())
    return events


def _event_table(
    spec: _EventSpec, part: pl.DataFrame, first_id: int, type_concept_id: int, notes: Counter[str]
) -> pl.DataFrame:
    time, end = pl.col(mc.TIME), pl.col(mc.END)
    part = _with_ids(part, spec.id, first_id)
    cols: list[pl.Expr] = [
        pl.col(spec.id),
        pl.col("person_id"),
        pl.col("_concept_id").fill_null(0).alias(spec.concept),
        time.dt.date().alias(spec.start_date),
        time.alias(spec.start_datetime),
        pl.lit(type_concept_id).alias(spec.type_concept),
        pl.col("visit_occurrence_id"),
        pl.col(mc.CODE).alias(spec.source_value),
    ]
    if spec.end_date and spec.end_datetime:
        stop = pl.coalesce(end, time) if spec.table == "drug_exposure" else end
        cols += [stop.dt.date().alias(spec.end_date), end.alias(spec.end_datetime)]
    value, text = pl.col(mc.NUMERIC_VALUE), pl.col(mc.TEXT_VALUE)
    unit, vcode = pl.col(mc.UNIT), pl.col(mc.VALUE_CODE)
    lost = pl.lit(False)
    if spec.table in ("measurement", "observation"):
        cols += [
            value.cast(pl.Float64).alias("value_as_number"),
            pl.col("_value_concept_id").alias("value_as_concept_id"),
            pl.when(unit.is_not_null())
            .then(pl.col("_unit_concept_id").fill_null(0))
            .alias("unit_concept_id"),
            unit.alias("unit_source_value"),
        ]
        if spec.table == "observation":
            cols += [text.alias("value_as_string"), vcode.alias("value_source_value")]
        else:
            cols.append(pl.coalesce(text, vcode).alias("value_source_value"))
    elif spec.table == "drug_exposure":
        cols += [value.cast(pl.Float64).alias("quantity"), unit.alias("dose_unit_source_value")]
        lost = text.is_not_null() | vcode.is_not_null()
        n_quantity = int(part.select(value.is_not_null().sum()).item())
        if n_quantity:
            notes["drug numeric values written as quantity"] += n_quantity
    elif spec.table == "device_exposure":
        cols += [
            pl.when(unit.is_not_null())
            .then(pl.col("_unit_concept_id").fill_null(0))
            .alias("unit_concept_id"),
            unit.alias("unit_source_value"),
        ]
        lost = value.is_not_null() | text.is_not_null() | vcode.is_not_null()
    else:
        lost = value.is_not_null() | text.is_not_null() | vcode.is_not_null() | unit.is_not_null()
    n_lost = int(part.select(lost.sum()).item()) if part.height else 0
    if n_lost:
        notes[f"values with no column in {spec.table} (value not written)"] += n_lost
    return part.select(cols)


def _deaths(
    rows: pl.DataFrame, concepts: pl.DataFrame, notes: Counter[str], type_concept_id: int
) -> pl.DataFrame:
    kind, time = pl.col("_kind"), pl.col(mc.TIME)
    meds_death = rows.filter((kind == _KIND_DEATH) & time.is_not_null())
    n_untimed = rows.filter((kind == _KIND_DEATH) & time.is_null()).height
    if n_untimed:
        notes["MEDS_DEATH rows without a time (not written)"] += n_untimed
    died = _lookup(rows.filter(kind == _KIND_DISCHARGE), mc.CODE, concepts, "_cid").filter(
        pl.col("_cid") == mc.DIED_DISCHARGE_CONCEPT
    )
    deaths = (
        pl.concat(
            [
                meds_death.select("person_id", time, pl.lit(0).alias("_source")),
                died.select("person_id", time, pl.lit(1).alias("_source")),
            ]
        )
        .sort("person_id", "_source", time)
        .group_by("person_id", maintain_order=True)
        .agg(time.first(), pl.col("_source").first(), (pl.col("_source") == 0).sum().alias("_n"))
    )
    notes["deaths from a discharge to 4216643 (no MEDS_DEATH)"] += int(
        (deaths["_source"] == 1).sum()
    )
    notes["persons with several MEDS_DEATH rows (the first kept)"] += int((deaths["_n"] > 1).sum())
    return deaths.select(
        "person_id",
        time.dt.date().alias("death_date"),
        time.alias("death_datetime"),
        pl.lit(type_concept_id).alias("death_type_concept_id"),
    )


def _observation_periods(
    tables: Mapping[str, pl.DataFrame], type_concept_id: int, first_id: int
) -> pl.DataFrame:
    """One period per person from the first to the last date in any of its rows (birth only
    when the person has no other date)."""
    dates = []
    visits = tables["visit_occurrence"]
    dates.append(visits.select("person_id", pl.col("visit_start_date").alias("d")))
    dates.append(visits.select("person_id", pl.col("visit_end_date").alias("d")))
    for name in EVENT_TABLES:
        spec, frame = _EVENT_SPECS[name], tables[name]
        dates.append(frame.select("person_id", pl.col(spec.start_date).alias("d")))
        if spec.end_date:
            dates.append(frame.select("person_id", pl.col(spec.end_date).alias("d")))
    dates.append(tables["death"].select("person_id", pl.col("death_date").alias("d")))
    span = (
        pl.concat(dates)
        .drop_nulls()
        .group_by("person_id")
        .agg(pl.col("d").min().alias("start"), pl.col("d").max().alias("end"))
    )
    birth = tables["person"].select("person_id", pl.col("birth_datetime").dt.date().alias("_birth"))
    periods = (
        birth.join(span, on="person_id", how="left")
        .with_columns(
            pl.coalesce("start", "_birth").alias("start"),
            pl.coalesce("end", "_birth").alias("end"),
        )
        .filter(pl.col("start").is_not_null())
        .sort("person_id")
    )
    periods = _with_ids(periods, "observation_period_id", first_id)
    return periods.select(
        "observation_period_id",
        "person_id",
        pl.col("start").alias("observation_period_start_date"),
        pl.col("end").alias("observation_period_end_date"),
        pl.lit(type_concept_id).alias("period_type_concept_id"),
    )


# -- writing --------------------------------------------------------------------------------


def _id_column(table: str) -> str | None:
    """The primary-key column of a CDM table (``None`` for death)."""
    first = CDM_TABLES[table][0].name
    return first if table not in ("death",) and first.endswith("_id") else None


def _concept_ids(tables: Mapping[str, pl.DataFrame]) -> set[int]:
    ids: set[int] = set()
    for frame in tables.values():
        for col in frame.columns:
            if col.endswith("concept_id"):
                ids.update(int(v) for v in frame[col].drop_nulls().unique().to_list() if v)
    return ids


@dataclass
class OmopWriteSummary:
    """What an :class:`OmopWriter` session wrote."""

    target: str
    fmt: str
    chunks: int
    rows: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)


def _resolve_format(target: str | Path, fmt: str | None) -> tuple[str, str]:
    """(format, target) from a path or URL and an optional format name.

    >>> _resolve_format("out/cdm.duckdb", None), _resolve_format("out", "csv")
    (('duckdb', 'out/cdm.duckdb'), ('csv', 'out'))
    >>> _resolve_format("x", "postgresql://h/db?schema=synth")
    ('postgresql', 'postgresql://h/db?schema=synth')
    """
    text = str(target)
    if fmt and fmt.startswith(("postgresql://", "postgres://")):
        return "postgresql", fmt
    if text.startswith(("postgresql://", "postgres://")):
        if fmt not in (None, "postgresql"):
            raise EhrgptError(f"A PostgreSQL URL cannot be written as {fmt!r}.")
        return "postgresql", text
    if fmt is None:
        fmt = "duckdb" if Path(text).suffix.lower() in (".duckdb", ".ddb", ".db") else "parquet"
    fmt = fmt.lower()
    if fmt not in ("duckdb", "parquet", "csv"):
        raise EhrgptError(
            f"Unknown OMOP output format {fmt!r}; use duckdb, parquet, csv or a postgresql:// URL."
        )
    return fmt, text


class OmopWriter:
    """Append chunks of MEDS rows, as OMOP CDM 5.4 tables, to a database or a folder.

    Args:
        target: a DuckDB file, a folder (parquet or CSV), or a ``postgresql://`` URL whose
            ``?schema=`` names the schema (created if missing; default ``public``).
        fmt: ``duckdb``, ``parquet``, ``csv`` or ``postgresql``; inferred when ``None``
            (URL -> postgresql, ``.duckdb``/``.ddb``/``.db`` -> duckdb, else parquet).
        codes: the codes metadata of the run (``meds/metadata/codes.parquet``).
        id_offset: base of the ids (see the module docstring); for synthetic patients use a
            range above the real maximum id, e.g. :data:`SYNTHETIC_ID_OFFSET`.
        concept_table: an OMOP concept table, to map codes the metadata lacks and to copy
            concept rows from.
        write_concepts: add to the target's ``concept`` table the concepts a chunk uses that
            it lacks (made from ``concept_table`` or from ``codes``).
        add_keys: PostgreSQL only: add primary keys and the person / visit foreign keys at
            :meth:`close`.

    Every chunk is atomic: one transaction (DuckDB, PostgreSQL) or a set of files renamed into
    place and recorded in ``_ehrgpt_omop_writer.json`` (folders; on reopening, files of an
    unrecorded chunk are removed). Tables are created with CDM 5.4 types where missing;
    existing tables are appended to (only the columns they have).
    """

    def __init__(
        self,
        target: str | Path,
        *,
        fmt: str | None = None,
        codes: pl.DataFrame,
        id_offset: int,
        concept_table: pl.DataFrame | None = None,
        type_concept_id: int = EHR_TYPE_CONCEPT,
        write_concepts: bool = True,
        add_keys: bool = False,
    ) -> None:
        self.fmt, where = _resolve_format(target, fmt)
        self.codes = codes
        self.id_offset = int(id_offset)
        self.concept_table = concept_table
        self.type_concept_id = type_concept_id
        self.write_concepts = write_concepts
        self.add_keys = add_keys
        self.notes: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.chunks = 0
        backend: _Backend
        if self.fmt == "postgresql":
            backend = _PostgresBackend(where)
        elif self.fmt == "duckdb":
            backend = _DuckDbBackend(Path(where))
        else:
            backend = _FileBackend(Path(where), self.fmt)
        self._backend = backend
        self.target = backend.description
        self.next_id = max(self.id_offset, backend.max_id() + 1)
        self._closed = False

    def completed_subjects(self) -> set[int]:
        """Subjects (``person_id - id_offset``) already in the target at or above the offset."""
        return {p - self.id_offset for p in self._backend.person_ids(self.id_offset)}

    def write(self, frame: pl.DataFrame) -> dict[str, int]:
        """Convert a chunk of MEDS rows (whole subjects) and append it; rows per table."""
        tables = meds_to_omop(
            frame,
            self.codes,
            id_offset=self.id_offset,
            concept_table=self.concept_table,
            first_id=self.next_id,
            type_concept_id=self.type_concept_id,
        )
        self.notes.update(tables.notes)
        return self.write_tables(tables)

    def write_tables(self, tables: Mapping[str, pl.DataFrame]) -> dict[str, int]:
        """Append CDM tables (as made by :func:`meds_to_omop`) as one atomic chunk."""
        if self._closed:
            raise EhrgptError(f"The OMOP writer of {self.target} is already closed.")
        out = {name: conform(name, frame) for name, frame in tables.items()}
        if "person" in out and out["person"].height:
            ids = out["person"]["person_id"].to_list()
            if len(set(ids)) != len(ids):
                raise EhrgptError("A chunk for the OMOP writer holds a person id twice.")
            clash = self._backend.existing_persons(ids)
            if clash:
                raise EhrgptError(
                    f"{len(clash)} person id(s) of this chunk (e.g. {min(clash)}) already exist "
                    f"in {self.target}; pass an id_offset above the largest real person id "
                    f"(e.g. {SYNTHETIC_ID_OFFSET}) and skip completed_subjects() when resuming."
                )
        if self.write_concepts:
            used = _concept_ids(out)
            new = used - self._backend.existing_concepts(used)
            if new:
                rows = concept_rows(new, self.codes, self.concept_table)
                if rows.height:
                    out["concept"] = pl.concat([out["concept"], rows]) if "concept" in out else rows
        ids = [
            int(out[t][col].max())  # type: ignore[arg-type]
            for t in out
            if (col := _id_column(t)) and t != "person" and t != "concept" and out[t].height
        ]
        next_id = getattr(tables, "next_id", max(ids, default=self.next_id - 1) + 1)
        self.next_id = max(self.next_id, int(next_id))
        self._backend.write_chunk(out, self.next_id)
        self.chunks += 1
        counts = {name: frame.height for name, frame in out.items()}
        self.rows.update(counts)
        return counts

    def close(self) -> OmopWriteSummary:
        """Finish: add keys (PostgreSQL, when asked) and release the target."""
        if not self._closed:
            try:
                if self.add_keys:
                    self._backend.add_keys()
            finally:
                self._backend.close()
                self._closed = True
        return OmopWriteSummary(
            self.target, self.fmt, self.chunks, dict(self.rows), dict(sorted(self.notes.items()))
        )

    def __enter__(self) -> OmopWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._backend.close()
            self._closed = True


class _Backend:
    """Where chunks go; each method is one small, well-defined operation."""

    description: str

    def max_id(self) -> int:
        raise NotImplementedError

    def person_ids(self, at_least: int) -> list[int]:
        raise NotImplementedError

    def existing_persons(self, ids: list[int]) -> set[int]:
        raise NotImplementedError

    def existing_concepts(self, ids: set[int]) -> set[int]:
        raise NotImplementedError

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        raise NotImplementedError

    def add_keys(self) -> None:
        log.warning("Keys are only added to PostgreSQL targets; %s gets none.", self.description)

    def close(self) -> None:
        return None


# DuckDB writes NUMERIC as DECIMAL(18,3), which would round values: DOUBLE keeps them.
def _ddl_type(sql_type: str, engine: str) -> str:
    return "DOUBLE" if engine == "duckdb" and sql_type == "NUMERIC" else sql_type


def _ddl(table: str, qualified: str, engine: str) -> str:
    cols = ", ".join(
        f"{c.name} {_ddl_type(c.type, engine)}{' NOT NULL' if c.required else ''}"
        for c in CDM_TABLES[table]
    )
    return f"CREATE TABLE IF NOT EXISTS {qualified} ({cols})"


#: CDM 5.3 spellings of 5.4 columns, used when appending to a 5.3 table.
_CDM53_NAMES = {
    "discharged_to_concept_id": "discharge_to_concept_id",
    "discharged_to_source_value": "discharge_to_source_value",
}


def _fit_columns(
    frame: pl.DataFrame, have: list[str], table: str, notes: Counter[str] | None = None
) -> pl.DataFrame:
    """The frame with only the columns an existing table has (5.3 names where it uses them).

    >>> f = pl.DataFrame({"a": [1], "discharged_to_concept_id": [2], "z": [None]})
    >>> _fit_columns(f, ["a", "discharge_to_concept_id"], "t").columns
    ['a', 'discharge_to_concept_id']
    """
    have_set = {h.lower() for h in have}
    renames = {
        new: old
        for new, old in _CDM53_NAMES.items()
        if new in frame.columns and new not in have_set and old in have_set
    }
    frame = frame.rename(renames)
    keep = [c for c in frame.columns if c in have_set]
    filled = [c for c in frame.columns if frame[c].null_count() < frame.height]
    dropped = [c for c in filled if c not in have_set]
    if dropped:
        raise EhrgptError(
            f"The existing OMOP table {table} lacks the column(s) {', '.join(dropped)} that "
            "this chunk fills; add them or write to a new schema, file or folder."
        )
    return frame.select(keep)


class _DuckDbBackend(_Backend):
    def __init__(self, path: Path) -> None:
        import duckdb

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(path))
        except duckdb.Error as exc:
            raise EhrgptError(
                f"Cannot open DuckDB file {path} for writing: {exc}; check that no other "
                "process has it open."
            ) from None
        self.description = f"DuckDB {path}"
        for table in CDM_TABLES:
            self.con.execute(_ddl(table, table, "duckdb")).fetchall()
        self.columns = {
            table: [
                str(r[0]).lower()
                for r in self.con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE "
                    "lower(table_name) = ? AND table_schema = current_schema() "
                    "ORDER BY ordinal_position",
                    [table],
                ).fetchall()
            ]
            for table in CDM_TABLES
        }

    def _max(self, table: str, col: str) -> int:
        if col not in self.columns[table]:
            return -1
        value = self.con.execute(f"SELECT max({col}) FROM {table}").fetchall()[0][0]
        return int(value) if value is not None else -1

    def max_id(self) -> int:
        return max(
            self._max(t, col)
            for t in CDM_TABLES
            if (col := _id_column(t)) and t not in ("person", "concept")
        )

    def _existing(self, table: str, col: str, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        if not ids or col not in self.columns[table]:
            return set()
        self.con.register("_ids", pl.DataFrame({"i": ids}, schema={"i": pl.Int64}).to_arrow())
        try:
            found = self.con.execute(
                f"SELECT DISTINCT {col} FROM {table} WHERE {col} IN (SELECT i FROM _ids)"
            ).fetchall()
        finally:
            self.con.unregister("_ids")
        return {int(r[0]) for r in found}

    def person_ids(self, at_least: int) -> list[int]:
        rows = self.con.execute(
            "SELECT person_id FROM person WHERE person_id >= ?", [at_least]
        ).fetchall()
        return [int(r[0]) for r in rows]

    def existing_persons(self, ids: list[int]) -> set[int]:
        return self._existing("person", "person_id", ids)

    def existing_concepts(self, ids: set[int]) -> set[int]:
        return self._existing("concept", "concept_id", ids)

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        self.con.begin()
        try:
            for table, frame in tables.items():
                if not frame.height:
                    continue
                part = _fit_columns(frame, self.columns[table], table)
                self.con.register("_chunk", part.to_arrow())
                cols = ", ".join(part.columns)
                self.con.execute(
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _chunk"
                ).fetchall()
                self.con.unregister("_chunk")
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    def close(self) -> None:
        self.con.close()


_MANIFEST = "_ehrgpt_omop_writer.json"
_PART = re.compile(r"^part-(\d+)\.(parquet|csv)$")


class _FileBackend(_Backend):
    """A folder with one sub-folder per table and one file per table per chunk."""

    def __init__(self, folder: Path, fmt: str) -> None:
        self.folder, self.fmt = folder, fmt
        self.description = f"{fmt} folder {folder}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / _MANIFEST
        if manifest.exists():
            self.state = json.loads(manifest.read_text())
            if self.state.get("format") != fmt:
                raise EhrgptError(
                    f"{folder} holds OMOP tables written as {self.state.get('format')}, not "
                    f"{fmt}; write {fmt} to another folder."
                )
        else:
            if any(folder.iterdir()):
                raise EhrgptError(
                    f"The folder {folder} is not empty and was not written by ehrgpt's OMOP "
                    "writer; give a new or empty folder."
                )
            self.state = {"format": fmt, "chunks": 0, "next_id": -1}
        self._remove_unrecorded()
        self.persons = set(self._read_ints("person", "person_id"))
        self.concepts = set(self._read_ints("concept", "concept_id"))

    def _remove_unrecorded(self) -> None:
        """Delete temporary files and the files of a chunk the manifest does not record."""
        for tmp in self.folder.glob(f".{_MANIFEST}.tmp*"):
            tmp.unlink()
        for table_dir in (p for p in self.folder.iterdir() if p.is_dir()):
            for f in table_dir.iterdir():
                m = _PART.match(f.name)
                if f.name.startswith(".") or (m and int(m.group(1)) >= self.state["chunks"]):
                    log.warning("Removing %s, left by an interrupted OMOP writer.", f)
                    f.unlink()

    def _files(self, table: str) -> list[Path]:
        folder = self.folder / table
        return sorted(p for p in folder.glob(f"part-*.{self.fmt}") if _PART.match(p.name))

    def _read_ints(self, table: str, col: str) -> list[int]:
        files = self._files(table)
        if not files:
            return []
        if self.fmt == "parquet":
            frame = pl.read_parquet(files, columns=[col])
        else:
            frame = pl.concat(
                [pl.read_csv(f, columns=[col], schema_overrides={col: pl.Int64}) for f in files]
            )
        return frame[col].drop_nulls().to_list()

    def max_id(self) -> int:
        return int(self.state.get("next_id", -1)) - 1 if self.state["chunks"] else -1

    def person_ids(self, at_least: int) -> list[int]:
        return [p for p in self.persons if p >= at_least]

    def existing_persons(self, ids: list[int]) -> set[int]:
        return self.persons.intersection(ids)

    def existing_concepts(self, ids: set[int]) -> set[int]:
        return self.concepts & ids

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        n = int(self.state["chunks"])
        staged: list[tuple[Path, Path]] = []
        try:
            for table, frame in tables.items():
                if not frame.height and n:
                    continue  # empty tables get a file in the first chunk only
                folder = self.folder / table
                folder.mkdir(exist_ok=True)
                final = folder / f"part-{n:03d}.{self.fmt}"
                tmp = folder / f".{final.name}.tmp-{os.getpid()}"
                if self.fmt == "parquet":
                    frame.write_parquet(tmp)
                else:
                    frame.write_csv(tmp, datetime_format=_DATETIME_FORMAT, date_format="%Y-%m-%d")
                staged.append((tmp, final))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, final in staged:
            os.replace(tmp, final)
        state = {**self.state, "chunks": n + 1, "next_id": int(next_id)}
        tmp_manifest = self.folder / f".{_MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(state, indent=1))
        os.replace(tmp_manifest, self.folder / _MANIFEST)
        self.state = state
        if "person" in tables:
            self.persons.update(tables["person"]["person_id"].to_list())
        if "concept" in tables:
            self.concepts.update(tables["concept"]["concept_id"].to_list())


class _PostgresBackend(_Backend):
    def __init__(self, url: str) -> None:
        from psycopg import sql

        from ehrgpt.sources.postgres import _connect, parse_postgres_url

        self.sql = sql
        self.target = parse_postgres_url(url)
        self.description = f"PostgreSQL {self.target.masked_url}"
        self._stack = contextlib.ExitStack()
        self.conn = self._stack.enter_context(_connect(self.target, autocommit=True))
        schema = self.target.schema
        self.schema = sql.Identifier(schema)
        with self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self.schema))
            stored: dict[str, str] = {}
            for (name,) in self.conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "ORDER BY table_name <> lower(table_name), table_name",
                (schema,),
            ).fetchall():
                stored.setdefault(str(name).lower(), str(name))
            self.names: dict[str, str] = {}
            self.columns: dict[str, list[str]] = {}
            for table in CDM_TABLES:
                name = stored.get(table, table)
                self.names[table] = name
                if table not in stored:
                    qualified = self._q(table).as_string(self.conn)
                    self.conn.execute(sql.SQL(_ddl(table, qualified, "postgresql")))  # type: ignore[arg-type]
                self.columns[table] = [
                    str(r[0])
                    for r in self.conn.execute(
                        "SELECT column_name FROM information_schema.columns WHERE "
                        "table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                        (schema, name),
                    ).fetchall()
                ]

    def _q(self, table: str) -> Any:
        return self.sql.Identifier(self.target.schema, self.names[table])

    def _col(self, table: str, col: str) -> str | None:
        return next((c for c in self.columns[table] if c.lower() == col), None)

    def max_id(self) -> int:
        best = -1
        for table in CDM_TABLES:
            col = _id_column(table)
            if not col or table in ("person", "concept") or not self._col(table, col):
                continue
            q = self.sql.SQL("SELECT max({}) FROM {}").format(
                self.sql.Identifier(self._col(table, col)), self._q(table)
            )
            value = self.conn.execute(q).fetchone()[0]
            if value is not None:
                best = max(best, int(value))
        return best

    def _existing(self, table: str, col: str, ids: Iterable[int]) -> set[int]:
        ids = list(ids)
        name = self._col(table, col)
        if not ids or not name:
            return set()
        q = self.sql.SQL("SELECT DISTINCT {c} FROM {t} WHERE {c} = ANY(%s)").format(
            c=self.sql.Identifier(name), t=self._q(table)
        )
        return {int(r[0]) for r in self.conn.execute(q, (ids,)).fetchall()}

    def person_ids(self, at_least: int) -> list[int]:
        q = self.sql.SQL("SELECT person_id FROM {} WHERE person_id >= %s").format(self._q("person"))
        return [int(r[0]) for r in self.conn.execute(q, (at_least,)).fetchall()]

    def existing_persons(self, ids: list[int]) -> set[int]:
        return self._existing("person", "person_id", ids)

    def existing_concepts(self, ids: set[int]) -> set[int]:
        return self._existing("concept", "concept_id", ids)

    def write_chunk(self, tables: Mapping[str, pl.DataFrame], next_id: int) -> None:
        sql = self.sql
        with self.conn.transaction(), self.conn.cursor() as cur:
            for table, frame in tables.items():
                if not frame.height:
                    continue
                part = _fit_columns(frame, [c.lower() for c in self.columns[table]], table)
                cols = [self._col(table, c) or c for c in part.columns]
                buf = io.BytesIO()
                part.write_csv(buf, datetime_format=_DATETIME_FORMAT, date_format="%Y-%m-%d")
                q = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv, HEADER true)").format(
                    self._q(table), sql.SQL(", ").join(sql.Identifier(c) for c in cols)
                )
                with cur.copy(q) as copy:
                    copy.write(buf.getvalue())

    def _constraints(self) -> set[str]:
        rows = self.conn.execute(
            "SELECT c.conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = %s",
            (self.target.schema,),
        ).fetchall()
        return {str(r[0]) for r in rows}

    def _has_primary_key(self, table: str) -> bool:
        q = (
            "SELECT 1 FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = %s AND c.contype = 'p'"
        )
        return self.conn.execute(q, (self.target.schema, self.names[table])).fetchone() is not None

    def add_keys(self) -> None:
        """Primary keys on the id columns; person and visit foreign keys on every table."""
        sql = self.sql
        statements = []
        for table in CDM_TABLES:
            col = _id_column(table)
            if col and self._col(table, col) and not self._has_primary_key(table):
                statements.append(
                    sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                        self._q(table), sql.Identifier(self._col(table, col))
                    )
                )
        existing = self._constraints()
        for table in CDM_TABLES:
            for col, parent in (
                ("person_id", "person"),
                ("visit_occurrence_id", "visit_occurrence"),
            ):
                if table == parent or not self._col(table, col):
                    continue
                name = f"fpk_{table}_{col}"[:63]
                if name in existing:
                    continue
                statements.append(
                    sql.SQL(
                        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})"
                    ).format(
                        self._q(table),
                        sql.Identifier(name),
                        sql.Identifier(self._col(table, col)),
                        self._q(parent),
                        sql.Identifier(self._col(parent, col)),
                    )
                )
        for statement in statements:
            try:
                with self.conn.transaction():
                    self.conn.execute(statement)
            except Exception as exc:
                text = statement.as_string(self.conn)
                raise EhrgptError(
                    f"Cannot add a key in {self.description} ({text}): "
                    f"{str(exc).strip().splitlines()[0]}."
                ) from None

    def close(self) -> None:
        self._stack.close()
