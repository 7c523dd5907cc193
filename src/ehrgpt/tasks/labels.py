"""Labels from an ACES task on a prepared run (or any MEDS folder), or from a user's label
parquet.

A task is a shipped name (:func:`ehrgpt.tasks.shipped_tasks`) or the path of an ACES YAML. Its
predicate codes may be OMOP concept ids (``code: 192671``) or the data's MEDS codes
(``code: SNOMED/74474003``); ids are translated with ``meds/metadata/codes.parquet``. ACES runs
shard by shard (a subject lives in one shard), so memory follows the largest shard.

Labels are MEDS labels (``subject_id``, ``prediction_time``, ``boolean_value``) with the
subject's ``split`` added from ``meds/metadata/subject_splits.parquet`` (or the shard's
``data/<split>/`` folder). Rows that cannot be used are counted by reason, never dropped
silently: subjects not in the data, prediction times before the subject's first event,
missing label values.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ehrgpt.errors import EhrgptError
from ehrgpt.meds_format.dataset import data_shards, meds_folder
from ehrgpt.tasks import shipped_tasks

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("subject_id", "prediction_time", "boolean_value")
SPLITS = ("train", "tuning", "held_out")
_LABEL_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean,
    "split": pl.String,
}


@dataclass
class Labels:
    """Usable labels (one row per subject and prediction time, with its split) and counts."""

    frame: pl.DataFrame
    task: str = ""
    dropped: dict[str, int] = field(default_factory=dict)
    predicate_rows: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Labels and positives per split."""
        out = {}
        for split in SPLITS:
            part = self.frame.filter(pl.col("split") == split)
            out[split] = {"labels": len(part), "positive": int(part["boolean_value"].sum())}
        return out


# -- tasks ---------------------------------------------------------------------------------


def resolve_task(task: str | Path) -> tuple[str, Path]:
    """(name, YAML path) of a shipped task name or a YAML path."""
    shipped = shipped_tasks()
    if str(task) in shipped:
        return str(task), shipped[str(task)]
    path = Path(task)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.stem, path
    raise EhrgptError(
        f"Task {task!r} is neither a shipped task ({', '.join(shipped)}) nor an ACES YAML file."
    )


def translate_codes(spec: Any, id_to_code: dict[int, str], known: set[str]) -> Any:
    """Replace OMOP concept ids in a predicate's ``code`` by the data's MEDS codes.

    An int, or a string of digits that is not itself a code of the data, is a concept id.

    >>> translate_codes(192671, {192671: "SNOMED/74474003"}, set())
    'SNOMED/74474003'
    >>> translate_codes({"any": [1, "LAB/X", "2"]}, {1: "A/1", 2: "B/2"}, {"LAB/X"})
    {'any': ['A/1', 'LAB/X', 'B/2']}
    >>> translate_codes({"regex": "^SNOMED/"}, {}, set())
    {'regex': '^SNOMED/'}
    """
    if isinstance(spec, dict):
        if "any" in spec:
            return {**spec, "any": [translate_codes(c, id_to_code, known) for c in spec["any"]]}
        return spec
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit() and spec not in known):
        return id_to_code.get(int(spec), str(spec))
    return spec


def _codes(run_dir: Path) -> pl.DataFrame:
    path = meds_folder(run_dir) / "metadata" / "codes.parquet"
    if not path.exists():
        return pl.DataFrame(schema={"code": pl.String, "omop_concept_id": pl.Int64})
    frame = pl.read_parquet(path)
    if "omop_concept_id" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, pl.Int64).alias("omop_concept_id"))
    return frame.select("code", "omop_concept_id")


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


def load_task(path: Path, run_dir: Path):
    """Read an ACES YAML, translate concept ids (with ``run_dir``'s codes), and let ACES check it.

    Returns the ACES ``TaskExtractorConfig``. A YAML that cannot be read, or that ACES rejects,
    raises :class:`EhrgptError` naming the file (and ACES's reason, which names the field).
    """
    import ruamel.yaml

    try:
        from aces.config import TaskExtractorConfig
    except ImportError:
        raise EhrgptError(
            "Tasks need the ACES package: pip install --no-deps es-aces==0.7.3 "
            "(its own pin, polars<2, would replace this environment's polars)."
        ) from None

    yaml = ruamel.yaml.YAML(typ="safe", pure=True)
    try:
        data = yaml.load(Path(path).read_text())
    except OSError as exc:
        raise EhrgptError(f"Cannot read task file {path}: {exc.strerror}.") from None
    except ruamel.yaml.YAMLError as exc:
        raise EhrgptError(f"Task file {path} is not valid YAML: {_one_line(exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("predicates"), dict):
        raise EhrgptError(
            f"Task file {path} has no `predicates:` mapping (an ACES task needs one)."
        )
    codes = _codes(run_dir)
    id_to_code = dict(
        codes.drop_nulls("omop_concept_id").select("omop_concept_id", "code").iter_rows()
    )
    known = set(codes["code"].to_list())
    for name, pred in data["predicates"].items():
        if isinstance(pred, dict) and "code" in pred:
            pred["code"] = translate_codes(pred["code"], id_to_code, known)
        elif not (isinstance(pred, dict) and "expr" in pred):
            raise EhrgptError(f"Task file {path}: predicates.{name} needs `code:` or `expr:`.")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "task.yaml"
        with resolved.open("w") as f:
            yaml.dump(data, f)
        try:
            return TaskExtractorConfig.load(resolved)
        except Exception as exc:
            raise EhrgptError(
                f"Task file {path} is not a valid ACES task: {_one_line(exc)}"
            ) from None


# -- labels --------------------------------------------------------------------------------


def _predicate_rows(cfg, shards: list[Path]) -> dict[str, int]:
    plain = cfg.plain_predicates
    exprs = [p.MEDS_eval_expr().cast(pl.Int64).sum().alias(n) for n, p in plain.items()]
    if not exprs:
        return {}
    counts = (
        pl.scan_parquet(shards, extra_columns="ignore", missing_columns="insert")
        .with_columns(pl.col("code").cast(pl.String))
        .select(exprs)
        .collect()
    )
    return {name: int(counts[name][0] or 0) for name in plain}


def splits_of(run_dir: Path) -> pl.DataFrame:
    """``subject_id, split`` of every subject of a prepared run or MEDS folder: from its
    metadata, else from the shards' ``data/<split>/`` folders (a shard right under ``data/``
    is ``train``)."""
    meds_dir = meds_folder(run_dir)
    path = meds_dir / "metadata" / "subject_splits.parquet"
    if path.exists():
        return pl.read_parquet(path, columns=["subject_id", "split"]).cast(
            {"subject_id": pl.Int64, "split": pl.String}
        )
    parts = []
    for shard in data_shards(meds_dir):
        inner = shard.relative_to(meds_dir / "data").parts
        split = inner[0] if len(inner) > 1 else "train"
        ids = pl.read_parquet(shard, columns=["subject_id"]).unique()
        parts.append(ids.with_columns(pl.lit(split).alias("split")))
    return pl.concat(parts).cast({"subject_id": pl.Int64})


def _first_times(run_dir: Path) -> pl.DataFrame:
    shards = data_shards(meds_folder(run_dir))
    return (
        pl.scan_parquet(shards, extra_columns="ignore", missing_columns="insert")
        .filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
        .group_by("subject_id")
        .agg(pl.col("time").min().alias("first_time"))
        .collect()
        .cast({"subject_id": pl.Int64})
    )


def check_labels(frame: pl.DataFrame, run_dir: Path, *, source: str = "labels") -> Labels:
    """Attach splits and set aside (counted) rows that cannot be used.

    Reasons: ``subject not in the data``, ``prediction time before the first event``,
    ``no boolean_value``.
    """
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise EhrgptError(
            f"{source} lacks column(s) {', '.join(missing)}; MEDS labels need "
            f"{', '.join(LABEL_COLUMNS)}."
        )
    try:
        frame = frame.select(LABEL_COLUMNS).cast(
            {k: v for k, v in _LABEL_SCHEMA.items() if k != "split"}
        )
    except pl.exceptions.PolarsError as exc:
        raise EhrgptError(f"{source}: cannot read the label columns: {_one_line(exc)}") from None
    dropped: dict[str, int] = {}
    n = len(frame)
    frame = frame.drop_nulls(["subject_id", "prediction_time", "boolean_value"])
    dropped["no boolean_value or prediction_time"] = n - len(frame)
    n = len(frame)
    frame = frame.join(splits_of(run_dir), on="subject_id", how="inner")
    dropped["subject not in the data"] = n - len(frame)
    n = len(frame)
    frame = frame.join(_first_times(run_dir), on="subject_id", how="left").filter(
        pl.col("prediction_time") >= pl.col("first_time")
    )
    dropped["prediction time before the first event"] = n - len(frame)
    frame = frame.unique(["subject_id", "prediction_time"], keep="first", maintain_order=True)
    frame = frame.select(*_LABEL_SCHEMA).sort("subject_id", "prediction_time")
    for reason, count in dropped.items():
        if count:
            log.warning("%s: %d label row(s) set aside: %s.", source, count, reason)
    return Labels(frame, dropped={k: v for k, v in dropped.items() if v})


def extract_labels(run_dir: Path, task: str | Path, *, vocabulary: Path | None = None) -> Labels:
    """Run an ACES task on a prepared run's (or a MEDS folder's) data, shard by shard.

    ``vocabulary``: the run or MEDS folder whose ``metadata/codes.parquet`` translates the
    task's OMOP concept ids (default ``run_dir``); synthetic patients are labelled with the
    task as translated for the real run they imitate, so both sides get the same task.
    """
    from aces.predicates import get_predicates_df
    from aces.query import query
    from omegaconf import DictConfig

    name, path = resolve_task(task)
    cfg = load_task(path, run_dir if vocabulary is None else vocabulary)
    shards = data_shards(meds_folder(run_dir))
    rows = _predicate_rows(cfg, shards)
    for pred, count in rows.items():
        if count == 0:
            code = cfg.plain_predicates[pred].code
            log.warning(
                "Task %s: predicate %r (code %s) matches 0 rows of %s.",
                path,
                pred,
                code,
                meds_folder(run_dir),
            )
    parts = []
    for shard in shards:
        data = DictConfig({"path": str(shard), "standard": "meds"})
        try:
            preds = get_predicates_df(cfg, data)
            result = query(cfg, preds)
        except Exception as exc:
            raise EhrgptError(
                f"ACES failed on task {path}, shard {shard}: {_one_line(exc)}"
            ) from None
        if result is None or not len(result) or "label" not in result.columns:
            continue
        parts.append(
            result.select(
                pl.col("subject_id").cast(pl.Int64),
                pl.col("index_timestamp").cast(pl.Datetime("us")).alias("prediction_time"),
                (pl.col("label") > 0).alias("boolean_value"),
            )
        )
    if not parts:
        frame = pl.DataFrame(schema={k: v for k, v in _LABEL_SCHEMA.items() if k != "split"})
    else:
        frame = pl.concat(parts)
    labels = check_labels(frame, run_dir, source=f"task {name}")
    labels.task, labels.predicate_rows = name, rows
    return labels


def read_labels(path: Path, run_dir: Path) -> Labels:
    """A label parquet file, or a folder of them (``ehrgpt labels`` output or a user's)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    files = [f for f in files if not f.name.startswith(".")]
    if not files:
        raise EhrgptError(
            f"{path} holds no label parquet files (subject_id, prediction_time, ...)."
        )
    try:
        frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise EhrgptError(f"Cannot read labels {path}: {_one_line(exc)}") from None
    labels = check_labels(frame, run_dir, source=str(path))
    labels.task = path.stem if path.is_file() else path.name
    return labels


def write_labels(labels: Labels, folder: Path) -> None:
    """One MEDS label parquet per split: ``folder/{split}.parquet`` (written atomically)."""
    from ehrgpt.util.atomic import write_parquet

    for split in SPLITS:
        part = labels.frame.filter(pl.col("split") == split).drop("split")
        write_parquet(Path(folder) / f"{split}.parquet", part)


def labels_for(
    run_dir: Path, *, task: str | Path | None = None, labels: Path | None = None
) -> Labels:
    """Labels from ``--labels`` (a parquet file or folder) or made from ``--task``; given
    both, the labels are read and named after the task."""
    if labels is not None:
        found = read_labels(Path(labels), run_dir)
        if task is not None:
            found.task = resolve_task(task)[0]
        return found
    if task is None:
        raise EhrgptError("Give --task (a shipped task name or an ACES YAML) or --labels.")
    return extract_labels(run_dir, task)
