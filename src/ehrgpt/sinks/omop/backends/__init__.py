"""The targets an OMOP writer appends to: a DuckDB file (:mod:`.duckdb`), a folder of parquet
or CSV files (:mod:`.folder`), a PostgreSQL schema (:mod:`.postgres`), all behind the interface
of :mod:`.base`."""
