"""A throwaway PostgreSQL cluster for the tests (initdb + pg_ctl in a temporary folder).

Used by the ``postgres_url`` fixture in ``tests/helpers/postgres.py``. The cluster listens on
127.0.0.1 only, on a free port, trusts local connections (user ``postgres``, no password) and is
removed when stopped. When running as root (CI containers), the server runs as the ``postgres``
system user, because ``initdb`` refuses to run as root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or in "
    "/usr/lib/postgresql/*/bin; install the Debian package `postgresql` "
    "(apt-get install -y postgresql) or set EHRGPT_TEST_POSTGRES_URL to a running server."
)


class PostgresUnavailable(RuntimeError):
    """The throwaway server could not be found or started (message says why and what to do)."""


def find_pg_bindir() -> Path | None:
    """Return the folder holding ``initdb`` and ``pg_ctl`` (PATH first, then newest Debian)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    candidates = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        p = Path(d)
        if (p / "initdb").is_file() and (p / "pg_ctl").is_file():
            version = p.parent.name
            candidates.append((int(version) if version.isdigit() else 0, p))
    if candidates:
        return max(candidates)[1]
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as_user() -> str | None:
    """The user to run the server as: ``postgres`` (or ``nobody``) when root, else ``None``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresUnavailable(
        "Running as root but neither a `postgres` nor a `nobody` user exists to run the test "
        "server; install the Debian package `postgresql`, which creates the `postgres` user."
    )


@dataclass
class TemporaryPostgres:
    """A PostgreSQL cluster in a temporary folder; use as a context manager or start()/stop()."""

    dbname: str = "ehrgpt_test"
    port: int = 0
    root: Path | None = None
    bindir: Path | None = None
    user: str | None = None

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DBNAME``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def _cmd(self, *args: str) -> list[str]:
        if self.user is None:
            return list(args)
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", self.user, "--", *args]
        return ["su", "-s", "/bin/sh", self.user, "-c", " ".join(_shquote(a) for a in args)]

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise PostgresUnavailable(
                f"`{' '.join(args)}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}{self._log_tail()}"
            )
        return proc

    def _log_tail(self) -> str:
        if self.root is None:
            return ""
        log = self.root / "server.log"
        try:
            return "\nserver log:\n" + log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> str:
        """Create, start and prepare the cluster; return its URL."""
        self.bindir = self.bindir or find_pg_bindir()
        if self.bindir is None:
            raise PostgresUnavailable(INSTALL_HINT)
        self.user = _run_as_user()
        self.root = Path(tempfile.mkdtemp(prefix="ehrgpt-pg-"))
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        data = self.root / "data"
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(data),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        last_error: PostgresUnavailable | None = None
        for _attempt in range(5):  # the free port may be taken before the server binds it
            self.port = free_port()
            options = (
                f"-p {self.port} -h 127.0.0.1 -k {self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                self._run(
                    str(self.bindir / "pg_ctl"),
                    "-D", str(data),
                    "-l", str(self.root / "server.log"),
                    "-o", options,
                    "-w", "-t", "60",
                    "start",
                )  # fmt: skip
                break
            except PostgresUnavailable as exc:
                last_error = exc
                time.sleep(0.5)
        else:
            assert last_error is not None
            self.stop()
            raise last_error
        try:
            self._create_database()
        except Exception:
            self.stop()
            raise
        return self.url

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        conninfo = (
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(
                        f"Test server on port {self.port} did not accept connections: {exc}"
                        f"{self._log_tail()}"
                    ) from exc
                time.sleep(0.2)

    def require_password(self, role: str) -> None:
        """Make ``role`` log in with its password over TCP (scram-sha-256); others stay trusted.

        The rule goes first in pg_hba.conf (the first matching line wins) and the server
        reloads its configuration.
        """
        import psycopg

        assert self.root is not None, "start the server first"
        hba = self.root / "data" / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        hba.write_text(rule + hba.read_text())  # the file keeps its owner
        conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its folder."""
        if self.root is None:
            return
        data = self.root / "data"
        if self.bindir is not None and (data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                subprocess.run(
                    self._cmd(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                              "-w", "-t", "30", "stop"),
                    capture_output=True, timeout=60, check=False,
                )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> TemporaryPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _shquote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def check_reachable(url: str, timeout_s: int = 5) -> str | None:
    """Return ``None`` if ``url`` accepts a connection, else the reason as text."""
    import psycopg

    from ehrgpt.sources.postgres import parse_postgres_url

    try:
        target = parse_postgres_url(url)
        with psycopg.connect(target.conninfo, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return str(exc).strip() or type(exc).__name__
    return None
