"""The session-scoped ``postgres_url`` fixture: a PostgreSQL server for ``@pytest.mark.postgres``.

If ``EHRGPT_TEST_POSTGRES_URL`` is set, that server is used (and a test fails clearly if it
cannot be reached). Otherwise a throwaway cluster is started with initdb + pg_ctl on a free
localhost port (see ``tests/helpers/postgres_server.py``) and stopped at the end of the
session. Missing PostgreSQL binaries fail the tests with a message naming the Debian package
to install; they are never skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.postgres_server import PostgresUnavailable, TemporaryPostgres, check_reachable

ENV_VAR = "EHRGPT_TEST_POSTGRES_URL"


def _masked(url: str) -> str:
    from ehrgpt.errors import EhrgptError
    from ehrgpt.sources.postgres import parse_postgres_url

    try:
        return parse_postgres_url(url).masked_url
    except EhrgptError:
        return "(unparsable URL)"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TemporaryPostgres | None]:
    """The throwaway server (``None`` when ``EHRGPT_TEST_POSTGRES_URL`` names another)."""
    url = os.environ.get(ENV_VAR, "").strip()
    if url:
        problem = check_reachable(url)
        if problem is not None:
            pytest.fail(f"{ENV_VAR}={_masked(url)} is not reachable: {problem}", pytrace=False)
        yield None
        return
    server = TemporaryPostgres()
    try:
        server.start()
    except PostgresUnavailable as exc:
        pytest.fail(f"Cannot start a test PostgreSQL server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: TemporaryPostgres | None) -> str:
    """URL of a PostgreSQL database the tests may freely write to."""
    if postgres_server is None:
        return os.environ[ENV_VAR].strip()
    return postgres_server.url
