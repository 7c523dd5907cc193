"""Errors that reach the user as one clear sentence (the CLI prints them without a traceback)."""

from __future__ import annotations


class EhrgptError(Exception):
    """A problem the user can fix: the message names the file, table, column or row."""


class SourceError(EhrgptError):
    """The input data (OMOP tables, MEDS folder, database URL) cannot be used as given."""


class OutputExistsError(EhrgptError):
    """The output folder exists and ``--overwrite`` was not given."""


class SinkError(EhrgptError):
    """Events cannot be written as asked (MEDS folder, OMOP file, folder or database)."""
