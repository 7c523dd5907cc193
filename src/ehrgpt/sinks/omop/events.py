"""The clinical event tables of a chunk: each clinical row goes to the table of its domain.

A row's table is the one of its concept's domain (:func:`~ehrgpt.sinks.omop.concepts.domain_table`),
else the table of the OMOP row it came from (``omop_table``), else ``observation``; every
rerouting is counted in ``notes``. Values go to the columns the table has for them
(``value_as_number``, ``unit_concept_id``, ``value_as_concept_id``, a drug's ``quantity``);
values a table has no column for are counted.
"""

from __future__ import annotations

from collections import Counter

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.sinks.omop.concepts import code_concepts, domain_table, lookup_concept
from ehrgpt.sinks.omop.rows import (
    KIND_ATTR,
    KIND_BIRTH,
    KIND_DEATH,
    KIND_DISCHARGE,
    KIND_EVENT,
    KIND_VISIT,
    row_kind,
    with_ids,
)
from ehrgpt.sinks.omop.schema import EVENT_SPECS, EVENT_TABLES, EventSpec

__all__ = ["event_table", "event_tables", "with_omop_tables"]


def event_table(domain: pl.Expr, source_table: pl.Expr) -> pl.Expr:
    """The event table of a clinical row: its domain's, else its source row's, else
    ``observation``.

    >>> pl.DataFrame({"d": ["Drug", None, "Gender"], "t": [None, "measurement", None]}).select(
    ...     event_table(pl.col("d"), pl.col("t")))["d"].to_list()
    ['drug_exposure', 'measurement', 'observation']
    """
    by_source = pl.when(source_table.is_in(EVENT_TABLES)).then(source_table)
    return pl.coalesce(domain_table(domain), by_source, pl.lit("observation"))


def with_omop_tables(
    frame: pl.DataFrame, codes: pl.DataFrame, concept_table: pl.DataFrame | None = None
) -> pl.DataFrame:
    """MEDS rows with ``omop_table`` filled where null, as the OMOP sink decides it: ``person``
    for demographics and birth, ``visit_occurrence`` for visits and discharges, ``death``, and
    for clinical rows the table of their concept's domain (:func:`event_table`).

    >>> codes = pl.DataFrame({"code": ["LOINC/2"], "omop_domain": ["Measurement"]})
    >>> rows = pl.DataFrame({"code": ["GENDER/8532", "VISIT/9201", "LOINC/2", "X/1"]})
    >>> with_omop_tables(rows, codes)["omop_table"].to_list()
    ['person', 'visit_occurrence', 'measurement', 'observation']
    """
    code, kind = pl.col(mc.CODE), pl.col("_kind")
    source = pl.col(mc.OMOP_TABLE) if mc.OMOP_TABLE in frame.columns else pl.lit(None, pl.String)
    used = frame.select(pl.col(mc.CODE).unique().alias("code"))
    concepts = code_concepts(used.join(codes.unique("code"), on="code", how="left"), concept_table)
    domains = concepts.select(pl.col("code").alias(mc.CODE), pl.col("domain_id").alias("_domain"))
    table = (
        pl.when(kind.is_in([KIND_ATTR, KIND_BIRTH]))
        .then(pl.lit("person"))
        .when(kind.is_in([KIND_VISIT, KIND_DISCHARGE]))
        .then(pl.lit("visit_occurrence"))
        .when(kind == KIND_DEATH)
        .then(pl.lit("death"))
        .otherwise(event_table(pl.col("_domain"), source))
    )
    return (
        frame.with_columns(row_kind(code))
        .join(domains, on=mc.CODE, how="left", maintain_order="left")
        .with_columns(pl.coalesce(source, table).alias(mc.OMOP_TABLE))
        .drop("_kind", "_domain")
    )


def event_tables(
    rows: pl.DataFrame,
    concepts: pl.DataFrame,
    visit_map: pl.DataFrame,
    notes: Counter[str],
    type_concept_id: int,
    first_id: int,
) -> dict[str, pl.DataFrame]:
    """Each of :data:`~ehrgpt.sinks.omop.schema.EVENT_TABLES` (in that order), its ids running
    on from ``first_id`` table after table, rows ordered by person, time and code.

    >>> import datetime as dt
    >>> from ehrgpt.sinks.omop.rows import prepare_rows
    >>> rows, concepts = prepare_rows(pl.DataFrame({"subject_id": [1, 1],
    ...     "time": [dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 2)],
    ...     "code": ["SNOMED/1", "LOINC/2"], "numeric_value": [None, 7.5]}),
    ...     pl.DataFrame({"code": ["SNOMED/1", "LOINC/2"], "omop_concept_id": [11, 22],
    ...                   "omop_domain": ["Condition", "Measurement"]}), id_offset=0)
    >>> visit_map = pl.DataFrame(schema={"subject_id": pl.Int64, "visit_id": pl.Int64,
    ...                                  "visit_occurrence_id": pl.Int64})
    >>> rows = rows.with_columns(_discharge_used=False)
    >>> tables = event_tables(rows, concepts, visit_map, Counter(), 32817, 10)
    >>> tables["condition_occurrence"].select("condition_occurrence_id", "condition_concept_id").row(0)
    (10, 11)
    >>> tables["measurement"].select("measurement_id", "value_as_number").row(0)
    (11, 7.5)
    """  # noqa: E501
    events = _event_rows(rows, concepts, visit_map, notes)
    tables = {}
    next_id = first_id
    for name in EVENT_TABLES:
        part = events.filter(pl.col("_table") == name).sort("person_id", mc.TIME, mc.CODE, "_row")
        tables[name] = _event_table(EVENT_SPECS[name], part, next_id, type_concept_id, notes)
        next_id += part.height
    return tables


def _event_rows(
    rows: pl.DataFrame, concepts: pl.DataFrame, visit_map: pl.DataFrame, notes: Counter[str]
) -> pl.DataFrame:
    """Clinical rows with their concept, unit and value concepts, visit and target table."""
    kind = pl.col("_kind")
    # Discharge rows that are no visit's discharge (no visit id, or a second one) stay events.
    stray = (kind == KIND_DISCHARGE) & ~pl.col("_discharge_used")
    n_stray = int(rows.select(stray.sum()).item())
    if n_stray:
        notes["DISCHARGE rows that are no visit's discharge (-> observation)"] += n_stray
    events = rows.filter((kind == KIND_EVENT) | stray)
    events = lookup_concept(events, mc.CODE, concepts, "_concept_id")
    events = lookup_concept(events, mc.UNIT, concepts, "_unit_concept_id")
    events = lookup_concept(events, mc.VALUE_CODE, concepts, "_value_concept_id")
    domains = concepts.select(pl.col("code").alias(mc.CODE), pl.col("domain_id").alias("_domain"))
    events = events.join(domains, on=mc.CODE, how="left").join(
        visit_map, on=[mc.SUBJECT_ID, mc.VISIT_ID], how="left", nulls_equal=False
    )
    by_domain = domain_table(pl.col("_domain"))
    by_source = pl.when(pl.col(mc.OMOP_TABLE).is_in(EVENT_TABLES)).then(pl.col(mc.OMOP_TABLE))
    events = events.with_columns(
        event_table(pl.col("_domain"), pl.col(mc.OMOP_TABLE)).alias("_table"),
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
    spec: EventSpec, part: pl.DataFrame, first_id: int, type_concept_id: int, notes: Counter[str]
) -> pl.DataFrame:
    """The rows of one event table, numbered from ``first_id``."""
    time, end = pl.col(mc.TIME), pl.col(mc.END)
    part = with_ids(part, spec.id, first_id)
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
    values, lost = _value_columns(spec.table)
    if spec.table == "drug_exposure":
        n_quantity = int(part.select(pl.col(mc.NUMERIC_VALUE).is_not_null().sum()).item())
        if n_quantity:
            notes["drug numeric values written as quantity"] += n_quantity
    n_lost = int(part.select(lost.sum()).item()) if part.height else 0
    if n_lost:
        notes[f"values with no column in {spec.table} (value not written)"] += n_lost
    return part.select(cols + values)


def _value_columns(table: str) -> tuple[list[pl.Expr], pl.Expr]:
    """The columns ``table`` has for a row's numeric value, text, unit and value code, and an
    expression true where a row has a value none of them takes."""
    value, text = pl.col(mc.NUMERIC_VALUE), pl.col(mc.TEXT_VALUE)
    unit, vcode = pl.col(mc.UNIT), pl.col(mc.VALUE_CODE)
    units = [
        pl.when(unit.is_not_null())
        .then(pl.col("_unit_concept_id").fill_null(0))
        .alias("unit_concept_id"),
        unit.alias("unit_source_value"),
    ]
    has_value = value.is_not_null() | text.is_not_null() | vcode.is_not_null()
    if table in ("measurement", "observation"):
        numbers = [
            value.cast(pl.Float64).alias("value_as_number"),
            pl.col("_value_concept_id").alias("value_as_concept_id"),
            *units,
        ]
        if table == "observation":
            texts = [text.alias("value_as_string"), vcode.alias("value_source_value")]
        else:
            texts = [pl.coalesce(text, vcode).alias("value_source_value")]
        return [*numbers, *texts], pl.lit(False)
    if table == "drug_exposure":
        quantity = [value.cast(pl.Float64).alias("quantity"), unit.alias("dose_unit_source_value")]
        return quantity, text.is_not_null() | vcode.is_not_null()
    if table == "device_exposure":
        return units, has_value
    return [], has_value | unit.is_not_null()
