"""OMOP concepts of MEDS codes: which concept and domain each code maps to, and ``concept`` rows.

A code's concept comes from the codes metadata (``omop_concept_id``, ``omop_domain``, ...), from
the code itself (``GENDER/8532``, ``OMOP_CONCEPT/123``) or from an OMOP concept table; its
domain picks the clinical event table it goes to (:func:`domain_table`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.sinks.meds import column_or_null
from ehrgpt.sinks.omop.schema import CDM_TABLES, conform, polars_type

__all__ = [
    "code_concepts",
    "concept_ids",
    "concept_rows",
    "domain_table",
    "lookup_concept",
]

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
    code = pl.col("code")
    structure = code.str.starts_with(_STRUCTURE_PREFIXES[0])
    for prefix in _STRUCTURE_PREFIXES[1:]:
        structure = structure | code.str.starts_with(prefix)
    tail_id = code.str.split("/").list.last().cast(pl.Int64, strict=False)
    out = codes.select(
        code.cast(pl.String),
        pl.coalesce(
            column_or_null(codes, "omop_concept_id", pl.Int64()), pl.when(structure).then(tail_id)
        ).alias("concept_id"),
        column_or_null(codes, "omop_domain", pl.String()).alias("domain_id"),
        pl.coalesce(
            column_or_null(codes, "omop_vocabulary", pl.String()),
            pl.when(~structure).then(code.str.extract(r"^([^/]+)/", 1)),
        ).alias("vocabulary_id"),
        pl.when(~structure).then(code.str.extract(r"^[^/]+/(.+)$", 1)).alias("concept_code"),
        column_or_null(codes, "description", pl.String()).alias("concept_name"),
    ).unique("code", keep="first", maintain_order=True)
    if concept_table is not None and not concept_table.is_empty():
        out = _from_concept_table(out, concept_table)
    return out


def _from_concept_table(out: pl.DataFrame, concept_table: pl.DataFrame) -> pl.DataFrame:
    """Fill the concept ids ``out`` lacks by vocabulary and code, then domains and names by id."""
    ct = concept_table.select(
        pl.col("concept_id").cast(pl.Int64),
        pl.col("vocabulary_id").cast(pl.String),
        pl.col("concept_code").cast(pl.String),
        column_or_null(concept_table, "domain_id", pl.String()).alias("_domain"),
        column_or_null(concept_table, "concept_name", pl.String()).alias("_name"),
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
    return (
        out.drop("_cid")
        .join(by_id, on="concept_id", how="left")
        .with_columns(
            pl.coalesce("domain_id", "_domain").alias("domain_id"),
            pl.coalesce("concept_name", "_name").alias("concept_name"),
        )
        .drop("_domain", "_name")
    )


def concept_rows(
    concept_ids: Iterable[int], concept_table: pl.DataFrame | None
) -> tuple[pl.DataFrame, int]:
    """(rows, n_incomplete): the real CDM ``concept`` rows of ``concept_ids`` found in
    ``concept_table`` (a source's vocabulary), and how many of them lack a column the CDM
    declares NOT NULL (those are left out). No row is ever made up: ids the table lacks get none.

    >>> import datetime as dt
    >>> table = pl.DataFrame({"concept_id": [11, 12], "concept_name": ["Flu", None],
    ...     "domain_id": ["Condition"] * 2, "vocabulary_id": ["SNOMED"] * 2,
    ...     "concept_class_id": ["Clinical Finding"] * 2, "standard_concept": ["S"] * 2,
    ...     "concept_code": ["1", "2"], "valid_start_date": [dt.date(1970, 1, 1)] * 2,
    ...     "valid_end_date": [dt.date(2099, 12, 31)] * 2})
    >>> rows, n_incomplete = concept_rows([11, 12, 8532], table)
    >>> rows.select("concept_id", "concept_class_id", "standard_concept").rows(), n_incomplete
    ([(11, 'Clinical Finding', 'S')], 1)
    """
    ids = sorted({int(i) for i in concept_ids if i})
    empty = pl.DataFrame(schema={c.name: polars_type(c.type) for c in CDM_TABLES["concept"]})
    if concept_table is None or not ids:
        return empty, 0
    have = concept_table.filter(pl.col("concept_id").cast(pl.Int64).is_in(ids)).unique(
        "concept_id", keep="first"
    )
    typed = have.select(
        column_or_null(have, c.name, polars_type(c.type)) for c in CDM_TABLES["concept"]
    )
    required = [c.name for c in CDM_TABLES["concept"] if c.required]
    complete = typed.drop_nulls(required)
    return conform("concept", complete).sort("concept_id"), typed.height - complete.height


def lookup_concept(frame: pl.DataFrame, column: str, ids: pl.DataFrame, alias: str) -> pl.DataFrame:
    """Add ``alias``: the concept id of the code in ``column`` (null when unmapped).

    >>> ids = pl.DataFrame({"code": ["SNOMED/1"], "concept_id": [11]})
    >>> rows = pl.DataFrame({"code": ["SNOMED/1", "X/2"]})
    >>> lookup_concept(rows, "code", ids, "cid")["cid"].to_list()
    [11, None]
    """
    table = ids.select(pl.col("code").alias(column), pl.col("concept_id").alias(alias))
    return frame.join(table, on=column, how="left", nulls_equal=False)


def concept_ids(tables: Mapping[str, pl.DataFrame]) -> set[int]:
    """Every non-zero concept id in any ``*concept_id`` column of the tables.

    >>> concept_ids({"t": pl.DataFrame({"a_concept_id": [0, 5, None], "x": [7, 8, 9]})})
    {5}
    """
    ids: set[int] = set()
    for frame in tables.values():
        for col in frame.columns:
            if col.endswith("concept_id"):
                ids.update(int(v) for v in frame[col].drop_nulls().unique().to_list() if v)
    return ids
