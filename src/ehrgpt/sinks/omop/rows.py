"""MEDS rows made ready for the OMOP converter: checked, typed, classified and concept-mapped.

:func:`prepare_rows` gives every row its ``person_id``, a row number ``_row`` and a ``_kind``
(person attribute, birth, death, visit, discharge or clinical event), and maps every code,
unit and categorical value the rows use to its OMOP concept. :func:`with_ids` numbers the
rows of a CDM table from the shared id sequence.
"""

from __future__ import annotations

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.meds_format import columns as mc
from ehrgpt.sinks.meds import as_event_frame, used_codes
from ehrgpt.sinks.omop.concepts import code_concepts

__all__ = [
    "KIND_ATTR",
    "KIND_BIRTH",
    "KIND_DEATH",
    "KIND_DISCHARGE",
    "KIND_EVENT",
    "KIND_VISIT",
    "prepare_rows",
    "row_kind",
    "with_ids",
]

KIND_ATTR, KIND_BIRTH, KIND_DEATH = "attr", "birth", "death"
KIND_VISIT, KIND_DISCHARGE, KIND_EVENT = "visit", "discharge", "event"


def row_kind(code: pl.Expr) -> pl.Expr:
    """``_kind``: what a row with this code is to the converter.

    >>> codes = ["GENDER/8532", "MEDS_BIRTH", "VISIT/9201", "DISCHARGE/1", "SNOMED/1"]
    >>> pl.DataFrame({"code": codes}).select(row_kind(pl.col("code")))["_kind"].to_list()
    ['attr', 'birth', 'visit', 'discharge', 'event']
    """
    return (
        pl.when(code.str.starts_with(mc.GENDER_PREFIX))
        .then(pl.lit(KIND_ATTR))
        .when(code.str.starts_with(mc.RACE_PREFIX) | code.str.starts_with(mc.ETHNICITY_PREFIX))
        .then(pl.lit(KIND_ATTR))
        .when(code == mc.BIRTH_CODE)
        .then(pl.lit(KIND_BIRTH))
        .when(code == mc.DEATH_CODE)
        .then(pl.lit(KIND_DEATH))
        .when(code.str.starts_with(mc.VISIT_PREFIX))
        .then(pl.lit(KIND_VISIT))
        .when(code.str.starts_with(mc.DISCHARGE_PREFIX))
        .then(pl.lit(KIND_DISCHARGE))
        .otherwise(pl.lit(KIND_EVENT))
        .alias("_kind")
    )


def with_ids(frame: pl.DataFrame, name: str, first: int) -> pl.DataFrame:
    """``frame`` with the column ``name`` numbering its rows from ``first``.

    >>> with_ids(pl.DataFrame({"x": ["a", "b"]}), "id", 10)["id"].to_list()
    [10, 11]
    """
    return frame.with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + first).alias(name))


def prepare_rows(
    frame: pl.DataFrame,
    codes: pl.DataFrame,
    *,
    id_offset: int,
    concept_table: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows, concepts): the MEDS rows in the event schema with ``_kind``, ``person_id`` and
    ``_row`` added, and the :func:`~ehrgpt.sinks.omop.concepts.code_concepts` of every code,
    unit and categorical value they use.

    >>> rows, concepts = prepare_rows(
    ...     pl.DataFrame({"subject_id": [3], "time": [None], "code": ["GENDER/8507"]}),
    ...     pl.DataFrame({"code": ["X/1"]}), id_offset=100)
    >>> rows.select("person_id", "_kind", "_row").row(0), concepts["concept_id"].to_list()
    ((103, 'attr', 0), [8507])
    """
    if id_offset < 0:
        raise SinkError(f"id_offset must be 0 or more (got {id_offset}).")
    rows = as_event_frame(frame)
    if rows[mc.SUBJECT_ID].null_count() or (rows[mc.SUBJECT_ID] + id_offset < 1).any():
        raise SinkError(
            "MEDS rows given to the OMOP sink need subject_id + id_offset of 1 or more "
            "(person_id = subject_id + id_offset; OHDSI tools read 0 as none)."
        )
    used = used_codes(rows.lazy()).collect()
    used = used.join(codes.unique("code", keep="first"), on="code", how="left")
    concepts = code_concepts(used, concept_table)
    rows = rows.with_columns(
        row_kind(pl.col(mc.CODE)),
        (pl.col(mc.SUBJECT_ID) + id_offset).alias("person_id"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
    )
    return rows, concepts
