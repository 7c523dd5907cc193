"""prepare as a map over patient shards: the same output for any engine, shard count and
worker count, killed workers redone, the memory limit checked before the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ehrgpt.errors import EhrgptError
from ehrgpt.pipelines.prepare import prepare
from ehrgpt.util.engines import FAULT_ENV
from tests.helpers.digest import run_bytes, run_digests
from tests.helpers.runs import eunomia_sample, leftovers

DIGESTS = Path(__file__).resolve().parent / "data" / "eunomia_prepare_digests.json"


@pytest.fixture(scope="module")
def sample_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eunomia cut to 300 persons."""
    return eunomia_sample(tmp_path_factory.mktemp("sample") / "cdm.duckdb", 300)


@pytest.fixture(scope="module")
def reference(sample_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The sample prepared in this process, as one patient shard."""
    out = tmp_path_factory.mktemp("reference") / "run"
    prepare(str(sample_db), out, workers=1, n_parts=1, shard_size=100, progress=False)
    return run_bytes(out)


def test_eunomia_content_is_that_of_the_single_process_pipeline(eunomia_run: Path) -> None:
    """The default run writes what the single-process pipeline wrote: every MEDS shard,
    tokenizer file, tokenized shard and data_quality.json."""
    expected = json.loads(DIGESTS.read_text())
    assert run_digests(eunomia_run) == expected


def test_shards_and_workers_do_not_change_a_byte(
    sample_db: Path, reference: dict[str, bytes], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = prepare(str(sample_db), out, workers=2, n_parts=3, shard_size=100, progress=False)
    assert result.engine == "local, 2 worker(s), 3 patient shard(s)"
    got = run_bytes(out)
    assert sorted(got) == sorted(reference)
    assert [name for name in got if got[name] != reference[name]] == []
    assert len([n for n in got if n.startswith("meds/data/")]) >= 4  # several output shards
    assert leftovers(out) == ["run"]


@pytest.mark.parametrize("stage", ["bucket", "gather"])
def test_a_killed_worker_is_redone(
    stage: str,
    sample_db: Path,
    reference: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL of the pool process running task 1 of a stage, half-way through the task
    (after it wrote part of its output under a temporary name): the task runs again, the
    output is the same and nothing half-written is left."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"{stage}:1:{marker}")
    out = tmp_path / "run"
    prepare(str(sample_db), out, workers=2, n_parts=3, shard_size=100, progress=False)
    assert marker.exists(), "the worker was not killed"
    got = run_bytes(out)
    names = sorted(set(got) | set(reference))
    assert [name for name in names if got.get(name) != reference.get(name)] == []
    assert leftovers(out) == ["run"]
    assert not list(out.rglob("*.tmp-*")) and not (out / "staging").exists()


def test_visit_ids_across_shards_fall_back_to_one_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A visit id of two persons (hashed to different shards) is cleaned as the single-process
    pipeline cleans it: the run uses one shard and says so."""
    db = eunomia_sample(
        tmp_path / "cdm.duckdb",
        100,
        # Every condition names the first visit of visit_occurrence (of one person).
        (
            'UPDATE condition_occurrence SET "VISIT_OCCURRENCE_ID" = '
            '(SELECT min("VISIT_OCCURRENCE_ID") FROM visit_occurrence)',
        ),
    )
    one, many = tmp_path / "one", tmp_path / "many"
    prepare(str(db), one, workers=1, n_parts=1, progress=False)
    with caplog.at_level(logging.WARNING):
        result = prepare(str(db), many, workers=1, n_parts=4, progress=False)
    assert "one shard is used" in caplog.text
    assert result.engine.endswith("1 patient shard(s)")
    assert run_bytes(many) == run_bytes(one)


def test_a_memory_limit_too_small_stops_before_the_run(sample_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(EhrgptError, match=r"--memory-limit 600MB is too small: 2 worker"):
        prepare(str(sample_db), out, workers=2, memory_limit="600MB", progress=False)
    assert leftovers(out) == []
    with pytest.raises(EhrgptError, match="--memory-limit must be a size"):
        prepare(str(sample_db), out, memory_limit="lots", progress=False)


def test_ray_engine_writes_the_same_bytes_and_redoes_a_killed_task(
    sample_db: Path,
    reference: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local 2-CPU Ray cluster started by the test; the worker running task 0 of the gather
    stage is killed once (Ray runs the task again)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ehrgpt[ray]')")
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"gather:0:{marker}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "run"
        result = prepare(
            str(sample_db), out, engine="ray", n_parts=3, shard_size=100, progress=False
        )
    finally:
        ray.shutdown()
    assert result.engine == "ray, 2 worker(s), 3 patient shard(s)"
    assert marker.exists(), "the Ray worker was not killed"
    assert run_bytes(out) == reference
    assert leftovers(out) == ["run"]


def _crash(sample_db: Path, out: Path, fault: str, **options) -> None:
    """prepare in a child process that is killed (SIGKILL) in the middle of a task."""
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    code = (
        "from ehrgpt.pipelines.prepare import prepare\n"
        f"prepare({str(sample_db)!r}, {str(out)!r}, workers=1, n_parts=3, shard_size=100, "
        f"progress=False, {args})"
    )
    env = {**os.environ, FAULT_ENV: fault}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.parametrize("stage", ["gather", "encode"])
def test_a_crashed_prepare_resumes_from_its_finished_shards(
    stage: str,
    sample_db: Path,
    reference: dict[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kill -9 of prepare itself half-way through task 1 of a stage; --resume runs only what
    had not finished and writes the same bytes; the work folder is gone afterwards."""
    out = tmp_path / "run"
    _crash(sample_db, out, f"{stage}:1:{tmp_path / 'killed'}")
    partial = out.with_name(".run.partial")
    assert leftovers(out) == [".run.partial"]
    assert (partial / "resume.json").exists() and list((partial / "journal").rglob("*.pkl"))
    with caplog.at_level(logging.INFO):
        result = prepare(
            str(sample_db), out, workers=1, n_parts=3, shard_size=100, resume=True, progress=False
        )
    assert "resuming the unfinished run" in caplog.text
    # shuffle + 3 clean + 3 bucket + the gather tasks finished before the kill (+ all gathers
    # and the first encode task when the kill came while tokenizing)
    n_gather = len([n for n in reference if n.startswith("meds/data/")])
    expected = 7 + (1 if stage == "gather" else n_gather + 1)
    assert result.resumed == expected
    got = run_bytes(out)
    assert [n for n in sorted(set(got) | set(reference)) if got.get(n) != reference.get(n)] == []
    assert leftovers(out) == ["run"]


def test_a_crashed_run_is_removed_or_refused_with_other_options(
    sample_db: Path, reference: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--resume with another seed names the difference and keeps the work folder; a run
    without --resume removes it (saying how big it was), and an older version's work folder
    of a dead process, and starts over."""
    out = tmp_path / "run"
    _crash(sample_db, out, f"bucket:2:{tmp_path / 'killed'}")
    partial = out.with_name(".run.partial")
    journal = sorted(p.name for p in partial.rglob("*.pkl"))
    with pytest.raises(EhrgptError, match=r"other inputs \(seed: 0 then, 1 now\)"):
        prepare(str(sample_db), out, workers=1, n_parts=3, shard_size=100, seed=1, resume=True)
    assert sorted(p.name for p in partial.rglob("*.pkl")) == journal
    # and the work folder of an older version, named after a process that is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = out.with_name(f".run.tmp-{gone.pid}")
    (stale / "meds").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        result = prepare(str(sample_db), out, workers=1, n_parts=3, shard_size=100, progress=False)
    assert "removing the unfinished run an earlier prepare left" in caplog.text
    assert result.resumed == 0
    assert run_bytes(out) == reference
    assert leftovers(out) == ["run"]
