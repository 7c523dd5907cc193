"""``ehrgpt generate``: synthetic patients from a trained model, written as MEDS and OMOP CDM.

Patients are generated in chunks: each chunk's prompts go through the
:class:`~ehrgpt.generation.engine.Engine`, each sequence is decoded
(:func:`~ehrgpt.tokenizer.decode.decode_ids`; a random day of the prompt's year starts the
timeline; :func:`~ehrgpt.tokenizer.decode.check_plausible` rejects impossible dates and ages;
numeric values are drawn inside their bin), and the MEDS rows are appended to ``OUT/meds``
by a streaming :class:`~ehrgpt.sinks.meds.MedsWriter`, so memory stays flat however many
patients are asked for. Sequences that do not decode or are not plausible, and prompts the
grammar refuses, are counted by reason and not written.

Identifiers. Synthetic subject ids (and OMOP person ids) are ``id_offset + i`` for patient
``i``. By default ``id_offset`` is one above the largest person id of the training data and of
the OMOP target, so that synthetic and real patients never share an id, and every id stays at
or below 2**31 - 1, which the 32-bit ``integer`` id columns of the official CDM 5.4 DDL hold.
Before anything is generated the run reads the types of the target's id columns and refuses
ids they cannot hold. MEDS visit ids are numbered across the whole synthetic dataset, from above
the training data's visit ids; OMOP visit and event ids continue above the target's largest id
(never 0). The ids chosen are kept in ``OUT/.parts/ids.json`` so that ``--resume`` reuses them.

Under ``torchrun --nproc_per_node=N`` each process takes the patients ``i`` with
``i % N == rank`` into ``OUT/.parts/rank-<r>``; rank 0 then merges the parts into ``OUT/meds``
and writes the OMOP CDM tables (``--format``). ``--resume`` keeps what an interrupted run
finished (complete shards only) and generates the rest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from ehrgpt.errors import EhrgptError, OutputExistsError, SinkError
from ehrgpt.generation.engine import DEFAULT_BUDGET_CONTEXTS, Engine, SamplingConfig
from ehrgpt.generation.prompts import (
    load_demographics,
    parse_age,
    population_prompts,
    user_prompts,
)
from ehrgpt.meds_format.dataset import OMOP_CONCEPTS_FILE
from ehrgpt.sinks.meds import MedsWriter, renumber_visits
from ehrgpt.sinks.omop.events import with_omop_tables
from ehrgpt.sinks.omop.schema import INT32_MAX
from ehrgpt.tokenizer.decode import (
    DecodeError,
    check_plausible,
    day_budget,
    decode_ids,
    timeline_to_meds,
)
from ehrgpt.tokenizer.vocab import EhrTokenizer
from ehrgpt.training import distributed as dist
from ehrgpt.util import atomic
from ehrgpt.util.progress import track
from ehrgpt.util.urls import mask_url

log = logging.getLogger(__name__)
FORMATS = ("meds", "omop-duckdb", "omop-parquet", "omop-csv")
PARTS = ".parts"
#: Written by ``ehrgpt train`` into the model folder: the training data's largest ids.
DATA_IDS_FILE = "data_ids.json"
IDS_FILE = "ids.json"


@dataclass
class IdPlan:
    """The ids of a generation run: subject (person) ids ``id_offset + i``, MEDS visit ids from
    ``visit_id_start``, OMOP visit and event ids from ``first_record_id``."""

    id_offset: int
    visit_id_start: int
    first_record_id: int


@dataclass
class GenerateResult:
    """What a generation run made."""

    out: Path
    requested: int
    written: int
    rejected: dict[str, int] = field(default_factory=dict)
    new_tokens: int = 0
    seconds: float = 0.0
    omop: str | None = None
    id_offset: int = 0
    #: How generated patients ended (before decoding): end, death, budget, context.
    endings: dict[str, int] = field(default_factory=dict)
    shifts: int = 0  # window shifts, all patients
    shifted_patients: int = 0  # patients with at least one window shift
    max_tokens_per_patient: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)

    @property
    def patients_per_minute(self) -> float:
        return 60 * self.written / max(self.seconds, 1e-9)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for the summary table."""
        rejected = ", ".join(f"{k} {v}" for k, v in self.rejected.items()) or "0"
        rows = [
            ("patients asked for", f"{self.requested:,}"),
            ("patients written", f"{self.written:,}"),
            ("rejected (by reason)", rejected),
            ("ended by", self.ending_text()),
            ("window shifts", f"{self.shifts:,} (in {self.shifted_patients:,} patients)"),
            ("budget per patient", f"{self.max_tokens_per_patient:,} tokens"),
            ("generated tokens", f"{self.new_tokens:,}"),
            ("tokens per second", f"{self.tokens_per_second:,.0f}"),
            ("patients per minute", f"{self.patients_per_minute:,.0f}"),
            ("MEDS", str(self.out / "meds")),
        ]
        if self.omop:
            rows.append(("OMOP CDM", self.omop))
        return rows

    def ending_text(self) -> str:
        """``[END] 180, death 2, total budget 18`` (patients, before decoding)."""
        names = {"end": "[END]", "death": "death", "budget": "total budget", "context": "context"}
        parts = [f"{names.get(k, k)} {self.endings[k]:,}" for k in names if self.endings.get(k)]
        return ", ".join(parts) or "0"


def default_budget(data_dir: Path | None, context: int | None) -> int:
    """Tokens per patient when ``--max-tokens-per-patient`` is not given: one more than the
    longest record of the training split when the data is known (so no real-sized patient is
    cut), else 4 contexts."""
    files = sorted((Path(data_dir) / "tokenized" / "train").glob("*.parquet")) if data_dir else []
    if files:
        longest = pl.scan_parquet(files).select(pl.col("n_tokens").max()).collect().item()
        if longest:
            return int(longest) + 1
    return DEFAULT_BUDGET_CONTEXTS * (context or 1024)


def load_model(model_dir: Path):
    """The model and tokenizer of a model folder (``ehrgpt train`` output)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import ehrgpt.model  # noqa: F401  (registers the Auto classes)

    hf_logging.disable_progress_bar()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise EhrgptError(f"{model_dir} holds no model (config.json); train one with ehrgpt train.")
    tok = EhrTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if model.config.vocab_size < len(tok):
        raise EhrgptError(
            f"{model_dir}: the tokenizer has {len(tok)} tokens but the model only "
            f"{model.config.vocab_size}; they do not belong together."
        )
    return model, tok


def _data_dir(model_dir: Path, prompts_from: Path | None) -> Path | None:
    if prompts_from is not None:
        return Path(prompts_from)
    cfg = Path(model_dir) / "train_config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text()).get("data")
        if data and Path(data).exists():
            return Path(data)
    return None


def generate(
    model_dir: Path,
    n: int,
    out: Path,
    *,
    fmt: str = "meds",
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = 1_000,
    prompts_from: Path | None = None,
    year: int | None = None,
    age: str | None = None,
    gender: str | None = None,
    id_offset: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> GenerateResult:
    """Generate ``n`` synthetic patients into ``out`` (see the module docstring)."""
    started = time.perf_counter()
    if fmt not in FORMATS and not fmt.startswith(("postgresql://", "postgres://")):
        raise EhrgptError(f"--format must be one of {', '.join(FORMATS)} or a postgresql:// URL.")
    if n < 1:
        raise EhrgptError("--n must be at least 1.")
    out = Path(out)
    if id_offset is not None and id_offset <= 0:
        raise EhrgptError("--id-offset must be positive (synthetic ids above every real id).")
    if out.exists() and not (resume or overwrite):
        raise OutputExistsError(
            f"The output folder {out} already exists; pass --resume to finish it, --overwrite to "
            "replace it, or choose another --out."
        )
    info = dist.init(device or "auto")
    try:
        result = _generate(
            model_dir,
            n,
            out,
            info,
            fmt=fmt,
            sampling=sampling or SamplingConfig(),
            seed=seed,
            batch_size=batch_size,
            chunk_size=chunk_size,
            prompts_from=prompts_from,
            year=year,
            age=age,
            gender=gender,
            id_offset=id_offset,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            started=started,
        )
    except BaseException:
        dist.shutdown(info, wait=False)
        raise
    dist.shutdown(info)
    return result


def _generate(
    model_dir,
    n,
    out,
    info,
    *,
    fmt,
    sampling,
    seed,
    batch_size,
    chunk_size,
    prompts_from,
    year,
    age,
    gender,
    id_offset,
    resume,
    overwrite,
    progress,
    started,
) -> GenerateResult:
    rank, world = info.rank, info.world_size
    if rank == 0 and overwrite and out.exists() and not resume:
        shutil.rmtree(out)
    dist.barrier(info)
    data_dir = _data_dir(model_dir, prompts_from)
    plan = _id_plan(out, fmt, n, id_offset, data_dir, model_dir) if rank == 0 else None
    plan = dist.broadcast_object(plan, info)
    id_offset = plan.id_offset
    model, tok = load_model(model_dir)
    context = model.config.max_position_embeddings
    if sampling.max_tokens_per_patient is None:
        budget = default_budget(data_dir, context)
        sampling = replace(sampling, max_tokens_per_patient=budget)
    table = load_demographics(model_dir, data_dir, tok)
    if year is None and age is None and gender is None:
        prompts = population_prompts(table, n, tok, seed)
    else:
        prompts = user_prompts(table, n, tok, seed, year=year, age=parse_age(age), gender=gender)

    codes = _codes(model_dir, data_dir, tok)
    part = out / PARTS / f"rank-{rank}"
    writer = MedsWriter(part, codes=codes, dataset_name="ehrgpt-synthetic")
    done = {s - id_offset for s in writer.completed_subjects()}
    mine = [i for i in range(rank, n, world) if i not in done]
    engine = Engine(model, tok, batch_size=batch_size, device=info.device)
    rejected: Counter = Counter()
    endings: Counter = Counter()
    shifted = 0
    chunks = [mine[k : k + chunk_size] for k in range(0, len(mine), chunk_size)]
    for chunk in track(
        chunks,
        len(chunks),
        "Generating",
        unit="patients",
        weight=[len(c) for c in chunks],
        enabled=progress and rank == 0,
    ):
        frames = []
        results = engine.generate(
            [prompts[i] for i in chunk],
            sampling,
            seed=seed * 1_000_003 + chunk[0],
            day_budgets=[_day_budget(prompts[i], tok) for i in chunk],
        )
        for res in results:
            i = chunk[res.index]
            if res.finish == "refused":
                rejected["prompt refused by the grammar"] += 1
                continue
            endings[res.finish] += 1
            shifted += res.shifts > 0
            rng = np.random.default_rng([seed, i])
            try:
                timeline = decode_ids(res.token_ids, tok, rng=rng)
                check_plausible(timeline, tok)
            except DecodeError as exc:
                rejected[exc.reason] += 1
                continue
            except (OverflowError, ValueError):  # dates beyond the calendar
                rejected["date out of range"] += 1
                continue
            frames.append(timeline_to_meds(timeline, tok, id_offset + i, rng=rng))
        if frames:
            writer.write(with_omop_tables(pl.concat(frames), codes))
        writer.flush()
    writer.close()
    stats = {
        "rejected": dict(rejected),
        "new_tokens": engine.stats.new_tokens,
        "endings": dict(endings),
        "shifts": engine.stats.shifts,
        "shifted_patients": shifted,
    }
    atomic.write_json(part / "stats.json", stats)
    dist.barrier(info)
    result = GenerateResult(
        out,
        n,
        0,
        new_tokens=engine.stats.new_tokens,
        id_offset=id_offset,
        max_tokens_per_patient=sampling.max_tokens_per_patient,
    )
    if rank == 0:
        concepts = _omop_concepts(model_dir, data_dir)
        result = _finish(out, world, codes, concepts, fmt, plan, result, progress)
    result.seconds = time.perf_counter() - started
    if rank == 0:
        shutil.rmtree(out / PARTS, ignore_errors=True)
        atomic.write_json(out / "generate_summary.json", asdict(result) | {"out": str(out)})
    return result


def training_max_ids(data_dir: Path | None) -> tuple[int, int] | None:
    """(largest subject id, largest visit id) of a prepared run's MEDS data; None without it."""
    files = sorted((data_dir / "meds" / "data").rglob("*.parquet")) if data_dir else []
    if not files:
        return None
    row = (
        pl.scan_parquet(files)
        .select(pl.col("subject_id").max(), pl.col("visit_id").max())
        .collect()
        .row(0)
    )
    return int(row[0] if row[0] is not None else 0), int(row[1] if row[1] is not None else 0)


def _omop_target(fmt: str, out: Path) -> tuple[str, str] | None:
    """(target, kind) of the OMOP output, or None for MEDS only."""
    if fmt.startswith(("postgresql://", "postgres://")):
        return fmt, "postgresql"
    if fmt == "meds":
        return None
    kind = fmt.removeprefix("omop-")
    return str(out / ("omop.duckdb" if kind == "duckdb" else "omop")), kind


def _id_plan(
    out: Path,
    fmt: str,
    n: int,
    id_offset: int | None,
    data_dir: Path | None,
    model_dir: Path,
) -> IdPlan:
    """The run's ids (see the module docstring): reused from an interrupted run, else chosen
    above the training data and the OMOP target, and checked against the target's id columns
    before anything is generated."""
    from ehrgpt.sinks.omop import OmopWriter

    saved = out / PARTS / IDS_FILE
    if saved.exists():
        plan = IdPlan(**json.loads(saved.read_text()))
        if id_offset is not None and id_offset != plan.id_offset:
            raise EhrgptError(
                f"{out} was started with --id-offset {plan.id_offset}; resume it with that "
                "offset (or without --id-offset), or start over with --overwrite."
            )
        return plan
    data_ids = Path(model_dir) / DATA_IDS_FILE
    if data_ids.exists():
        ids = atomic.read_json(data_ids)
        training = (int(ids["max_subject_id"]), int(ids["max_visit_id"]))
    else:
        training = training_max_ids(data_dir)
    if training is None:
        log.warning(
            "The training data of this model is not found, so synthetic ids cannot be placed "
            "above its ids; give --prompts-from RUN_DIR (the prepared run) or --id-offset."
        )
    max_subject, max_visit = training or (0, 0)
    target = _omop_target(fmt, out)
    max_person, next_record = 0, 1
    writer = None
    if target is not None:
        codes = pl.DataFrame({"code": []}, schema={"code": pl.String})
        writer = OmopWriter(target[0], fmt=target[1], codes=codes, id_offset=0)
    try:
        if writer is not None:
            max_person, next_record = max(writer.max_person_id(), 0), writer.next_id
        chosen = id_offset if id_offset is not None else max(max_subject, max_person) + 1
        last = chosen + n - 1
        if id_offset is None and last > INT32_MAX:
            raise EhrgptError(
                f"Synthetic person ids above the largest real one ({chosen - 1:,}) would reach "
                f"{last:,}, above 2**31 - 1 (what CDM 5.4 integer ids hold); generate fewer "
                "patients or give --id-offset for a target with bigint ids."
            )
        if id_offset is not None and id_offset <= max_subject:
            raise EhrgptError(
                f"--id-offset {id_offset} is not above the largest person id of the training "
                f"data ({max_subject}); synthetic patients would share ids with real ones."
            )
        plan = IdPlan(chosen, max(chosen, max_visit + 1), max(chosen, next_record))
        if writer is not None:
            taken = [p for p in writer.person_ids(chosen) if p <= last]
            if taken:
                raise EhrgptError(
                    f"Person id {min(taken)} is already in {writer.target}; give an "
                    f"--id-offset above {writer.max_person_id()} or write to another target."
                )
            writer.check_ids(last, plan.first_record_id)
    finally:
        if writer is not None:
            writer.close()
    atomic.write_json(saved, asdict(plan))
    return plan


def _day_budget(prompt: list[int], tok: EhrTokenizer) -> int:
    """The day budget of a demographic prompt (``year:Y age:A ...``)."""
    year, age = tok.tokens[prompt[0]], tok.tokens[prompt[1]]
    return day_budget(int(year[5:]), int(age[4:]) if age[4:].isdigit() else None, tok)


def _codes(model_dir: Path, data_dir: Path | None, tok: EhrTokenizer) -> pl.DataFrame:
    """Code metadata for the synthetic MEDS and OMOP output (concept ids, domains)."""
    for folder in (Path(model_dir), *([data_dir / "meds" / "metadata"] if data_dir else [])):
        path = folder / "codes.parquet"
        if path.exists():
            return pl.read_parquet(path)
    return pl.DataFrame({"code": [t for t in tok.tokens]})


def _omop_concepts(model_dir: Path, data_dir: Path | None) -> pl.DataFrame | None:
    """The real OMOP concept rows of the training codes (an OMOP source's vocabulary)."""
    for folder in (Path(model_dir), *([data_dir / "meds" / "metadata"] if data_dir else [])):
        path = folder / OMOP_CONCEPTS_FILE
        if path.exists():
            return pl.read_parquet(path)
    return None


def _finish(
    out: Path,
    world: int,
    codes: pl.DataFrame,
    concepts: pl.DataFrame | None,
    fmt: str,
    plan: IdPlan,
    result: GenerateResult,
    progress: bool,
) -> GenerateResult:
    """Merge the ranks' MEDS parts into OUT/meds (visit ids numbered across the dataset);
    write the OMOP tables if asked."""
    final = out / "meds"
    shutil.rmtree(final, ignore_errors=True)
    writer = MedsWriter(final, codes=codes, dataset_name="ehrgpt-synthetic")
    rejected: Counter = Counter()
    endings: Counter = Counter()
    new_tokens = shifts = shifted = 0
    parts = [out / PARTS / f"rank-{r}" for r in range(world)]
    shards = [s for p in parts for s in sorted((p / "data").rglob("*.parquet"))]
    next_visit = plan.visit_id_start
    for shard in track(shards, len(shards), "Merging", unit="shards", enabled=progress):
        rows, next_visit = renumber_visits(pl.read_parquet(shard), next_visit)
        writer.write(rows)
    summary = writer.close()
    for p in parts:
        stats = json.loads((p / "stats.json").read_text())
        rejected.update(stats["rejected"])
        new_tokens += stats["new_tokens"]
        endings.update(stats.get("endings", {}))
        shifts += stats.get("shifts", 0)
        shifted += stats.get("shifted_patients", 0)
    result.written = summary.n_subjects
    result.rejected = dict(rejected)
    result.endings = dict(endings)
    result.shifts, result.shifted_patients = shifts, shifted
    result.new_tokens = max(result.new_tokens, new_tokens)
    target = _omop_target(fmt, out)
    if target is not None:
        try:
            _write_omop(final, codes, concepts, target, plan, progress)
        except EhrgptError as exc:
            raise SinkError(
                f"{exc} The synthetic MEDS is kept in {final}; run again with --resume to "
                "retry the OMOP output."
            ) from None
        result.omop = target[0] if target[1] != "postgresql" else mask_url(target[0])
    return result


def _write_omop(
    meds_dir: Path,
    codes: pl.DataFrame,
    concepts: pl.DataFrame | None,
    target: tuple[str, str],
    plan: IdPlan,
    progress: bool,
) -> None:
    """Write the synthetic MEDS as OMOP CDM tables; persons already there are skipped.

    Person ids are the MEDS subject ids; visit and event ids start at ``first_record_id`` (or
    above the largest id already in the target). The real concept rows of the training codes
    are copied into a target without a vocabulary.
    """
    from ehrgpt.sinks.omop import OmopWriter

    shards = sorted((meds_dir / "data").rglob("*.parquet"))
    with OmopWriter(
        target[0],
        fmt=target[1],
        codes=codes,
        id_offset=0,
        first_id=plan.first_record_id,
        concept_table=concepts,
    ) as writer:
        done = writer.completed_subjects()
        for shard in track(shards, len(shards), "OMOP", unit="shards", enabled=progress):
            rows = pl.read_parquet(shard)
            if done:
                rows = rows.filter(~pl.col("subject_id").is_in(list(done)))
            if rows.height:
                writer.write(rows)
