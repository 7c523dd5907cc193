"""Shared pytest configuration."""

pytest_plugins = ["tests.conftest_postgres", "tests.conftest_runs"]
