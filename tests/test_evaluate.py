"""``ehrgpt evaluate`` on Eunomia: synthetic patients of a small model (MEDS and OMOP input),
exact copies of training patients, unseen real patients, bad input, and the report in a real
headless Chromium. Synthetic folders copied from real splits are bare MEDS folders (no
metadata): the utility tasks' concept ids are translated with the real run's codes."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from ehrgpt.cli import main
from ehrgpt.errors import EhrgptError
from ehrgpt.evaluate.patients import Cohort, clinical_code_counts, synthetic_meds
from ehrgpt.generation.engine import SamplingConfig
from ehrgpt.pipelines.evaluate import HEADLINES, evaluate
from ehrgpt.pipelines.generate import generate
from ehrgpt.tasks import shipped_tasks
from ehrgpt.tasks.labels import extract_labels
from tests.helpers.browser import check_page
from tests.helpers.runs import leftovers, read_json, small_model_dir

OFFSET = 10**12


@pytest.fixture(scope="session")
def synthetic_run(eunomia_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 patients of a small freshly initialised model, as MEDS and an OMOP DuckDB file."""
    model_dir = small_model_dir(eunomia_run, tmp_path_factory.mktemp("eval_model"), context=512)
    out = tmp_path_factory.mktemp("eval_synthetic") / "synthetic"
    generate(
        model_dir,
        40,
        out,
        fmt="omop-duckdb",
        sampling=SamplingConfig(max_tokens_per_patient=80),
        seed=0,
        batch_size=40,
        progress=False,
    )
    return out


def _copy_split(
    run: Path, split: str, dest: Path, n: int, rename=None, folder: str = "train"
) -> Path:
    """``n`` patients of a real split as a synthetic MEDS folder (ids moved above 10^12), in
    ``data/<folder>/``."""
    frame = pl.read_parquet(sorted((run / "meds" / "data" / split).glob("*.parquet")))
    keep = frame["subject_id"].unique().sort().head(n)
    frame = frame.filter(pl.col("subject_id").is_in(keep.implode())).with_columns(
        pl.col("subject_id") + OFFSET
    )
    if rename is not None:
        frame = frame.with_columns(rename)
    (dest / "data" / folder).mkdir(parents=True, exist_ok=True)
    frame.write_parquet(dest / "data" / folder / "0.parquet")
    return dest


def test_cli_report_and_metrics(eunomia_run: Path, synthetic_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--real",
            str(eunomia_run),
            "--synthetic",
            str(synthetic_run),
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    for key in HEADLINES:
        assert f"({key})" in result.output
    metrics = read_json(out / "metrics.json")
    assert set(HEADLINES) <= set(metrics)
    assert metrics["patients"]["synthetic"] == 40
    assert -1 <= metrics["prevalence_pearson"] <= 1
    assert 0 <= metrics["discriminator_auroc"] <= 1
    assert 0.5 < metrics["trtr_auroc"] <= 1  # the count baseline learns GI bleed on real data
    assert metrics["utility_task"] == "gi_bleed" and metrics["utility_head"] == "lightgbm"
    trtr, tstr = (metrics["utility"]["gi_bleed"][k] for k in ("trtr", "tstr"))
    low, high = trtr["heads"]["lightgbm"]["auroc_ci"]
    assert low < metrics["trtr_auroc"] < high
    assert trtr["n_test"] == trtr["heads"]["lightgbm"]["n_rows"] > 0
    # 40 patients of an untrained model: too few labels to train on, said, not crashed
    assert metrics["tstr_auroc"] is None and tstr["heads"] == {}
    assert "too few to train" in tstr["note"] or "labels none" in tstr["note"]
    assert metrics["exact_copy_rate"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html"]

    html = (out / "report.html").read_text()
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    for section in ("summary", "fidelity", "distributions", "utility", "privacy"):
        assert f'href="#{section}"' in html and f'id="{section}"' in html
    assert tstr["note"] in html
    page = check_page(out / "report.html")
    assert page["errors"] == [] and page["console"] == []
    n_images = html.count("<img ")
    assert n_images >= 10 and len(page["images"]) == n_images
    assert all(im["complete"] and im["w"] > 100 and im["h"] > 100 for im in page["images"])


def test_omop_input_gives_the_same_patients(synthetic_run: Path, tmp_path: Path) -> None:
    # The OMOP CDM file written by generate, read back with the project's OMOP -> MEDS code,
    # holds the same patients and clinical codes as the MEDS output.
    meds_dir = synthetic_meds(synthetic_run / "omop.duckdb", tmp_path / "work")
    from_omop = Cohort.from_shards("omop", sorted((meds_dir / "data").rglob("*.parquet")))
    from_meds = Cohort.from_shards(
        "meds", sorted((synthetic_run / "meds" / "data").rglob("*.parquet"))
    )
    assert from_omop.n == from_meds.n == 40
    # MEDS_DEATH aside (the OMOP death table may hold a death that generated MEDS carries as a
    # discharge to "Patient died"), the codes are the same.
    codes = [
        set(clinical_code_counts(c.events)["code"]) - {"MEDS_DEATH"} for c in (from_omop, from_meds)
    ]
    assert codes[0] == codes[1]
    assert from_omop.people["n_visits"].sum() == from_meds.people["n_visits"].sum()


def test_exact_copies_of_training_patients(eunomia_run: Path, tmp_path: Path) -> None:
    syn = _copy_split(eunomia_run, "train", tmp_path / "copies", 10_000)
    m = evaluate(eunomia_run, syn, tmp_path / "eval", progress=False).metrics
    # the same ACES task labels the copies as it labels their real originals
    real = extract_labels(eunomia_run, "gi_bleed").counts()["train"]
    tstr = m["utility"]["gi_bleed"]["tstr"]
    assert (tstr["n_train"], tstr["n_train_positive"]) == (real["labels"], real["positive"])
    assert abs(m["tstr_auroc"] - m["trtr_auroc"]) < 0.1  # trained on (nearly) the same rows
    assert m["exact_copy_rate"] == 1.0
    assert m["mia_auc"] > 0.9  # every member sits at distance 0 from a synthetic record
    assert m["mia_threshold_accuracy"] > 0.5
    assert m["nnaa_privacy_loss"] > 0.05  # equal-size samples: some copies meet their source
    assert m["prevalence_pearson"] > 0.9


def test_unseen_real_patients_leak_nothing(eunomia_run: Path, tmp_path: Path) -> None:
    syn = _copy_split(eunomia_run, "tuning", tmp_path / "tuning", 10_000)
    tasks = list(shipped_tasks())[::-1]  # names; the first gives the headline
    m = evaluate(eunomia_run, syn, tmp_path / "eval", tasks=tasks, progress=False).metrics
    assert list(m["utility"]) == tasks and m["utility_task"] == tasks[0]
    for task in tasks:
        real = extract_labels(eunomia_run, task).counts()
        trtr, tstr = (m["utility"][task][k] for k in ("trtr", "tstr"))
        # TRTR on train + tuning, TSTR on the tuning patients' copies, both on held_out
        assert (tstr["n_train"], tstr["n_train_positive"]) == tuple(real["tuning"].values())
        assert trtr["n_train"] == real["train"]["labels"] + real["tuning"]["labels"]
        assert tstr["n_test"] == trtr["n_test"] == real["held_out"]["labels"]
        assert 0 < tstr["heads"]["lightgbm"]["auroc"] < 1 and tstr["note"] == ""
    assert m["tstr_auroc"] == m["utility"][tasks[0]]["tstr"]["heads"]["lightgbm"]["auroc"]
    assert abs(m["mia_auc"] - 0.5) < 0.07
    assert abs(m["nnaa_privacy_loss"]) < 0.1
    assert m["exact_copy_rate"] < 0.02
    assert m["prevalence_pearson"] > 0.95
    assert m["discriminator_auroc"] < 0.65
    assert m["attribute_f1"] <= m["attribute_f1_real"] + 0.05


def test_labels_of_a_bare_meds_folder(eunomia_run: Path, tmp_path: Path) -> None:
    # shards right under data/ are training data; concept ids translated with the real codes
    syn = _copy_split(eunomia_run, "tuning", tmp_path / "flat", 10_000, folder="")
    counts = extract_labels(syn, "gi_bleed", vocabulary=eunomia_run).counts()
    assert counts["train"] == extract_labels(eunomia_run, "gi_bleed").counts()["tuning"]
    assert counts["train"]["labels"] > 0


@pytest.mark.parametrize("case", ["not_meds", "disjoint", "empty", "task"])
def test_bad_synthetic_input(eunomia_run: Path, tmp_path: Path, case: str) -> None:
    syn = tmp_path / "syn"
    tasks = ["gi_bleed"]
    if case == "task":
        _copy_split(eunomia_run, "tuning", syn, 20)
        tasks.append(str(tmp_path / "no_such_task.yaml"))
        expected = "neither a shipped task"
    elif case == "not_meds":
        syn.mkdir()
        (syn / "notes.txt").write_text("hello")
        expected = "neither a MEDS folder"
    elif case == "disjoint":
        _copy_split(
            eunomia_run, "tuning", syn, 20, rename=(pl.lit("LOCAL/") + pl.col("code")).alias("code")
        )
        expected = "share no clinical code"
    else:
        frame = pl.read_parquet(sorted((eunomia_run / "meds" / "data" / "tuning").glob("*")))
        (syn / "data" / "train").mkdir(parents=True)
        frame.head(0).write_parquet(syn / "data" / "train" / "0.parquet")
        expected = "holds no synthetic patients"
    out = tmp_path / "eval"
    with pytest.raises(EhrgptError, match=expected) as err:
        evaluate(eunomia_run, syn, out, tasks=tasks, progress=False)
    assert "\n" not in str(err.value)
    assert leftovers(out) == []
