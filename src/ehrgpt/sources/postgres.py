"""OMOP CDM tables from PostgreSQL, the database most OMOP installations live in.

Three entry points:

* :func:`parse_postgres_url` turns ``postgresql://user:pw@host:port/db?schema=cdm`` into a
  psycopg connection string, the schema to read, and a printable URL with the password masked.
* :func:`export_omop_tables` streams the requested OMOP tables out of the server with
  ``COPY ... TO STDOUT`` into one CSV file per table (lower-case file and column names), so the
  rest of the ingestion reads PostgreSQL exactly like a folder of CSV exports. Tables are found
  case-insensitively (real installations use ``person`` or ``PERSON``) and are never held in
  memory whole.
The tests load Eunomia into a throwaway server with ``tests/helpers/postgres_loader.py``.

Every problem the user can fix (server down, unknown host, wrong password, missing database or
schema) is raised as :class:`ehrgpt.errors.SourceError` with one sentence that names the URL
(password masked) and what to do.

Credentials: the password may be in the URL (``user:pw@`` or ``?password=``), or come the
standard libpq ways, which work because nothing here asks for one: ``PGPASSWORD``, the
password file (``~/.pgpass`` or ``PGPASSFILE``), a service file entry (``?service=NAME``,
``PGSERVICE``). No message, log or file of ehrgpt shows it: URLs are shown masked
(:func:`ehrgpt.util.urls.mask_url`) and driver messages pass through
:func:`ehrgpt.util.urls.mask_secrets`.

Times: every session reads ``timestamptz`` values in UTC (``SET TIME ZONE 'UTC'``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ehrgpt.errors import SourceError
from ehrgpt.util.atomic import atomic_path
from ehrgpt.util.urls import mask_secrets, mask_url

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_OMOP_TABLES",
    "PostgresTarget",
    "connect",
    "export_omop_tables",
    "parse_postgres_url",
]

#: Seconds psycopg waits for a server before giving up (a URL to a dead host fails fast).
CONNECT_TIMEOUT_S = 5

#: The OMOP tables ehrgpt reads (docs/method.md section 1), loaded by default into PostgreSQL.
DEFAULT_OMOP_TABLES: tuple[str, ...] = (
    "person",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "device_exposure",
    "death",
    "concept",
    "observation_period",
)

_SCHEMES = ("postgresql", "postgres")
_SECRET_PARAMS = frozenset({"password", "sslpassword"})
_COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PostgresTarget:
    """Where to read OMOP tables from, parsed from a ``postgresql://`` URL.

    ``conninfo`` holds the password (if any) and is therefore left out of ``repr``;
    ``masked_url`` is safe to print.
    """

    conninfo: str = field(repr=False)
    schema: str
    masked_url: str
    host: str | None
    port: int | None
    dbname: str | None
    user: str | None
    url: str = field(default="", repr=False)

    def safe(self, text: str) -> str:
        """``text`` (a driver message) with this URL's credentials masked."""
        return mask_secrets(text, self.url)


def parse_postgres_url(url: str) -> PostgresTarget:
    """Parse a ``postgresql://`` (or ``postgres://``) URL into a :class:`PostgresTarget`.

    The ``schema`` query parameter names the OMOP schema (default ``public``); every other
    query parameter (``sslmode``, ``application_name``, ...) is passed to libpq unchanged.
    A ``connect_timeout`` of :data:`CONNECT_TIMEOUT_S` seconds is set unless the URL gives one.

    >>> t = parse_postgres_url("postgresql://ann:pw@localhost:5433/omop?schema=cdm")
    >>> (t.host, t.port, t.dbname, t.user, t.schema)
    ('localhost', 5433, 'omop', 'ann', 'cdm')
    >>> t.masked_url
    'postgresql://ann:***@localhost:5433/omop?schema=cdm'
    >>> parse_postgres_url("postgres://h/db").schema
    'public'
    """
    from psycopg.conninfo import make_conninfo

    masked = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SourceError(
            f"Cannot read the PostgreSQL URL {masked}: {exc}; write it as "
            "postgresql://user:password@host:port/database?schema=cdm."
        ) from None
    if parts.scheme.lower() not in _SCHEMES:
        raise SourceError(
            f"Cannot read the PostgreSQL URL {masked}: it must start with postgresql://, e.g. "
            "postgresql://user:password@host:5432/database?schema=cdm."
        )
    params: dict[str, Any] = {}
    schema = "public"
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            schema = value or "public"
        else:
            params[key] = value
    host = unquote(parts.hostname) if parts.hostname else None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    dbname = unquote(parts.path.lstrip("/")) or None
    for key, value in (("host", host), ("port", port), ("dbname", dbname), ("user", user)):
        if value is not None:
            params.setdefault(key, value)
    if password is not None:
        params.setdefault("password", password)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    try:
        conninfo = make_conninfo("", **params)
    except Exception as exc:  # psycopg.ProgrammingError on unknown parameters
        raise SourceError(
            f"Cannot read the PostgreSQL URL {masked}: {mask_secrets(_first_line(exc), url)}; "
            "remove or fix the "
            "query parameters (only schema= and libpq options are understood)."
        ) from None
    return PostgresTarget(
        conninfo=conninfo,
        schema=schema,
        masked_url=masked,
        url=url,
        host=host,
        port=port,
        dbname=dbname,
        user=user,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _connection_error(target: PostgresTarget, exc: BaseException) -> SourceError:
    """Translate a libpq connection failure into one sentence the user can act on."""
    text = str(exc)
    low = text.lower()
    where = f"Cannot connect to PostgreSQL at {target.masked_url}"
    if "connection refused" in low:
        why = (
            "connection refused; check that the server is running and the URL "
            "(host, port, database) is right"
        )
    elif "could not translate host name" in low or "name or service not known" in low:
        why = f"host {target.host!r} is unknown; check the host name in the URL"
    elif "timeout expired" in low or "timed out" in low:
        why = (
            f"no answer within {CONNECT_TIMEOUT_S} s; check the host, the port and any "
            "firewall between here and the server"
        )
    elif "password authentication failed" in low or "no password supplied" in low:
        why = (
            "authentication failed; check the user name and the password (in the URL, "
            "PGPASSWORD or ~/.pgpass)"
        )
    elif "no pg_hba.conf entry" in low:
        why = (
            "the server does not accept this user from this host (pg_hba.conf); ask the "
            "database administrator for access or use another user"
        )
    elif re.search(r'role "[^"]*" does not exist', low):
        why = "the user does not exist on the server; check the user name in the URL"
    elif re.search(r'database "[^"]*" does not exist', low):
        why = f"database {target.dbname!r} does not exist; check the database name in the URL"
    elif "no such file or directory" in low:
        why = "no server socket found; check that the server is running, or give a host in the URL"
    else:
        why = f"{target.safe(_first_line(exc))}; check the URL and that the server is reachable"
    return SourceError(f"{where}: {why}.")


@contextlib.contextmanager
def _connect(target: PostgresTarget, *, autocommit: bool = False) -> Iterator[Any]:
    """Open a psycopg connection, translating connection failures into :class:`SourceError`."""
    import psycopg

    try:
        conn = psycopg.connect(target.conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise _connection_error(target, exc) from None
    try:
        yield conn
    finally:
        conn.close()


#: Public name of :func:`_connect`, for writers (the OMOP sink) that open their own connection.
connect = _connect


def _resolve_schema(cur: Any, target: PostgresTarget) -> str:
    """Return the schema's name as stored (exact match first, then case-insensitive)."""
    cur.execute(
        "SELECT schema_name FROM information_schema.schemata "
        "WHERE lower(schema_name) = lower(%s) ORDER BY schema_name = %s DESC, schema_name",
        (target.schema, target.schema),
    )
    row = cur.fetchone()
    if row is None:
        raise SourceError(
            f"Schema {target.schema!r} does not exist in PostgreSQL at {target.masked_url}; "
            "name the schema holding the OMOP tables with ?schema=NAME in the URL."
        )
    return str(row[0])


def _find_tables(cur: Any, schema: str) -> dict[str, str]:
    """Map lower-case table names to their stored names in ``schema`` (exact lower wins)."""
    cur.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = %s AND table_type IN ('BASE TABLE', 'VIEW', 'FOREIGN') "
        "ORDER BY table_name",
        (schema,),
    )
    found: dict[str, str] = {}
    for (name,) in cur.fetchall():
        key = str(name).lower()
        if key not in found or name == key:
            found[key] = str(name)
    return found


def _columns(cur: Any, schema: str, table: str) -> list[str]:
    cur.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
        (schema, table),
    )
    return [str(r[0]) for r in cur.fetchall()]


def _copy_table(cur: Any, schema: str, table: str, final: Path) -> Path:
    """COPY one table to the CSV file ``final`` (lower-case header), written atomically."""
    from psycopg import sql

    # In the table's own transaction (a rollback would undo it): timestamptz as UTC text.
    cur.execute("SET TIME ZONE 'UTC'")
    select_list = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(sql.Identifier(c), sql.Identifier(c.lower()))
        for c in _columns(cur, schema, table)
    )
    query = sql.SQL(
        "COPY (SELECT {cols} FROM {schema}.{table}) TO STDOUT WITH (FORMAT csv, HEADER true)"
    ).format(cols=select_list, schema=sql.Identifier(schema), table=sql.Identifier(table))
    with (
        atomic_path(final) as tmp,
        tmp.open("wb", buffering=_COPY_CHUNK_BYTES) as fh,
        cur.copy(query) as cp,
    ):
        for chunk in cp:
            fh.write(chunk)
    return final


def export_omop_tables(url: str, dest: Path, tables: Sequence[str]) -> dict[str, Path]:
    """Stream OMOP tables from PostgreSQL into ``dest/<table>.csv`` files.

    Each requested table is looked up case-insensitively in the URL's schema and copied with
    ``COPY (SELECT ...) TO STDOUT WITH (FORMAT csv, HEADER true)``, chunk by chunk, into a
    temporary file that is renamed into place once complete. File names and the CSV header's
    column names are lower case. Tables absent from the schema are skipped: the returned mapping
    (lower-case table name to CSV path) holds only the tables found.

    Raises :class:`SourceError` when the server cannot be reached, the login fails, or the
    database or schema does not exist.
    """
    import psycopg

    target = parse_postgres_url(url)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(t.lower() for t in tables))
    out: dict[str, Path] = {}
    try:
        with _connect(target) as conn, conn.cursor() as cur:
            schema = _resolve_schema(cur, target)
            stored = _find_tables(cur, schema)
            for name in wanted:
                if name in stored:
                    out[name] = _copy_table(cur, schema, stored[name], dest / f"{name}.csv")
                    conn.rollback()  # read-only transaction: end it between tables
    except psycopg.Error as exc:
        raise SourceError(
            f"Reading OMOP tables from PostgreSQL at {target.masked_url} failed: "
            f"{target.safe(_first_line(exc))}; check that the user may read the schema's tables."
        ) from None
    return out
