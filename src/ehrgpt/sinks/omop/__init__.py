"""MEDS rows -> OMOP CDM 5.4 tables, and a writer that appends them to DuckDB, files or PostgreSQL.

This module gathers the public names of the OMOP sink, which lives in small modules:

- :mod:`~ehrgpt.sinks.omop.schema`: the CDM 5.4 tables (columns, types), :func:`conform`;
- :mod:`~ehrgpt.sinks.omop.concepts`: the OMOP concept of each code, ``concept`` rows;
- :mod:`~ehrgpt.sinks.omop.rows`, :mod:`~ehrgpt.sinks.omop.person`,
  :mod:`~ehrgpt.sinks.omop.visits`, :mod:`~ehrgpt.sinks.omop.events`: the tables of a chunk;
- :mod:`~ehrgpt.sinks.omop.convert`: :func:`meds_to_omop`, which puts them together;
- :mod:`~ehrgpt.sinks.omop.writer`: :class:`OmopWriter`, over the targets in
  :mod:`~ehrgpt.sinks.omop.backends.base`, :mod:`~ehrgpt.sinks.omop.backends.duckdb`,
  :mod:`~ehrgpt.sinks.omop.backends.folder` and :mod:`~ehrgpt.sinks.omop.backends.postgres`.

:func:`meds_to_omop` turns a chunk of MEDS rows (ehrgpt's event schema, whole subjects) into
the CDM 5.4 tables ``person``, ``observation_period``, ``visit_occurrence``,
``condition_occurrence``, ``drug_exposure``, ``procedure_occurrence``, ``device_exposure``,
``measurement``, ``observation`` and ``death``, every column of each table present with its
CDM type. Each clinical concept goes to the table of its domain (``omop_domain`` of the codes
metadata, or ``domain_id`` of a concept table); a concept of no known clinical domain goes to
``observation`` and is counted. No row is dropped (the reference drops Observation and Device).

:class:`OmopWriter` appends converted chunks to a DuckDB file, a folder of parquet or CSV files
(``table/part-000.parquet``), or a PostgreSQL schema (``COPY FROM STDIN``), one atomic unit per
chunk. Into a target without a vocabulary it copies the real ``concept`` rows of the source
(never made up); a target whose ``concept`` table holds rows gets none.

Identifiers. ``person_id = subject_id + id_offset``; visit, event and observation-period ids
run from ``first_id`` (default ``id_offset``; one sequence shared by all tables, continued
across chunks and above the largest id already in the target). No id is 0 (OHDSI tools read
0 as "none"). Synthetic persons must never share an id with real ones: pass an ``id_offset``
above the real maximum person id. The writer reads the types of the target's id columns
(the official CDM 5.4 DDL declares them 32-bit ``integer``; ehrgpt creates BIGINT ones) and
refuses, before writing, ids they cannot hold (:meth:`OmopWriter.check_ids`), and person ids
that already exist in the target.
"""

from __future__ import annotations

from ehrgpt.sinks.omop.concepts import code_concepts, concept_rows, domain_table
from ehrgpt.sinks.omop.convert import OmopTables, meds_to_omop
from ehrgpt.sinks.omop.schema import (
    CDM_TABLES,
    EHR_TYPE_CONCEPT,
    EVENT_TABLES,
    INT32_MAX,
    SYNTHETIC_ID_OFFSET,
    CdmColumn,
    conform,
    polars_type,
)
from ehrgpt.sinks.omop.writer import OmopWriter, OmopWriteSummary

__all__ = [
    "CDM_TABLES",
    "EHR_TYPE_CONCEPT",
    "EVENT_TABLES",
    "INT32_MAX",
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
    "polars_type",
]
