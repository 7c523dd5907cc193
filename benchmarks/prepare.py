"""Benchmark: OMOP (DuckDB) to tokenized timelines with ``ehrgpt.pipelines.prepare.prepare``.

For each size (Eunomia x1 and Eunomia scaled up by replicating patients, see
``scale_eunomia.py``) two stages run in their own subprocess, measured the same way
(wall time, peak RSS of the whole process tree sampled every 50 ms, CPU time):

1. BASELINE, the I/O floor: one DuckDB ``COPY (SELECT ... UNION ALL ...) TO parquet`` of the
   person/visit/event columns of every event table, no sorting, no vocabulary.
2. ``prepare(source, out, overwrite=True)``: the full pipeline to tokenized timelines.

Printed per size: prepare time / floor time (the ratio), events/s and events/s per core,
seconds per million events (linearity), peak RSS (must stay under 4 GB and not grow with
size). The hardware line gives the numpy fp32 matmul peak for the record. Results go to
``benchmarks/results/prepare.json``.

    python benchmarks/prepare.py                 # sizes 1,10,50,372 (372 copies: 1M patients)
    python benchmarks/prepare.py --quick         # sizes 1,10
    python benchmarks/prepare.py --sizes 1,100 --repeat 2

Scaled databases are built once under ``--data-dir`` (default /tmp/ehrgpt_bench_data) and
reused; outputs go under ``--work-dir`` and are deleted after each size unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import (  # noqa: E402
    measure_matmul_peak_gflops,
    print_table,
    run_with_peak_rss,
)
from scale_eunomia import eunomia_path, scale_eunomia  # noqa: E402

TARGET_EVENTS_PER_S = 1_000_000
MEMORY_LIMIT_BYTES = 4 * 10**9
DEFAULT_SIZES = (1, 10, 50, 372)
QUICK_SIZES = (1, 10)
RESULTS = HERE / "results" / "prepare.json"

# (table, concept column, date column, datetime column, numeric value column, unit column)
EVENT_TABLES = (
    (
        "visit_occurrence",
        "VISIT_CONCEPT_ID",
        "VISIT_START_DATE",
        "VISIT_START_DATETIME",
        None,
        None,
    ),
    (
        "condition_occurrence",
        "CONDITION_CONCEPT_ID",
        "CONDITION_START_DATE",
        "CONDITION_START_DATETIME",
        None,
        None,
    ),
    (
        "drug_exposure",
        "DRUG_CONCEPT_ID",
        "DRUG_EXPOSURE_START_DATE",
        "DRUG_EXPOSURE_START_DATETIME",
        None,
        None,
    ),
    (
        "procedure_occurrence",
        "PROCEDURE_CONCEPT_ID",
        "PROCEDURE_DATE",
        "PROCEDURE_DATETIME",
        None,
        None,
    ),
    (
        "measurement",
        "MEASUREMENT_CONCEPT_ID",
        "MEASUREMENT_DATE",
        "MEASUREMENT_DATETIME",
        "VALUE_AS_NUMBER",
        "UNIT_CONCEPT_ID",
    ),
    (
        "observation",
        "OBSERVATION_CONCEPT_ID",
        "OBSERVATION_DATE",
        "OBSERVATION_DATETIME",
        "VALUE_AS_NUMBER",
        "UNIT_CONCEPT_ID",
    ),
    ("death", "CAUSE_CONCEPT_ID", "DEATH_DATE", "DEATH_DATETIME", None, None),
)


# --------------------------------------------------------------------------- stage bodies
# (run in a subprocess: ``python prepare.py _raw_export SRC OUT THREADS`` and
#  ``python prepare.py _prepare SRC OUT``)


def raw_export(source: str, out: str, threads: int) -> dict:
    """The I/O floor: export the event columns of every well-formed event table to parquet."""
    import duckdb

    con = duckdb.connect(source, read_only=True)
    con.execute(f"SET threads={int(threads)}")
    con.execute("SET preserve_insertion_order=false")
    cols = {}
    for t, c, d in con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main'"
    ).fetchall():
        cols.setdefault(t.lower(), {})[c.upper()] = d
    selects = []
    for table, concept, date, dtime, value, unit in EVENT_TABLES:
        have = cols.get(table, {})
        if have.get("PERSON_ID") not in ("BIGINT", "INTEGER") or concept not in have:
            continue  # missing or malformed (e.g. Eunomia's death: its own header row)
        when = f"CAST({date} AS TIMESTAMP)"
        if dtime in have:
            when = f"coalesce(CAST({dtime} AS TIMESTAMP), {when})"
        visit = "VISIT_OCCURRENCE_ID" if "VISIT_OCCURRENCE_ID" in have else "NULL"
        num = f"TRY_CAST({value} AS DOUBLE)" if value in have else "CAST(NULL AS DOUBLE)"
        unt = unit if unit in have else "CAST(NULL AS BIGINT)"
        selects.append(
            f"SELECT PERSON_ID AS subject_id, {when} AS time, {concept} AS concept_id, "
            f"{num} AS numeric_value, {unt} AS unit_concept_id, "
            f"CAST({visit} AS BIGINT) AS visit_id FROM {table}"
        )
    if "person" in cols:
        birth = "BIRTH_DATETIME" if "BIRTH_DATETIME" in cols["person"] else "NULL"
        selects.append(
            f"SELECT PERSON_ID, CAST({birth} AS TIMESTAMP), GENDER_CONCEPT_ID, "
            "CAST(NULL AS DOUBLE), CAST(NULL AS BIGINT), CAST(NULL AS BIGINT) FROM person"
        )
    sql = " UNION ALL ".join(selects)
    con.execute(f"COPY ({sql}) TO '{out}' (FORMAT parquet)")
    n = con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0]
    return {"rows": int(n), "bytes": Path(out).stat().st_size}


def run_prepare(source: str, out: str, progress: bool, engine: str, workers: int) -> dict:
    """Run the pipeline in this process and return its result as a dict."""
    from ehrgpt.pipelines.prepare import prepare

    r = prepare(
        source,
        Path(out),
        overwrite=True,
        progress=progress,
        engine=engine,
        workers=workers or None,  # 0: prepare's own choice
    )
    return {
        "n_events": int(r.n_source_rows),
        "n_subjects": int(r.n_subjects),
        "n_tokens": int(r.n_tokens),
        "seconds": float(r.seconds),
        "engine": r.engine,
        "timings": r.timings,
    }


def _stage_main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "_raw_export":
        res = raw_export(rest[0], rest[1], int(rest[2]))
    elif mode == "_prepare":
        res = run_prepare(rest[0], rest[1], rest[2] == "1", rest[3], int(rest[4]))
    else:
        raise SystemExit(f"unknown stage {mode}")
    print("RESULT " + json.dumps(res))
    return 0


# --------------------------------------------------------------------------- driver


def _pin(cmd: list[str], cores: int) -> list[str]:
    """Pin ``cmd`` to the first ``cores`` CPUs when the machine has more."""
    if (os.cpu_count() or 1) > cores and shutil.which("taskset"):
        return ["taskset", "-c", f"0-{cores - 1}", *cmd]
    return cmd


def _measure_stage(cmd: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peak, rc, stdout = run_with_peak_rss(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    return {"wall_s": wall, "peak_rss": peak, "rc": rc, "cpu_s": cpu, "result": result}


def _warm_page_cache(path: Path) -> None:
    """Read the source file once so neither stage pays for the first read from disk."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def _source_for(copies: int, data_dir: Path) -> tuple[Path, dict | None]:
    if copies == 1:
        return eunomia_path(), None
    dest = data_dir / f"eunomia_x{copies}.duckdb"
    meta = dest.with_suffix(".json")
    if dest.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("copies") == copies and info.get("bytes") == dest.stat().st_size:
            return dest, info
    print(f"building {dest} ({copies} copies of Eunomia) ...", file=sys.stderr, flush=True)
    info = scale_eunomia(copies, dest)
    meta.write_text(json.dumps(info, indent=1))
    print(
        f"  {info['persons']:,} persons, {info['events']:,} events in {info['seconds']:.1f} s",
        file=sys.stderr,
    )
    return dest, info


def _hardware() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 0
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "ram_bytes": mem}


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``; returns (a, b, r2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0, 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def _best(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    return min(ok, key=lambda r: r["wall_s"]) if ok else runs[-1]


def bench_size(copies: int, args: argparse.Namespace) -> dict:
    source, build = _source_for(copies, args.data_dir)
    work = args.work_dir / f"x{copies}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    _warm_page_cache(source)
    py = sys.executable
    me = str(Path(__file__).resolve())
    raw_cmd = _pin(
        [py, me, "_raw_export", str(source), str(work / "raw.parquet"), str(args.cores)], args.cores
    )

    def prep_cmd(variant: str) -> list[str]:
        engine, workers = variant.split(":")
        flag = "1" if args.progress else "0"
        return _pin(
            [py, me, "_prepare", str(source), str(work / "prepared"), flag, engine, workers],
            args.cores,
        )

    raws: list[dict] = []
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.repeat):
        raws.append(_measure_stage(raw_cmd))
        (work / "raw.parquet").unlink(missing_ok=True)
        for variant in args.variants:
            runs[variant].append(_measure_stage(prep_cmd(variant)))
            shutil.rmtree(work / "prepared", ignore_errors=True)
    raw = _best(raws)
    variants = {v: _best(r) for v, r in runs.items()}
    prep = variants[args.variants[-1]]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    rec = {
        "copies": copies,
        "source": str(source),
        "source_bytes": source.stat().st_size,
        "build_seconds": build["seconds"] if build else None,
        "baseline": {k: raw[k] for k in ("wall_s", "peak_rss", "rc", "cpu_s")},
        "prepare": {k: prep[k] for k in ("wall_s", "peak_rss", "rc", "cpu_s")},
        "prepare_variant": args.variants[-1],
        "variants": {
            v: {
                **{k: r[k] for k in ("wall_s", "peak_rss", "rc", "cpu_s")},
                "result": r["result"],
                "events_per_s": (r["result"] or {}).get("n_events", 0) / r["wall_s"],
            }
            for v, r in variants.items()
        },
        "baseline_runs_s": [r["wall_s"] for r in raws],
        "prepare_runs_s": [r["wall_s"] for r in runs[args.variants[-1]]],
    }
    raw_rows = (raw["result"] or {}).get("rows")
    rec["raw_rows"] = raw_rows
    pres = prep["result"]
    rec["prepare_result"] = pres
    if prep["rc"] == 0 and pres:
        events = pres["n_events"]
        rec["n_events"] = events
        rec["events_per_s"] = events / prep["wall_s"]
        rec["events_per_s_per_core"] = rec["events_per_s"] / args.cores
        rec["s_per_m_events"] = prep["wall_s"] / (events / 1e6)
        rec["ratio"] = prep["wall_s"] / raw["wall_s"] if raw["rc"] == 0 else None
        rec["cores_used"] = prep["cpu_s"] / prep["wall_s"]
    if raw["rc"] == 0 and raw_rows:
        rec["baseline_events_per_s"] = raw_rows / raw["wall_s"]
    return rec


def bench_meds_etl(copies: int, args: argparse.Namespace) -> dict:
    """meds_etl_omop (cpp backend, ``--num_proc`` = cores) against ``ehrgpt prepare`` (its
    default workers) on the same CSV export."""
    from scale_eunomia import export_csv

    source, _ = _source_for(copies, args.data_dir)
    csv = args.data_dir / f"eunomia_x{copies}_csv"
    if not (csv / "person.csv").exists():
        export_csv(source, csv, threads=args.cores)
    work = args.work_dir / f"meds_etl_x{copies}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for f in sorted(csv.iterdir()):
        _warm_page_cache(f)
    etl = str(Path(args.meds_etl) / "meds_etl_omop")
    cmds = {
        "meds_etl cpp": [
            *(etl, str(csv), str(work / "meds_etl")),
            *("--num_proc", str(args.cores), "--backend", "cpp"),
        ],
        "ehrgpt prepare": [
            sys.executable,
            str(Path(__file__).resolve()),
            "_prepare",
            str(csv),
            str(work / "ehrgpt"),
            "0",
            "local",
            "0",  # the workers a user gets without --workers
        ],
    }
    out = {"copies": copies, "csv": str(csv)}
    for name, cmd in cmds.items():
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(work / "meds_etl", ignore_errors=True)
            shutil.rmtree(work / "ehrgpt", ignore_errors=True)
            runs.append(_measure_stage(_pin(cmd, args.cores)))
        best = _best(runs)
        out[name] = {k: best[k] for k in ("wall_s", "peak_rss", "rc", "cpu_s")}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    out["ratio_ehrgpt_over_meds_etl"] = (
        out["ehrgpt prepare"]["wall_s"] / out["meds_etl cpp"]["wall_s"]
    )
    return out


#: Java 17 needs these modules opened for Spark (as shared/peer/run_peer.sh sets them).
_JDK_OPENS = " ".join(
    f"--add-opens=java.base/{m}=ALL-UNNAMED"
    for m in (
        "java.lang",
        "java.lang.invoke",
        "java.lang.reflect",
        "java.io",
        "java.net",
        "java.nio",
        "java.util",
        "java.util.concurrent",
        "java.util.concurrent.atomic",
        "sun.nio.ch",
        "sun.nio.cs",
        "sun.security.action",
        "sun.util.calendar",
    )
)


def bench_peer(args: argparse.Namespace) -> dict:
    """The reference's Spark ETL on Eunomia x1 against ``ehrgpt prepare``, one after the other.

    The reference side is step 3 of the peer kit (``cehrbert_data``: the qualified concept
    list, then the patient sequences, with the kit's flags) on the kit's own Eunomia export
    (``WORK/data/omop``, written by its step 2); ehrgpt prepares the bundled Eunomia file.
    """
    work = Path(args.peer)
    py = work / "venv" / "bin" / "python"
    omop = work / "data" / "omop"
    seq = args.work_dir / "peer_sequences"
    shutil.rmtree(seq, ignore_errors=True)
    env = {
        **os.environ,
        "USE_TF": "0",
        "USE_TORCH": "1",
        "JDK_JAVA_OPTIONS": _JDK_OPENS + " -Dio.netty.tryReflectionSetAccessible=true",
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": str(py),
        "PYSPARK_DRIVER_PYTHON": str(py),
        "PYSPARK_SUBMIT_ARGS": "--driver-memory 8g pyspark-shell",
    }
    domains = ["condition_occurrence", "procedure_occurrence", "drug_exposure"]
    stages = {
        "concept list": [
            *(str(py), "-u", "-m", "cehrbert_data.apps.generate_included_concept_list"),
            *("-i", str(omop), "-o", str(omop), "--min_num_of_patients", "100"),
            *("--ehr_table_list", *domains),
        ],
        "sequences": [
            *(str(py), "-u", "-m", "cehrbert_data.apps.generate_training_data"),
            *("--input_folder", str(omop), "--output_folder", str(seq), "-d", "1985-01-01"),
            *("--att_type", "day", "--inpatient_att_type", "day", "-iv", "-ip"),
            *("--include_concept_list", "--include_death", "--gpt_patient_sequence"),
            *("--should_construct_artificial_visits", "--disconnect_problem_list_records"),
            *("--domain_table_list", *domains),
        ],
    }
    out: dict = {"peer": str(work)}
    for name, cmd in stages.items():
        wall, peak, rc, _ = run_with_peak_rss(_pin(cmd, args.cores), env=env)
        out[f"reference {name}"] = {"wall_s": wall, "peak_rss": peak, "rc": rc}
    shutil.rmtree(seq, ignore_errors=True)
    ours = [
        *(sys.executable, str(Path(__file__).resolve()), "_prepare"),
        *(str(eunomia_path()), str(args.work_dir / "peer_ehrgpt"), "0", "local", "1"),
    ]
    out["ehrgpt prepare"] = _measure_stage(_pin(ours, args.cores))
    shutil.rmtree(args.work_dir / "peer_ehrgpt", ignore_errors=True)
    ref = [out[f"reference {n}"] for n in stages]
    out["reference_wall_s"] = sum(r["wall_s"] for r in ref)
    out["reference_peak_rss"] = max(r["peak_rss"] for r in ref)
    out["reference_rc"] = max(abs(r["rc"]) for r in ref)
    out["ratio_reference_over_ehrgpt"] = out["reference_wall_s"] / out["ehrgpt prepare"]["wall_s"]
    return out


def _checks(records: list[dict]) -> dict:
    ok = [r for r in records if r.get("n_events")]
    out: dict = {}
    if not ok:
        return {"note": "prepare did not run at any size"}
    largest = max(ok, key=lambda r: r["n_events"])
    out["largest_copies"] = largest["copies"]
    out["largest_events_per_s"] = largest["events_per_s"]
    out["throughput_ok"] = largest["events_per_s"] >= TARGET_EVENTS_PER_S
    out["largest_peak_rss"] = largest["prepare"]["peak_rss"]
    out["memory_ok"] = largest["prepare"]["peak_rss"] < MEMORY_LIMIT_BYTES
    if len(ok) >= 2:
        xs = [r["n_events"] / 1e6 for r in ok]
        ys = [r["prepare"]["wall_s"] for r in ok]
        a, b, r2 = _fit_line(xs, ys)
        out["fit_fixed_s"], out["fit_s_per_m_events"], out["fit_r2"] = a, b, r2
        # linear: time(largest) within 25% of what the two next sizes' slope predicts
        big = sorted(ok, key=lambda r: r["n_events"])
        s1, s2 = big[-2], big[-1]
        marginal = (s2["prepare"]["wall_s"] - s1["prepare"]["wall_s"]) / (
            (s2["n_events"] - s1["n_events"]) / 1e6
        )
        out["marginal_s_per_m_events_top"] = marginal
        out["linear_ok"] = r2 >= 0.98 and marginal <= 1.25 * s2["s_per_m_events"]
        rss = [r["prepare"]["peak_rss"] for r in big]
        out["rss_growth_largest_vs_smallest"] = rss[-1] / rss[0] if rss[0] else None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return _stage_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES)),
        help="copies of Eunomia per size, comma separated (372 = 1M patients)",
    )
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    p.add_argument("--repeat", type=int, default=1, help="runs per stage; the fastest counts")
    p.add_argument("--cores", type=int, default=2, help="CPUs to pin both stages to")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/ehrgpt_bench_data"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/ehrgpt_bench_prepare"))
    p.add_argument("--keep", action="store_true", help="keep outputs in --work-dir")
    p.add_argument("--progress", action="store_true", help="show prepare's progress bars")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    p.add_argument(
        "--variants",
        default="local:1,local:2",
        help="prepare runs per size, ENGINE:WORKERS, comma separated; the last is checked "
        "against the targets (e.g. local:1,local:2,ray:2)",
    )
    p.add_argument(
        "--meds-etl",
        default=None,
        help="bin folder of a venv with meds-etl and meds-etl-cpp: also time meds_etl_omop "
        "(cpp backend) and prepare on the same CSV export",
    )
    p.add_argument("--meds-etl-sizes", default="10", help="sizes for --meds-etl")
    p.add_argument(
        "--peer",
        type=Path,
        default=None,
        help="a finished shared/peer/run_peer.sh folder: also time the reference's Spark ETL "
        "on Eunomia x1 against prepare",
    )
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    sizes = list(QUICK_SIZES) if args.quick else [int(s) for s in args.sizes.split(",") if s]

    gflops = measure_matmul_peak_gflops(2.0)
    hw = _hardware()
    print(
        f"hardware: {hw['cpu']}, {hw['cpu_count']} CPUs (stages pinned to {args.cores}), "
        f"{hw['ram_bytes'] / 2**30:.0f} GiB RAM; numpy fp32 matmul peak {gflops:.1f} GFLOP/s"
    )

    records = []
    for copies in sizes:
        rec = bench_size(copies, args)
        records.append(rec)
        if rec["prepare"]["rc"] != 0:
            print(f"x{copies}: prepare failed (rc={rec['prepare']['rc']})", file=sys.stderr)
        print(
            f"x{copies}: floor {rec['baseline']['wall_s']:.2f} s, "
            f"prepare {rec['prepare']['wall_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )

    etl_records = []
    if args.meds_etl:
        for copies in [int(x) for x in args.meds_etl_sizes.split(",") if x]:
            etl_records.append(bench_meds_etl(copies, args))

    peer = bench_peer(args) if args.peer else None

    def f(v, spec):
        return None if v is None else format(v, spec)

    rows = []
    for r in records:
        pres = r.get("prepare_result") or {}
        ok = r["prepare"]["rc"] == 0
        rows.append(
            [
                f"x{r['copies']}",
                f(pres.get("n_subjects"), ","),
                f(r.get("raw_rows"), ","),
                f(r.get("n_events"), ","),
                f(r["baseline"]["wall_s"], ".2f"),
                f(r["prepare"]["wall_s"], ".2f") if ok else "FAILED",
                f(r.get("ratio"), ".2f"),
                f(r.get("events_per_s"), ",.0f"),
                f(r.get("events_per_s_per_core"), ",.0f"),
                f(r.get("s_per_m_events"), ".2f"),
                f(r.get("cores_used"), ".2f"),
                f(r["baseline"]["peak_rss"] / 2**20, ",.0f"),
                f(r["prepare"]["peak_rss"] / 2**20, ",.0f"),
            ]
        )
    print()
    print_table(
        rows,
        [
            "size",
            "patients",
            "floor rows",
            "events",
            "floor s",
            "prepare s",
            "ratio",
            "events/s",
            "ev/s/core",
            "s/M ev",
            "cores used",
            "floor MiB",
            "prepare MiB",
        ],
    )
    print(
        "ratio = prepare s / floor s (floor: DuckDB COPY of the event columns to parquet, "
        "same run); events = MEDS event rows prepare read; MiB = peak RSS of the process "
        "tree"
    )
    vrows = []
    for r in records:
        for v, res in r["variants"].items():
            first = r["variants"][args.variants[0]]
            timings = (res["result"] or {}).get("timings") or {}
            vrows.append(
                [
                    f"x{r['copies']}",
                    v,
                    f(res["wall_s"], ".2f"),
                    f(res["events_per_s"], ",.0f"),
                    f(first["wall_s"] / res["wall_s"], ".2f"),
                    f(res["peak_rss"] / 2**20, ",.0f"),
                    " ".join(f"{k} {t:.1f}" for k, t in timings.items()),
                ]
            )
    print()
    print_table(
        vrows,
        [
            "size",
            "engine:workers",
            "s",
            "events/s",
            f"speedup vs {args.variants[0]}",
            "MiB",
            "seconds per step",
        ],
    )
    for e in etl_records:
        print(
            f"x{e['copies']} CSV export: meds_etl_omop cpp {e['meds_etl cpp']['wall_s']:.2f} s "
            f"{e['meds_etl cpp']['peak_rss'] / 2**20:,.0f} MiB (rc {e['meds_etl cpp']['rc']}), "
            f"ehrgpt prepare {e['ehrgpt prepare']['wall_s']:.2f} s "
            f"{e['ehrgpt prepare']['peak_rss'] / 2**20:,.0f} MiB; ehrgpt / meds_etl "
            f"{e['ratio_ehrgpt_over_meds_etl']:.2f}"
        )
    if peer:
        print(
            f"x1: reference Spark ETL (concept list + sequences) {peer['reference_wall_s']:.1f} s "
            f"{peer['reference_peak_rss'] / 2**20:,.0f} MiB (rc {peer['reference_rc']}), "
            f"ehrgpt prepare {peer['ehrgpt prepare']['wall_s']:.2f} s "
            f"{peer['ehrgpt prepare']['peak_rss'] / 2**20:,.0f} MiB; reference / ehrgpt "
            f"{peer['ratio_reference_over_ehrgpt']:.1f}"
        )
    checks = _checks(records)
    print()
    if "largest_events_per_s" in checks:
        eps = checks["largest_events_per_s"]
        print(
            f"throughput at x{checks['largest_copies']}: {eps:,.0f} events/s on {args.cores} "
            f"cores, {eps / TARGET_EVENTS_PER_S:.0%} of the 1M events/s target: "
            f"{'PASS' if checks['throughput_ok'] else 'FAIL'}"
        )
        print(
            f"peak memory at x{checks['largest_copies']}: "
            f"{checks['largest_peak_rss'] / 1e9:.2f} GB (limit 4 GB): "
            f"{'PASS' if checks['memory_ok'] else 'FAIL'}"
        )
    if "fit_r2" in checks:
        print(
            f"linearity: time = {checks['fit_fixed_s']:.2f} s + "
            f"{checks['fit_s_per_m_events']:.2f} s per M events (R^2 {checks['fit_r2']:.3f}); "
            f"marginal cost between the two largest sizes "
            f"{checks['marginal_s_per_m_events_top']:.2f} s per M events: "
            f"{'PASS' if checks['linear_ok'] else 'FAIL'}; peak RSS grows "
            f"x{checks['rss_growth_largest_vs_smallest']:.2f} from smallest to largest size"
        )
    if "note" in checks:
        print(checks["note"])

    doc = {
        "benchmark": "prepare",
        "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "hardware": {**hw, "matmul_fp32_gflops": gflops, "cores_pinned": args.cores},
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "memory_limit_bytes": MEMORY_LIMIT_BYTES,
        "sizes": records,
        "meds_etl": etl_records,
        "peer": peer,
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nresults: {args.out}")
    failed = any(r["prepare"]["rc"] != 0 for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
