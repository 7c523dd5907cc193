"""MEDS rows -> the OMOP CDM 5.4 tables of one chunk (:func:`meds_to_omop`).

The tables are ``person``, ``observation_period``, ``visit_occurrence``, the clinical event
tables (``condition_occurrence``, ``drug_exposure``, ``procedure_occurrence``,
``device_exposure``, ``measurement``, ``observation``) and ``death``, every column of each
present with its CDM type. Each clinical concept goes to the table of its domain; a concept of
no known clinical domain goes to ``observation`` and is counted. No row is dropped.

Identifiers. ``person_id = subject_id + id_offset``; visit, event and observation-period ids
run from ``id_offset`` (one sequence shared by all tables, continued across chunks through
``first_id``). No id is 0 (OHDSI tools read 0 as "none"). Synthetic persons must never share
an id with real ones: pass an ``id_offset`` above the real maximum person id that still fits
the target's id columns (32-bit ``integer`` in the official CDM 5.4 DDL,
:data:`~ehrgpt.sinks.omop.schema.INT32_MAX`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import polars as pl

from ehrgpt.errors import SinkError
from ehrgpt.sinks.omop.events import event_tables
from ehrgpt.sinks.omop.person import death_table, observation_period_table, person_table
from ehrgpt.sinks.omop.rows import prepare_rows
from ehrgpt.sinks.omop.schema import EHR_TYPE_CONCEPT, EVENT_TABLES, conform
from ehrgpt.sinks.omop.visits import visit_table

__all__ = ["OmopTables", "meds_to_omop"]

#: The order of the tables in :class:`OmopTables`.
TABLE_ORDER = ("person", "observation_period", "visit_occurrence", *EVENT_TABLES, "death")


class OmopTables(dict[str, pl.DataFrame]):
    """The CDM tables of one chunk (table name -> frame), with ``next_id`` (the first id a
    following chunk may use) and ``notes`` (counts of what was inferred or rerouted)."""

    def __init__(
        self, tables: Mapping[str, pl.DataFrame], *, next_id: int, notes: Counter[str]
    ) -> None:
        super().__init__(tables)
        self.next_id = next_id
        self.notes = notes


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
    ``id_offset``, at least 1); the result's ``next_id`` is where the next chunk continues.

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
    rows, concepts = prepare_rows(frame, codes, id_offset=id_offset, concept_table=concept_table)
    notes: Counter[str] = Counter()
    next_id = max(id_offset, 1) if first_id is None else int(first_id)
    if next_id < 1:
        raise SinkError(f"Record ids start at 1 (OHDSI tools read 0 as none); got {next_id}.")
    person, rows = person_table(rows, concepts, notes)
    visits, visit_map, rows = visit_table(rows, concepts, notes, type_concept_id, next_id)
    next_id += visits.height
    tables = {"person": person, "visit_occurrence": visits}
    tables |= event_tables(rows, concepts, visit_map, notes, type_concept_id, next_id)
    next_id += sum(tables[name].height for name in EVENT_TABLES)
    tables["death"] = death_table(rows, concepts, notes, type_concept_id)
    period = observation_period_table(tables, type_concept_id, next_id)
    next_id += period.height
    tables["observation_period"] = period
    out = {name: conform(name, tables[name]) for name in TABLE_ORDER}
    return OmopTables(out, next_id=next_id, notes=+notes)
