"""``ehrgpt labels``: run an ACES task on a prepared run; MEDS label parquet per split."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ehrgpt.pipelines.output import output_folder
from ehrgpt.tasks.labels import extract_labels, write_labels
from ehrgpt.util.atomic import write_json


@dataclass
class LabelsResult:
    """Counts of the labels written, per split, and of the rows set aside."""

    out: Path
    task: str
    counts: dict = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    predicate_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str]]:
        rows = [("task", self.task)]
        total = sum(c["labels"] for c in self.counts.values())
        positive = sum(c["positive"] for c in self.counts.values())
        rows.append(("labels (positive)", f"{total:,} ({positive:,})"))
        rows += [
            (f"  {split}", f"{c['labels']:,} ({c['positive']:,})")
            for split, c in self.counts.items()
        ]
        rows += [(f"rows matching predicate {k}", f"{v:,}") for k, v in self.predicate_rows.items()]
        rows += [(f"set aside: {k}", f"{v:,}") for k, v in self.dropped.items()]
        rows += [("output folder", str(self.out)), ("seconds", f"{self.seconds:.1f}")]
        return rows


def make_labels(run_dir: Path, task: str, out: Path, *, overwrite: bool = False) -> LabelsResult:
    """Labels of ``task`` on ``run_dir``, written to ``out/{split}.parquet`` and ``labels.json``."""
    started = time.perf_counter()
    labels = extract_labels(Path(run_dir), task)
    result = LabelsResult(
        Path(out), labels.task, labels.counts(), labels.dropped, labels.predicate_rows
    )
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        write_labels(labels, tmp)
        result.seconds = time.perf_counter() - started
        write_json(
            tmp / "labels.json",
            {
                "task": str(task),
                "data": str(run_dir),
                "counts": result.counts,
                "set_aside": result.dropped,
                "predicate_rows": result.predicate_rows,
            },
        )
    return result
