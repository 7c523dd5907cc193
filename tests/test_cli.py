"""The ``ehrgpt`` command: help texts, the demo, and option values from a ``--config`` file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ehrgpt import __version__
from ehrgpt.cli import main
from tests.helpers.runs import leftovers, read_json

SUBCOMMANDS = (
    "prepare",
    "train",
    "generate",
    "demo",
    "labels",
    "embed",
    "probe",
    "baseline",
    "finetune",
    "evaluate",
    "zeroshot",
)


def test_every_subcommand_is_covered() -> None:
    assert set(main.commands) == set(SUBCOMMANDS)


def test_main_help_and_version() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert name in result.output
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--config" in result.output
    assert "Usage:" in result.output


def test_installed_entry_point_help() -> None:
    """The console script works as installed (``python -m ehrgpt`` as a fallback)."""
    script = Path(sys.executable).with_name("ehrgpt")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ehrgpt"]
    proc = subprocess.run(
        [*cmd, "prepare", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--source", "--out", "--att-scheme", "--vocab-from", "--meds-visit-rule"):
        assert option in proc.stdout


def test_demo_runs_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # The whole chain, short: prepare, 4 training steps, 2 futures per label, 6 patients.
    args = ["demo", "--out", str(out), "--steps", "4", "--patients", "6", "--samples", "2"]
    result = CliRunner().invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    text = result.stdout
    for title in ("Data quality: Eunomia GiBleed", "Visits", "Patients", "Tokens"):
        assert title in text
    for title in (
        "prepare: summary",
        "train: summary",
        "labels: summary",
        "probe (held_out): summary",
        "zero-shot (held_out): summary",
        "generate: summary",
        "evaluate: summary",
        "demo: summary",
    ):
        assert title in text
    assert "2,694" in text  # the patients
    run = out / "prepared"
    assert (run / "data_quality.json").exists()
    assert read_json(run / "config.json")["source"] == "eunomia"
    assert leftovers(run) == ["prepared"]
    assert (out / "model" / "model.safetensors").exists()
    for stage in ("labels/held_out.parquet", "probe/metrics.json", "zeroshot/calibration.png"):
        assert (out / "gi_bleed" / stage).exists(), stage
    zs = read_json(out / "gi_bleed" / "zeroshot" / "metrics.json")
    assert zs["samples"] == 2 and zs["baseline"] and "zero-shot AUROC" in text
    assert (out / "synthetic" / "omop.duckdb").exists()
    written = read_json(out / "synthetic" / "generate_summary.json")["written"]
    assert written == 6
    report = out / "evaluation" / "report.html"
    assert report.exists() and "report" in text
    assert "prevalence_pearson" in read_json(out / "evaluation" / "metrics.json")


def _write_config(path: Path, **values) -> Path:
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_file_values_are_used_and_overridden(tiny_meds: Path, tmp_path: Path) -> None:
    out = tmp_path / "from_config"
    config = _write_config(
        tmp_path / "ehrgpt.toml",
        source=str(tiny_meds),
        out=str(out),
        att_scheme="mix",
        seed=5,
        min_prevalence=0.25,
        meds_visit_rule="hours:6",
    )
    result = CliRunner().invoke(
        main, ["prepare", "--config", str(config), "--seed", "7", "--no-progress"]
    )
    assert result.exit_code == 0, result.output + (result.stderr or "")
    used = read_json(out / "config.json")
    assert used["source"] == str(tiny_meds)  # from the file
    assert used["out"] == str(out)  # a required option, from the file
    assert used["att_scheme"] == "mix"
    assert used["min_prevalence"] == 0.25
    assert used["meds_visit_rule"] == "hours:6"
    assert used["seed"] == 7  # the command line wins
    assert read_json(out / "tokenizer" / "tokenizer_config.json")["att_scheme"] == "mix"

    # the command line also wins over the file for --out and --att-scheme
    other = tmp_path / "from_cli"
    result = CliRunner().invoke(
        main,
        [
            "prepare",
            "--att-scheme",
            "cehr_bert",
            "--config",
            str(config),
            "--out",
            str(other),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output + (result.stderr or "")
    used = read_json(other / "config.json")
    assert (used["att_scheme"], used["seed"], used["out"]) == ("cehr_bert", 5, str(other))


def test_config_file_errors(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["prepare", "--config", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 3\n")
    result = CliRunner().invoke(main, ["prepare", "--config", str(bad)])
    assert result.exit_code == 2
    assert "not valid TOML" in result.stderr
