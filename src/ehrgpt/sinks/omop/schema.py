"""The OMOP CDM 5.4 tables ehrgpt writes: columns, types, event-table names, and conforming.

:data:`CDM_TABLES` lists every column of each table in DDL order with its SQL type and
NOT NULL flag; :data:`EVENT_SPECS` names the columns of the six clinical event tables;
:func:`conform` turns a frame into a table of exactly that shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from ehrgpt.errors import SinkError

__all__ = [
    "CDM_TABLES",
    "EHR_TYPE_CONCEPT",
    "EVENT_SPECS",
    "EVENT_TABLES",
    "ID_COLUMNS",
    "INT32_MAX",
    "SEQUENCE_ID_COLUMNS",
    "SYNTHETIC_ID_OFFSET",
    "CdmColumn",
    "EventSpec",
    "conform",
    "id_column",
    "integer_limit",
    "polars_type",
]

#: Type concept "EHR" given to every row (``*_type_concept_id``); pass another if it fits better.
EHR_TYPE_CONCEPT = 32817
#: A base for synthetic ids far above the person ids of any real OMOP installation; it needs
#: BIGINT id columns (the official CDM 5.4 DDL declares them ``integer``: see :data:`INT32_MAX`).
SYNTHETIC_ID_OFFSET = 10**12
#: The largest id a CDM 5.4 ``integer`` column (32-bit, as in the official DDL) can hold.
INT32_MAX = 2**31 - 1


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
class EventSpec:
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


def _spec(table: str, stem: str, start: str, end: str | None) -> EventSpec:
    """The spec of ``table`` from its column stems.

    >>> _spec("measurement", "measurement", "measurement", None).start_date
    'measurement_date'
    """
    return EventSpec(
        table,
        f"{table}_id",
        f"{stem}_concept_id",
        f"{start}_date",
        f"{start}_datetime",
        f"{end}_date" if end else None,
        f"{end}_datetime" if end else None,
        f"{stem}_type_concept_id",
        f"{stem}_source_value",
    )


#: Column names of each clinical event table, in the order their ids are given.
EVENT_SPECS: dict[str, EventSpec] = {
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
EVENT_TABLES: tuple[str, ...] = tuple(EVENT_SPECS)


def id_column(table: str) -> str | None:
    """The primary-key column of a CDM table (``None`` for death).

    >>> id_column("visit_occurrence"), id_column("death")
    ('visit_occurrence_id', None)
    """
    first = CDM_TABLES[table][0].name
    return first if table not in ("death",) and first.endswith("_id") else None


#: Table -> id column of the tables whose ids come from the one shared sequence (all but
#: person, whose ids are ``subject_id + id_offset``, concept, and death, which has no id).
SEQUENCE_ID_COLUMNS: dict[str, str] = {
    t: col for t in CDM_TABLES if (col := id_column(t)) and t not in ("person", "concept")
}


#: Table -> the columns of that table that hold record ids ehrgpt writes: its own id, the
#: person and visit it belongs to.
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    table: tuple(
        c.name
        for c in cols
        if c.name in ("person_id", "visit_occurrence_id", "preceding_visit_occurrence_id")
        or c.name == id_column(table)
    )
    for table, cols in CDM_TABLES.items()
    if table != "concept"
}


def integer_limit(sql_type: str) -> int:
    """The largest integer a column of this SQL type (PostgreSQL or DuckDB spelling) holds;
    0 for a type that holds no integer ids (text, dates).

    >>> integer_limit("integer"), integer_limit("BIGINT") == 2**63 - 1, integer_limit("int2")
    (2147483647, True, 32767)
    >>> integer_limit("numeric(12,0)"), integer_limit("DOUBLE"), integer_limit("varchar")
    (999999999999, 9007199254740992, 0)
    """
    t = sql_type.strip().lower()
    named = {
        "smallint": 2**15 - 1,
        "int2": 2**15 - 1,
        "tinyint": 2**7 - 1,
        "utinyint": 2**8 - 1,
        "usmallint": 2**16 - 1,
        "integer": INT32_MAX,
        "int": INT32_MAX,
        "int4": INT32_MAX,
        "uinteger": 2**32 - 1,
        "bigint": 2**63 - 1,
        "int8": 2**63 - 1,
        "ubigint": 2**63 - 1,
        "hugeint": 2**63 - 1,
        "uhugeint": 2**63 - 1,
        "double": 2**53,
        "double precision": 2**53,
        "real": 2**24,
        "float": 2**53,
    }
    if t in named:
        return named[t]
    m = re.fullmatch(r"(?:numeric|decimal)\s*(?:\((\d+)(?:\s*,\s*(\d+))?\))?", t)
    if m:
        if m.group(1) is None:
            return 2**63 - 1
        digits = int(m.group(1)) - int(m.group(2) or 0)
        return min(10**digits - 1, 2**63 - 1)
    return 0


def polars_type(sql_type: str) -> pl.DataType:
    """The polars dtype of a CDM column type.

    >>> polars_type("BIGINT"), polars_type("VARCHAR(50)"), polars_type("NUMERIC")
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

    Columns the frame lacks become null; a null in a NOT NULL column raises ``SinkError``.

    >>> df = conform("death", pl.DataFrame({"person_id": [7], "death_date": ["2020-01-02"]}
    ...              ).with_columns(pl.col("death_date").str.to_date()))
    >>> df.columns[:3], df.schema["death_type_concept_id"]
    (['person_id', 'death_date', 'death_datetime'], Int32)
    """
    exprs = []
    for col in CDM_TABLES[table]:
        dtype = polars_type(col.type)
        expr = pl.col(col.name).cast(dtype) if col.name in frame.columns else pl.lit(None, dtype)
        length = _varchar_length(col.type)
        if length is not None:
            expr = expr.str.slice(0, length)
        exprs.append(expr.alias(col.name))
    out = frame.select(exprs)
    bad = [c.name for c in CDM_TABLES[table] if c.required and out[c.name].null_count()]
    if bad:
        raise SinkError(
            f"OMOP table {table} would get nulls in its NOT NULL column(s) {', '.join(bad)}."
        )
    return out
