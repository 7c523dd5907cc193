'''Quoting for SQL text built by ehrgpt (identifiers and string literals).

>>> sql_str("it's")
"'it''s'"
>>> sql_ident('my "table"')
'"my ""table"""'
'''

from __future__ import annotations


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'
