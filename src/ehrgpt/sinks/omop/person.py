"""The person-level CDM tables of a chunk: ``person``, ``death`` and ``observation_period``.

Each function takes the rows of :func:`~ehrgpt.sinks.omop.rows.prepare_rows` and counts in
``notes`` what it had to infer or leave out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import polars as pl

from ehrgpt.meds_format import columns as mc
from ehrgpt.sinks.omop.concepts import lookup_concept
from ehrgpt.sinks.omop.rows import KIND_ATTR, KIND_BIRTH, KIND_DEATH, KIND_DISCHARGE, with_ids
from ehrgpt.sinks.omop.schema import EVENT_SPECS, EVENT_TABLES

__all__ = ["death_table", "observation_period_table", "person_table"]


def person_table(
    rows: pl.DataFrame, concepts: pl.DataFrame, notes: Counter[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(person, rows): one person per subject, and the rows left to convert, with rows without
    a time dated at birth (else at the first event) and persons without any date removed.

    Gender, race and ethnicity concepts come from ``GENDER/``, ``RACE/``, ``ETHNICITY/`` rows
    (0 when absent or unmapped); the year of birth from ``MEDS_BIRTH``, else the first event.

    >>> import datetime as dt
    >>> from ehrgpt.sinks.omop.rows import prepare_rows
    >>> rows, concepts = prepare_rows(pl.DataFrame({"subject_id": [1, 1, 1],
    ...     "time": [None, dt.datetime(1950, 3, 4), None],
    ...     "code": ["GENDER/8532", "MEDS_BIRTH", "SNOMED/1"]}), pl.DataFrame({"code": ["X"]}),
    ...     id_offset=100)
    >>> notes = Counter()
    >>> person, rows = person_table(rows, concepts, notes)
    >>> person.select("person_id", "gender_concept_id", "year_of_birth", "month_of_birth").row(0)
    (101, 8532, 1950, 3)
    >>> rows["time"].to_list()[2]
    datetime.datetime(1950, 3, 4, 0, 0)
    >>> list(+notes)
    ['rows without a time (dated at birth, else at the first event)']
    """
    kind, code, time = pl.col("_kind"), pl.col(mc.CODE), pl.col(mc.TIME)

    def attr(prefix: str) -> pl.Expr:
        return code.filter(code.str.starts_with(prefix)).min()

    people = rows.group_by(mc.SUBJECT_ID, maintain_order=True).agg(
        pl.col("person_id").first(),
        time.filter(kind == KIND_BIRTH).min().alias("birth"),
        time.filter((kind != KIND_BIRTH) & time.is_not_null()).min().alias("first_time"),
        attr(mc.GENDER_PREFIX).alias("gender"),
        attr(mc.RACE_PREFIX).alias("race"),
        attr(mc.ETHNICITY_PREFIX).alias("ethnicity"),
        code.filter(code.str.starts_with(mc.GENDER_PREFIX)).n_unique().alias("n_gender"),
    )
    if (people["n_gender"] > 1).any():
        notes["persons with several genders (the first code kept)"] += int(
            (people["n_gender"] > 1).sum()
        )
    rows, people = _drop_undated_persons(rows, people, notes)
    notes["persons without MEDS_BIRTH (year of birth from the first event)"] += int(
        people["birth"].null_count()
    )
    rows = _date_static_rows(rows, people, notes)
    for col in ("gender", "race", "ethnicity"):
        people = lookup_concept(people, col, concepts, f"{col}_concept_id")
    born = pl.col("birth")
    year = pl.coalesce(born, "first_time").dt.year()
    person = people.select(
        "person_id",
        pl.col("gender_concept_id").fill_null(0),
        year.alias("year_of_birth"),
        born.dt.month().alias("month_of_birth"),
        born.dt.day().alias("day_of_birth"),
        born.alias("birth_datetime"),
        pl.col("race_concept_id").fill_null(0),
        pl.col("ethnicity_concept_id").fill_null(0),
        pl.col(mc.SUBJECT_ID).cast(pl.String).alias("person_source_value"),
        pl.col("gender").alias("gender_source_value"),
        pl.col("race").alias("race_source_value"),
        pl.col("ethnicity").alias("ethnicity_source_value"),
    ).sort("person_id")
    return person, rows


def _drop_undated_persons(
    rows: pl.DataFrame, people: pl.DataFrame, notes: Counter[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows, people) without the persons that have neither a birth nor any dated row."""
    undated = people.filter(pl.col("birth").is_null() & pl.col("first_time").is_null())
    if undated.height:
        gone = rows.filter(pl.col(mc.SUBJECT_ID).is_in(undated[mc.SUBJECT_ID].implode()))
        notes["persons without any date (not written)"] += undated.height
        notes["rows of persons without any date (not written)"] += gone.height
        rows = rows.filter(~pl.col(mc.SUBJECT_ID).is_in(undated[mc.SUBJECT_ID].implode()))
        people = people.filter(pl.col("birth").is_not_null() | pl.col("first_time").is_not_null())
    return rows, people


def _date_static_rows(
    rows: pl.DataFrame, people: pl.DataFrame, notes: Counter[str]
) -> pl.DataFrame:
    """Rows without a time (static codes other than person attributes) dated at birth, else at
    the person's first event."""
    kind, time = pl.col("_kind"), pl.col(mc.TIME)
    anchor = people.select(mc.SUBJECT_ID, pl.coalesce("birth", "first_time").alias("_anchor"))
    undated_rows = (time.is_null()) & (kind != KIND_ATTR) & (kind != KIND_DEATH)
    n_undated = int(rows.select(undated_rows.sum()).item())
    if n_undated:
        notes["rows without a time (dated at birth, else at the first event)"] += n_undated
        rows = (
            rows.join(anchor, on=mc.SUBJECT_ID, how="left")
            .with_columns(pl.when(undated_rows).then("_anchor").otherwise(time).alias(mc.TIME))
            .drop("_anchor")
        )
    return rows


def death_table(
    rows: pl.DataFrame, concepts: pl.DataFrame, notes: Counter[str], type_concept_id: int
) -> pl.DataFrame:
    """One death per person: its first timed ``MEDS_DEATH``, else its first discharge to
    4216643 "Patient died".

    >>> import datetime as dt
    >>> from ehrgpt.sinks.omop.rows import prepare_rows
    >>> rows, concepts = prepare_rows(pl.DataFrame({"subject_id": [1, 2],
    ...     "time": [dt.datetime(2020, 1, 2), dt.datetime(2021, 5, 6)],
    ...     "code": ["MEDS_DEATH", "DISCHARGE/4216643"]}), pl.DataFrame({"code": ["X"]}),
    ...     id_offset=0)
    >>> death_table(rows, concepts, Counter(), 32817).select("person_id", "death_date").rows()
    [(1, datetime.date(2020, 1, 2)), (2, datetime.date(2021, 5, 6))]
    """
    kind, time = pl.col("_kind"), pl.col(mc.TIME)
    meds_death = rows.filter((kind == KIND_DEATH) & time.is_not_null())
    n_untimed = rows.filter((kind == KIND_DEATH) & time.is_null()).height
    if n_untimed:
        notes["MEDS_DEATH rows without a time (not written)"] += n_untimed
    died = lookup_concept(rows.filter(kind == KIND_DISCHARGE), mc.CODE, concepts, "_cid").filter(
        pl.col("_cid") == mc.DIED_DISCHARGE_CONCEPT
    )
    deaths = (
        pl.concat(
            [
                meds_death.select("person_id", time, pl.lit(0).alias("_source")),
                died.select("person_id", time, pl.lit(1).alias("_source")),
            ]
        )
        .sort("person_id", "_source", time)
        .group_by("person_id", maintain_order=True)
        .agg(time.first(), pl.col("_source").first(), (pl.col("_source") == 0).sum().alias("_n"))
    )
    notes["deaths from a discharge to 4216643 (no MEDS_DEATH)"] += int(
        (deaths["_source"] == 1).sum()
    )
    notes["persons with several MEDS_DEATH rows (the first kept)"] += int((deaths["_n"] > 1).sum())
    return deaths.select(
        "person_id",
        time.dt.date().alias("death_date"),
        time.alias("death_datetime"),
        pl.lit(type_concept_id).alias("death_type_concept_id"),
    )


def observation_period_table(
    tables: Mapping[str, pl.DataFrame], type_concept_id: int, first_id: int
) -> pl.DataFrame:
    """One period per person from the first to the last date in any of its rows (birth only
    when the person has no other date)."""
    dates = []
    visits = tables["visit_occurrence"]
    dates.append(visits.select("person_id", pl.col("visit_start_date").alias("d")))
    dates.append(visits.select("person_id", pl.col("visit_end_date").alias("d")))
    for name in EVENT_TABLES:
        spec, frame = EVENT_SPECS[name], tables[name]
        dates.append(frame.select("person_id", pl.col(spec.start_date).alias("d")))
        if spec.end_date:
            dates.append(frame.select("person_id", pl.col(spec.end_date).alias("d")))
    dates.append(tables["death"].select("person_id", pl.col("death_date").alias("d")))
    span = (
        pl.concat(dates)
        .drop_nulls()
        .group_by("person_id")
        .agg(pl.col("d").min().alias("start"), pl.col("d").max().alias("end"))
    )
    birth = tables["person"].select("person_id", pl.col("birth_datetime").dt.date().alias("_birth"))
    periods = (
        birth.join(span, on="person_id", how="left")
        .with_columns(
            pl.coalesce("start", "_birth").alias("start"),
            pl.coalesce("end", "_birth").alias("end"),
        )
        .filter(pl.col("start").is_not_null())
        .sort("person_id")
    )
    periods = with_ids(periods, "observation_period_id", first_id)
    return periods.select(
        "observation_period_id",
        "person_id",
        pl.col("start").alias("observation_period_start_date"),
        pl.col("end").alias("observation_period_end_date"),
        pl.lit(type_concept_id).alias("period_type_concept_id"),
    )
