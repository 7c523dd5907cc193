"""No credential of a PostgreSQL source is printed, logged or written (issue 7, credentials).

A role with a password (scram-sha-256 on the throwaway server) reads a small Eunomia sample.
``ehrgpt prepare`` runs as a user runs it (a subprocess, debug logging on, wide output so that
nothing is wrapped), with the password in the URL's userinfo, in ``?password=``, in
``PGPASSWORD`` and in ``~/.pgpass``; every byte of every file of the run folder and everything
printed is searched for the password. Failing runs (wrong schema, wrong or missing password)
say why in one line without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import ehrgpt
from ehrgpt.sources.postgres import parse_postgres_url
from tests.helpers.postgres_loader import load_omop_duckdb_into_postgres
from tests.helpers.postgres_server import TemporaryPostgres
from tests.helpers.runs import eunomia_sample, read_json

pytestmark = pytest.mark.postgres

ROLE = "alice_cred"
PASSWORD = "Zq7-kWx2_pv9Lt"
SCHEMA = "cdm_cred"


@pytest.fixture(scope="module")
def alice_url(
    postgres_server: TemporaryPostgres | None,
    postgres_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """``postgresql://alice_cred@HOST:PORT/DB`` (no password): the role may read SCHEMA only."""
    admin = parse_postgres_url(postgres_url)
    sample = eunomia_sample(tmp_path_factory.mktemp("cred") / "cdm.duckdb", n_persons=60)
    load_omop_duckdb_into_postgres(sample, f"{postgres_url.split('?')[0]}?schema={SCHEMA}")
    with psycopg.connect(admin.conninfo, autocommit=True) as conn:
        role = sql.Identifier(ROLE)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(PASSWORD))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SCHEMA), role))
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                sql.Identifier(SCHEMA), role
            )
        )
    if postgres_server is not None:
        postgres_server.require_password(ROLE)
    return f"postgresql://{ROLE}@{admin.host}:{admin.port}/{admin.dbname}"


def _prepare(url: str, out: Path, home: Path, env: dict[str, str] | None = None):
    """``ehrgpt -v prepare --source URL --out OUT`` in a subprocess; (exit code, all output)."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "HOME": str(home),
        "COLUMNS": "400",
        "PYTHONPATH": str(Path(ehrgpt.__file__).parents[1]),
        **(env or {}),
    }
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", "from ehrgpt.cli import main; main()", "-v", "prepare",
         "--source", url, "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=full_env, timeout=300, check=False,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [
        str(p.relative_to(folder))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and secret.encode() in p.read_bytes()
    ]


@pytest.mark.parametrize("way", ["userinfo", "query", "PGPASSWORD", "pgpass"])
def test_password_never_leaves_the_process(alice_url: str, tmp_path: Path, way: str) -> None:
    url, env = f"{alice_url}?schema={SCHEMA}", {}
    if way == "userinfo":
        url = url.replace(f"{ROLE}@", f"{ROLE}:{PASSWORD}@", 1)
    elif way == "query":
        url = f"{url}&password={PASSWORD}"
    elif way == "PGPASSWORD":
        env["PGPASSWORD"] = PASSWORD
    else:
        target = parse_postgres_url(alice_url)
        (tmp_path / "home").mkdir()
        pgpass = tmp_path / "home" / ".pgpass"
        pgpass.write_text(f"{target.host}:{target.port}:{target.dbname}:{ROLE}:{PASSWORD}\n")
        pgpass.chmod(0o600)
    out = tmp_path / "run"
    code, output = _prepare(url, out, tmp_path / "home", env)
    assert code == 0, output
    assert PASSWORD not in output
    assert _files_holding(out, PASSWORD) == []
    config = read_json(out / "config.json")
    assert config["source"].startswith(f"postgresql://{ROLE}")
    if way in ("userinfo", "query"):
        assert "***" in config["source"]
    assert "Data quality: PostgreSQL postgresql://" in output


def test_failures_name_the_problem_without_the_password(
    postgres_server: TemporaryPostgres | None, alice_url: str, tmp_path: Path
) -> None:
    with_password = alice_url.replace(f"{ROLE}@", f"{ROLE}:{PASSWORD}@", 1)
    cases = [
        (f"{with_password}?schema=no_such_schema", "Schema 'no_such_schema' does not exist"),
        (f"{alice_url}?schema=no_such_schema&password={PASSWORD}", "does not exist"),
    ]
    if postgres_server is not None:  # a server that checks passwords
        wrong = f"{alice_url.replace(f'{ROLE}@', f'{ROLE}:{PASSWORD}x@', 1)}?schema={SCHEMA}"
        cases += [
            (wrong, "authentication failed"),
            (f"{alice_url}?schema={SCHEMA}", "authentication failed"),
        ]
    for i, (url, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, output = _prepare(url, out, tmp_path / "home")
        assert code == 2, output
        assert expected in output, output
        assert PASSWORD not in output, output
        assert "Traceback" not in output
        assert not out.exists()
