"""Shared pytest configuration."""

pytest_plugins = ["tests.helpers.postgres", "tests.helpers.runs"]
