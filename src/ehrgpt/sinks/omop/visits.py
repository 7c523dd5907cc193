"""The ``visit_occurrence`` table of a chunk, and the map from MEDS visit ids to its ids.

A visit is a ``VISIT/`` row; it lasts from its time to its ``end``, else its discharge, else
its last event. Rows that name a visit without a ``VISIT/`` row get a visit of concept 0
spanning them.
"""

from __future__ import annotations

from collections import Counter

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.sinks.omop.concepts import lookup_concept
from ehrgpt.sinks.omop.rows import KIND_DISCHARGE, KIND_EVENT, KIND_VISIT, with_ids

__all__ = ["visit_table"]


def visit_table(
    rows: pl.DataFrame,
    concepts: pl.DataFrame,
    notes: Counter[str],
    type_concept_id: int,
    first_id: int,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """visit_occurrence rows, the map (subject_id, visit_id) -> visit_occurrence_id, and the rows
    with ``_discharge_used`` marking the discharge rows that became a visit's discharge.

    >>> import datetime as dt
    >>> from ehrgpt.sinks.omop.rows import prepare_rows
    >>> rows, concepts = prepare_rows(pl.DataFrame({"subject_id": [1, 1, 1],
    ...     "time": [dt.datetime(2020, 1, 1), dt.datetime(2020, 1, 2), dt.datetime(2020, 1, 3)],
    ...     "code": ["VISIT/9201", "SNOMED/1", "DISCHARGE/8536"], "visit_id": [7, 7, 7]}),
    ...     pl.DataFrame({"code": ["X"]}), id_offset=0)
    >>> table, visit_map, rows = visit_table(rows, concepts, Counter(), 32817, 50)
    >>> table.select("visit_occurrence_id", "visit_concept_id", "visit_end_date",
    ...              "discharged_to_concept_id").row(0)
    (50, 9201, datetime.date(2020, 1, 3), 8536)
    >>> visit_map.rows(), rows["_discharge_used"].to_list()
    ([(1, 7, 50)], [False, False, True])
    """
    key = [mc.SUBJECT_ID, mc.VISIT_ID]
    kind, vid, time = pl.col("_kind"), pl.col(mc.VISIT_ID), pl.col(mc.TIME)
    visit_rows = rows.filter(kind == KIND_VISIT).sort(time, "_row")
    keyed = visit_rows.filter(vid.is_not_null()).unique(key, keep="first", maintain_order=True)
    notes["VISIT rows repeating a visit id (merged)"] += (
        visit_rows.filter(vid.is_not_null()).height - keyed.height
    )
    unkeyed = visit_rows.filter(vid.is_null())
    members = rows.filter(kind.is_in([KIND_EVENT, KIND_DISCHARGE]) & vid.is_not_null())
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
        rows.filter((kind == KIND_DISCHARGE) & vid.is_not_null())
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
    visits = with_ids(visits, "visit_occurrence_id", first_id)
    visits = lookup_concept(visits, mc.CODE, concepts, "visit_concept_id")
    visits = lookup_concept(visits, "_discharge", concepts, "discharged_to_concept_id")
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
