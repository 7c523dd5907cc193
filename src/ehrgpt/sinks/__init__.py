"""Where events go: a MEDS 0.4 folder or OMOP CDM 5.4 tables (DuckDB, parquet, CSV, PostgreSQL).

Both sinks take chunks of MEDS rows in ehrgpt's event schema
(:data:`ehrgpt.meds_format.columns.EVENT_SCHEMA`), each chunk holding whole subjects, and write
every chunk atomically, so an interrupted run keeps its completed chunks and can resume.
"""

from ehrgpt.sinks.meds import MedsSinkResult, MedsWriter
from ehrgpt.sinks.omop import (
    CDM_TABLES,
    OmopTables,
    OmopWriter,
    OmopWriteSummary,
    code_concepts,
    concept_rows,
    meds_to_omop,
)

__all__ = [
    "CDM_TABLES",
    "MedsSinkResult",
    "MedsWriter",
    "OmopTables",
    "OmopWriteSummary",
    "OmopWriter",
    "code_concepts",
    "concept_rows",
    "meds_to_omop",
]
