"""Where clinical data comes from: OMOP CDM (DuckDB, folders, PostgreSQL) and MEDS."""
