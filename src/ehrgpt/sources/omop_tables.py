"""What ehrgpt reads from each OMOP CDM 5.3 / 5.4 table: columns, their types, their roles.

A column list per table, with the OMOP type of each column. ``required`` columns must exist
(a table without them is malformed and skipped with a warning; a malformed ``person`` table
stops the run). Optional columns become NULL when absent. Where CDM 5.3 and 5.4 differ in a
name, both names are listed and the first present wins (``discharged_to_concept_id`` in 5.4,
``discharge_to_concept_id`` in 5.3).

A ``*_datetime`` column whose source holds only a date (a DATE column, as in Eunomia, or text
such as ``2020-01-01``) reads as NULL, so the ``*_date`` column beside it decides the time:
date-only events at 23:59:59 of their day, visit starts at 00:00:00 (see ``omop_to_meds``).
``birth_datetime`` keeps a date-only value (``keep_date_only``): birth is at 00:00:00.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BIGINT = "BIGINT"
DOUBLE = "DOUBLE"
DATE = "DATE"
TIMESTAMP = "TIMESTAMP"
VARCHAR = "VARCHAR"


@dataclass(frozen=True)
class Column:
    """One column ehrgpt reads: its canonical name, OMOP type and accepted source names."""

    name: str
    type: str
    aliases: tuple[str, ...] = ()
    required: bool = False
    #: TIMESTAMP columns only: read a date-only source value as its midnight, not as NULL.
    keep_date_only: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class EventTable:
    """An OMOP table whose rows become clinical events (one MEDS row each)."""

    name: str
    concept: str
    start_date: str
    start_datetime: str
    end_date: str | None = None
    end_datetime: str | None = None
    value_as_number: bool = False
    value_as_concept: bool = False
    unit: bool = False
    value_as_string: bool = False
    extra: tuple[Column, ...] = field(default_factory=tuple)

    def columns(self) -> tuple[Column, ...]:
        cols = [
            Column("person_id", BIGINT, required=True),
            Column(self.concept, BIGINT, required=True),
            Column(self.start_date, DATE, required=True),
            Column(self.start_datetime, TIMESTAMP),
            Column("visit_occurrence_id", BIGINT),
        ]
        if self.end_date:
            cols.append(Column(self.end_date, DATE))
        if self.end_datetime:
            cols.append(Column(self.end_datetime, TIMESTAMP))
        if self.value_as_number:
            cols.append(Column("value_as_number", DOUBLE))
        if self.value_as_concept:
            cols.append(Column("value_as_concept_id", BIGINT))
        if self.unit:
            cols.append(Column("unit_concept_id", BIGINT))
        if self.value_as_string:
            cols.append(Column("value_as_string", VARCHAR))
        return (*cols, *self.extra)


PERSON_COLUMNS = (
    Column("person_id", BIGINT, required=True),
    Column("gender_concept_id", BIGINT),
    Column("year_of_birth", BIGINT, required=True),
    Column("month_of_birth", BIGINT),
    Column("day_of_birth", BIGINT),
    Column("birth_datetime", TIMESTAMP, keep_date_only=True),
    Column("race_concept_id", BIGINT),
    Column("ethnicity_concept_id", BIGINT),
)

VISIT_COLUMNS = (
    Column("visit_occurrence_id", BIGINT, required=True),
    Column("person_id", BIGINT, required=True),
    Column("visit_concept_id", BIGINT, required=True),
    Column("visit_start_date", DATE, required=True),
    Column("visit_start_datetime", TIMESTAMP),
    Column("visit_end_date", DATE),
    Column("visit_end_datetime", TIMESTAMP),
    Column("discharged_to_concept_id", BIGINT, aliases=("discharge_to_concept_id",)),
)

DEATH_COLUMNS = (
    Column("person_id", BIGINT, required=True),
    Column("death_date", DATE, required=True),
    Column("death_datetime", TIMESTAMP),
)

CONCEPT_COLUMNS = (
    Column("concept_id", BIGINT, required=True),
    Column("concept_name", VARCHAR),
    Column("domain_id", VARCHAR),
    Column("vocabulary_id", VARCHAR, required=True),
    Column("concept_code", VARCHAR, required=True),
    # Kept only to copy the real rows into synthetic OMOP output (dates as text: any format).
    Column("concept_class_id", VARCHAR),
    Column("standard_concept", VARCHAR),
    Column("valid_start_date", VARCHAR),
    Column("valid_end_date", VARCHAR),
    Column("invalid_reason", VARCHAR),
)

EVENT_TABLES = (
    EventTable(
        "condition_occurrence",
        "condition_concept_id",
        "condition_start_date",
        "condition_start_datetime",
        "condition_end_date",
        "condition_end_datetime",
    ),
    EventTable(
        "drug_exposure",
        "drug_concept_id",
        "drug_exposure_start_date",
        "drug_exposure_start_datetime",
        "drug_exposure_end_date",
        "drug_exposure_end_datetime",
    ),
    EventTable(
        "procedure_occurrence",
        "procedure_concept_id",
        "procedure_date",
        "procedure_datetime",
        "procedure_end_date",
        "procedure_end_datetime",
    ),
    EventTable(
        "measurement",
        "measurement_concept_id",
        "measurement_date",
        "measurement_datetime",
        value_as_number=True,
        value_as_concept=True,
        unit=True,
    ),
    EventTable(
        "observation",
        "observation_concept_id",
        "observation_date",
        "observation_datetime",
        value_as_number=True,
        value_as_concept=True,
        unit=True,
        value_as_string=True,
    ),
    EventTable(
        "device_exposure",
        "device_concept_id",
        "device_exposure_start_date",
        "device_exposure_start_datetime",
        "device_exposure_end_date",
        "device_exposure_end_datetime",
    ),
)

TABLE_COLUMNS: dict[str, tuple[Column, ...]] = {
    "person": PERSON_COLUMNS,
    "visit_occurrence": VISIT_COLUMNS,
    "death": DEATH_COLUMNS,
    "concept": CONCEPT_COLUMNS,
    **{t.name: t.columns() for t in EVENT_TABLES},
}

#: Every OMOP table ehrgpt reads, in reading order.
OMOP_TABLES: tuple[str, ...] = tuple(TABLE_COLUMNS)
