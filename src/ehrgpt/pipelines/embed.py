"""``ehrgpt embed``: one vector per label row, from the history up to its prediction time.

Writes ``OUT/embeddings/NNNNN.parquet`` (streamed, one shard per chunk of labels) with the
label columns, ``split``, ``n_tokens`` and one fixed-size float32 array per pooling
(``embedding_last``, ``embedding_mean``), and ``OUT/embed.json`` (counts and speed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.pipelines.output import output_folder
from ehrgpt.represent.embed import POOLINGS, embed_ids
from ehrgpt.tasks.history import HistoryStats, build_histories, plan_chunks
from ehrgpt.tasks.labels import Labels, labels_for
from ehrgpt.util.atomic import write_json, write_parquet
from ehrgpt.util.progress import track

EMBEDDINGS = "embeddings"


@dataclass
class EmbedResult:
    """What ``embed`` made: where, how many histories and tokens, how fast."""

    out: Path
    n_rows: int = 0
    n_subjects: int = 0
    n_tokens: int = 0
    seconds: float = 0.0
    history: HistoryStats = field(default_factory=HistoryStats)

    def rows(self) -> list[tuple[str, str]]:
        rate = self.n_rows / max(self.seconds, 1e-9)
        return [
            ("output folder", str(self.out)),
            ("embeddings (label rows)", f"{self.n_rows:,}"),
            ("subjects", f"{self.n_subjects:,}"),
            ("tokens", f"{self.n_tokens:,}"),
            ("histories left-truncated", f"{self.history.truncated:,}"),
            ("labels without a history", f"{self.history.empty:,}"),
            ("seconds", f"{self.seconds:.1f}"),
            ("histories per second", f"{rate:,.1f}"),
        ]


def write_embeddings(
    model,
    tok,
    run_dir: Path,
    labels: Labels,
    folder: Path,
    *,
    token_budget: int = 16384,
    chunk_size: int = 1024,
    progress: bool = True,
) -> EmbedResult:
    """Embed every label row into ``folder/embeddings/*.parquet``; returns the counts."""
    started = time.perf_counter()
    max_len = int(model.config.max_position_embeddings)
    frame = labels.frame.with_row_index("sample_id")
    plan = plan_chunks(run_dir, frame, chunk_size)
    stats = HistoryStats()
    hidden = model.config.hidden_size
    result = EmbedResult(out=folder, history=stats)
    chunks = build_histories(plan, tok, max_len, stats=stats)
    weights = [part.height for _, part in plan]
    for i, hist in enumerate(
        track(chunks, len(plan), "embed", unit="patients", weight=weights, enabled=progress)
    ):
        vectors = embed_ids(model, hist["input_ids"].to_list(), token_budget=token_budget)
        shard = hist.drop("input_ids").with_columns(
            pl.Series(f"embedding_{p}", vectors[p], dtype=pl.Array(pl.Float32, hidden))
            for p in POOLINGS
        )
        write_parquet(Path(folder) / EMBEDDINGS / f"{i:05d}.parquet", shard)
        result.n_rows += shard.height
        result.n_tokens += int(hist["n_tokens"].sum())
    result.n_subjects = labels.frame["subject_id"].n_unique()
    result.seconds = time.perf_counter() - started
    return result


def read_embeddings(folder: Path, pooling: str = "last") -> tuple[pl.DataFrame, np.ndarray]:
    """The label columns and the [N, hidden] matrix of one pooling, in sample order."""
    frame = pl.read_parquet(sorted((Path(folder) / EMBEDDINGS).glob("*.parquet"))).sort("sample_id")
    matrix = frame[f"embedding_{pooling}"].to_numpy().astype(np.float32)
    return frame.drop([f"embedding_{p}" for p in POOLINGS]), matrix


def embed(
    model_dir: Path,
    run_dir: Path,
    out: Path,
    *,
    labels: Path | None = None,
    task: str | None = None,
    token_budget: int = 16384,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbedResult:
    """Embed the histories of ``labels`` (or of ``task``'s) with the model of ``model_dir``."""
    from ehrgpt.pipelines.generate import load_model

    model, tok = load_model(Path(model_dir))
    found = labels_for(Path(run_dir), task=task, labels=labels)
    with output_folder(Path(out), overwrite=overwrite) as tmp:
        result = write_embeddings(
            model,
            tok,
            Path(run_dir),
            found,
            tmp,
            token_budget=token_budget,
            chunk_size=chunk_size,
            progress=progress,
        )
        summary = {k: v for k, v in asdict(result).items() if k != "out"}
        write_json(tmp / "embed.json", {**summary, "model": str(model_dir)})
    result.out = Path(out)
    return result
