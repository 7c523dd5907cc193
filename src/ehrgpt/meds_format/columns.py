"""The MEDS 0.4 event table as ehrgpt writes and reads it: core columns, extra columns, codes.

Every ingestion path (OMOP DuckDB / folder / PostgreSQL, or a user's MEDS folder) ends in
MEDS 0.4 shards with the core columns ``subject_id``, ``time``, ``code``, ``numeric_value``,
``text_value`` plus the extra columns below, which MEDS allows and which keep what
CEHR-GPT needs (visit membership, the way back to OMOP).

Extra columns (all nullable):

- ``visit_id`` (int64): the visit an event belongs to. Visit rows carry their own id.
- ``end`` (timestamp[us]): end of a visit (visit rows) or of an event that has one.
- ``omop_table`` (string): where the row came from / goes back to in OMOP
  (``person``, ``visit_occurrence``, ``condition_occurrence``, ..., ``death``).
- ``unit`` (string): the unit code of a numeric value (for example ``UCUM/kg``).
- ``value_code`` (string): a categorical value (OMOP ``value_as_concept_id``) as a code.

Codes:

- clinical concepts: ``{vocabulary_id}/{concept_code}`` from the OMOP concept table, or
  ``OMOP_CONCEPT/{concept_id}`` when the concept table does not hold the concept;
- person attributes (static rows, null time): ``GENDER/{concept_id}``, ``RACE/{concept_id}``,
  ``ETHNICITY/{concept_id}``;
- visits (at visit start, ``end`` = visit end): ``VISIT/{visit_concept_id}``;
- discharge (at visit end, inside the visit): ``DISCHARGE/{discharged_to_concept_id}``;
- birth and death: ``MEDS_BIRTH``, ``MEDS_DEATH``.

>>> visit_code(9201), gender_code(0), is_inpatient_code("VISIT/262")
('VISIT/9201', 'GENDER/UNKNOWN', True)
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

SUBJECT_ID = "subject_id"
TIME = "time"
CODE = "code"
NUMERIC_VALUE = "numeric_value"
TEXT_VALUE = "text_value"
VISIT_ID = "visit_id"
END = "end"
OMOP_TABLE = "omop_table"
UNIT = "unit"
VALUE_CODE = "value_code"

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
GENDER_PREFIX = "GENDER/"
RACE_PREFIX = "RACE/"
ETHNICITY_PREFIX = "ETHNICITY/"
VISIT_PREFIX = "VISIT/"
DISCHARGE_PREFIX = "DISCHARGE/"
UNKNOWN = "UNKNOWN"
FALLBACK_CONCEPT_PREFIX = "OMOP_CONCEPT/"

#: OMOP visit concepts treated as inpatient (day tokens and a discharge token).
INPATIENT_VISIT_CONCEPTS: frozenset[int] = frozenset({9201, 262, 8971, 8920})
#: Discharge to this concept ("Patient died") means death.
DIED_DISCHARGE_CONCEPT = 4216643
#: The time of day of a date-only event, event end, visit end or death (the convention of the
#: field's OMOP ETL, meds_etl): after everything else that day, so a prediction made earlier
#: that day cannot see it. Visit starts and births keep 00:00:00.
END_OF_DAY = dt.time(23, 59, 59)

#: The arrow schema of an ehrgpt MEDS data shard (core columns first, then extras).
EVENT_SCHEMA = pa.schema(
    [
        pa.field(SUBJECT_ID, pa.int64(), nullable=False),
        pa.field(TIME, pa.timestamp("us")),
        pa.field(CODE, pa.string(), nullable=False),
        pa.field(NUMERIC_VALUE, pa.float32()),
        pa.field(TEXT_VALUE, pa.large_string()),
        pa.field(VISIT_ID, pa.int64()),
        pa.field(END, pa.timestamp("us")),
        pa.field(OMOP_TABLE, pa.string()),
        pa.field(UNIT, pa.string()),
        pa.field(VALUE_CODE, pa.string()),
    ]
)
EXTRA_COLUMNS = (VISIT_ID, END, OMOP_TABLE, UNIT, VALUE_CODE)


def _concept_code(prefix: str, concept_id: int | None) -> str:
    return f"{prefix}{UNKNOWN}" if not concept_id else f"{prefix}{int(concept_id)}"


def visit_code(concept_id: int | None) -> str:
    """The MEDS code of a visit type (0 or missing -> ``VISIT/UNKNOWN``)."""
    return _concept_code(VISIT_PREFIX, concept_id)


def discharge_code(concept_id: int | None) -> str:
    """The MEDS code of a discharge destination (0 or missing -> ``DISCHARGE/UNKNOWN``)."""
    return _concept_code(DISCHARGE_PREFIX, concept_id)


def gender_code(concept_id: int | None) -> str:
    """The MEDS code of a gender concept (0 or missing -> ``GENDER/UNKNOWN``)."""
    return _concept_code(GENDER_PREFIX, concept_id)


def race_code(concept_id: int | None) -> str:
    """The MEDS code of a race concept (0 or missing -> ``RACE/UNKNOWN``)."""
    return _concept_code(RACE_PREFIX, concept_id)


def is_inpatient_code(code: str) -> bool:
    """Whether a visit code is one of the inpatient-like visit types.

    >>> is_inpatient_code("VISIT/9202"), is_inpatient_code("VISIT/UNKNOWN")
    (False, False)
    """
    if not code.startswith(VISIT_PREFIX):
        return False
    rest = code[len(VISIT_PREFIX) :]
    return rest.isdigit() and int(rest) in INPATIENT_VISIT_CONCEPTS


INPATIENT_VISIT_CODES: frozenset[str] = frozenset(visit_code(c) for c in INPATIENT_VISIT_CONCEPTS)
