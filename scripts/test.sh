#!/usr/bin/env bash
# Run the project's checks: lint (ruff) and the test suite (pytest).
#
#   bash scripts/test.sh [pytest arguments...]
#
# Works on a clean clone: creates .venv if missing and installs the package with its dev
# extras. The PostgreSQL tests start their own throwaway server (tests/postgres_server.py), so
# only the PostgreSQL binaries are needed; when they are missing and we run as root, the Debian
# package `postgresql` is installed (and `chromium`, for the test of the evaluation report).
# Exits non-zero if anything fails, including when pytest collects no tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_updated=0
apt_install() {
    if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: missing system package(s) $*; install them (apt-get install -y $*)." >&2
        return 1
    fi
    if [[ "$apt_updated" -eq 0 ]]; then
        apt-get update -q
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

have_postgres() {
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        return 0
    fi
    compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

if ! have_postgres; then
    echo "test.sh: PostgreSQL binaries not found; installing the Debian package postgresql" >&2
    apt_install postgresql
fi

# The report test of `ehrgpt evaluate` opens report.html in real headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    echo "test.sh: chromium not found; installing the Debian package chromium" >&2
    apt_install chromium
fi

if [[ ! -x .venv/bin/python ]]; then
    rm -rf .venv
    if ! python3 -m venv .venv; then
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
fi

.venv/bin/python -m pip install -q -c constraints-cpu.txt -e '.[dev]'
# ACES declares polars<2 but runs on polars 2: installed without its pins (pyproject.toml).
.venv/bin/python -m pip install -q --no-deps es-aces==0.7.3

lint_paths=(src tests)
[[ -d benchmarks ]] && lint_paths+=(benchmarks)
.venv/bin/ruff check "${lint_paths[@]}"

status=0
.venv/bin/pytest -q "$@" || status=$?
if [[ "$status" -eq 5 ]]; then
    echo "test.sh: pytest collected no tests; treating that as a failure." >&2
fi
exit "$status"
