"""The ``ehrgpt`` command: one subcommand per stage, each a thin wrapper over the function of
its module in :mod:`ehrgpt.pipelines`.

This module is click only: one group, one ``--config`` (a TOML file, keys named like the
options with underscores; options given on the command line win), one error handler (an
:class:`~ehrgpt.errors.EhrgptError` becomes ``error: ...`` and exit code 2) and one summary
renderer (:func:`render_summary` over a result's ``rows()``). ``python -m ehrgpt`` and
``torchrun -m ehrgpt train|generate`` run the same group.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ehrgpt import __version__
from ehrgpt.errors import EhrgptError
from ehrgpt.presets import preset_names
from ehrgpt.tokenizer.time_tokens import SCHEMES
from ehrgpt.util.config import read_config
from ehrgpt.util.seeding import rank

console = Console(stderr=False)
err_console = Console(stderr=True)


_CONFIG_PATH = "ehrgpt.config_path"


def _load_config(ctx: click.Context, _param, value: str | None):
    if value:
        try:
            data = read_config(Path(value))
        except EhrgptError as exc:
            raise click.BadParameter(str(exc)) from None
        ctx.default_map = {**(ctx.default_map or {}), **data}
        ctx.meta[_CONFIG_PATH] = Path(value)
    return value


config_option = click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with option values (command-line options win).",
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EhrgptError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ehrgpt")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def main(verbose: bool) -> None:
    """ehrgpt: CEHR-GPT for OMOP CDM and MEDS data."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )


def render_summary(title: str, result) -> Table:
    """The end-of-command table: the ``(what, value)`` pairs of ``result.rows()``."""
    table = Table(title=f"{title}: summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in result.rows():
        table.add_row(what, value)
    return table


def _show(title: str, result) -> None:
    """Print a command's data-quality report if it has one, then its summary (rank 0 only
    under torchrun)."""
    if rank() == 0:
        quality = getattr(result, "quality", None)
        if quality is not None:
            quality.render(console)
        console.print(render_summary(title, result))


def _was_given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` came from the command line or the config file."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT",)


def _run_prepare(**kwargs) -> None:
    from ehrgpt.pipelines.prepare import prepare

    _show("prepare", prepare(**kwargs))


@main.command("prepare")
@config_option
@click.option(
    "--source",
    default="eunomia",
    show_default=True,
    help="'eunomia', a DuckDB file, a folder of OMOP CSV/parquet tables, a PostgreSQL "
    "URL (postgresql://user@host:port/db?schema=cdm) or a MEDS 0.4 folder.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to create.",
)
@click.option(
    "--att-scheme",
    type=click.Choice(SCHEMES),
    default=None,
    help="How gaps between visits become tokens [default: day, or the scheme of --vocab-from].",
)
@click.option(
    "--min-prevalence",
    type=float,
    default=0.001,
    show_default=True,
    help="Share of training patients a code needs to enter the vocabulary.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subject split.")
@click.option(
    "--shard-size", type=int, default=20_000, show_default=True, help="Subjects per MEDS shard."
)
@click.option(
    "--vocab-from",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="A run folder (or tokenizer folder) whose vocabulary is expanded, old ids kept.",
)
@click.option(
    "--meds-visit-rule",
    default="day",
    show_default=True,
    help="For MEDS data without visit_id: 'day' or 'hours:N'.",
)
@click.option(
    "--memory-limit",
    default="4GB",
    show_default=True,
    help="Memory the whole run may use (all workers); shard count and DuckDB's memory follow, "
    "and a run that cannot fit stops before it starts.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Run the shards on local processes or on a Ray cluster (pip install 'ehrgpt[ray]').",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Processes (local) or Ray CPUs [default: all cores that fit in --memory-limit].",
)
@click.option(
    "--ray-address",
    default=None,
    help="An existing Ray cluster ('auto', 'ray://host:10001'); none starts a local one.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue a crashed run of the same command from its finished shards (kept in "
    ".OUT.partial beside --out); without it such a folder is removed first.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only on success).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def prepare_cmd(no_progress: bool, **kwargs) -> None:
    """Turn OMOP or MEDS data into a MEDS dataset, a vocabulary and tokenized timelines."""
    _run_prepare(progress=not no_progress, **kwargs)


def _with(options):
    def wrap(f):
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


#: How tokens are drawn: ``generate`` and ``zeroshot``.
_sampling_opts = [
    click.option("--temperature", type=float, default=1.0, show_default=True),
    click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
    click.option("--top-p", type=float, default=1.0, show_default=True),
]


@main.command("demo")
@config_option
@click.option(
    "--out",
    default=Path("runs/demo"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Demo run folder (replaced on each run).",
)
@click.option(
    "--steps",
    type=int,
    default=None,
    help="Training steps of the tiny model (default: ehrgpt.pipelines.demo.DEMO_STEPS).",
)
@click.option("--patients", type=int, default=None, help="Synthetic patients (default: 200).")
@click.option("--samples", type=int, default=None, help="Zero-shot futures per label (default 20).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo_cmd(
    out: Path,
    steps: int | None,
    patients: int | None,
    samples: int | None,
    seed: int,
    no_progress: bool,
) -> None:
    """The whole chain on the bundled Eunomia data: prepare, train, GI-bleed labels, probe,
    zero-shot and count baseline, generate, evaluate.

    RUN/prepared (MEDS, vocabulary, tokens), RUN/model (a tiny CEHR-GPT), RUN/gi_bleed (labels,
    probe, zeroshot), RUN/synthetic (synthetic patients as MEDS and as an OMOP CDM DuckDB file),
    RUN/evaluation (report.html).
    """
    from ehrgpt.pipelines import demo as d

    result = d.demo(
        out,
        steps=steps or d.DEMO_STEPS,
        patients=patients or d.DEMO_PATIENTS,
        samples=samples or d.DEMO_SAMPLES,
        seed=seed,
        progress=not no_progress,
        stage=console.rule,
        show=_show,
    )
    console.print(render_summary("demo", result))


@main.command("generate")
@config_option
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A model folder (ehrgpt train output).",
)
@click.option(
    "--n", "--num-patients", "n", type=int, required=True, help="How many patients to generate."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (OUT/meds, and OUT/omop* for OMOP formats).",
)
@click.option(
    "--format",
    "fmt",
    default="meds",
    show_default=True,
    help="meds, omop-duckdb, omop-parquet, omop-csv, or a postgresql:// URL "
    "(?schema=...). MEDS is always written too.",
)
@_with(_sampling_opts)
@click.option(
    "--max-tokens-per-patient",
    "--max-new-tokens",
    "max_tokens_per_patient",
    type=int,
    default=None,
    help="Token budget per patient over all context windows (the grammar ends every patient "
    "within it); default: one more than the training data's longest record, else 4 contexts. "
    "--max-new-tokens is an alias.",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--chunk-size",
    type=int,
    default=1000,
    show_default=True,
    help="Patients per written chunk (what --resume keeps after an interruption).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--prompts-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Prepared run whose training demographics seed the prompts "
    "(default: saved with the model, or its training data).",
)
@click.option("--year", type=int, default=None, help="Calendar year of the first visit.")
@click.option("--age", default=None, help="Age at the first visit: 65 or a range 60-70.")
@click.option("--gender", default=None, help="F, M, or a GENDER/<concept_id> code.")
@click.option("--no-grammar", is_flag=True, help="Sample without the timeline grammar.")
@click.option(
    "--id-offset",
    type=int,
    default=None,
    help="First synthetic person id (default: above the largest id of the training data and "
    "of the OMOP target, below 2**31).",
)
@click.option("--resume", is_flag=True, help="Finish an interrupted run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def generate_cmd(
    model_dir: Path,
    n: int,
    out: Path,
    fmt: str,
    temperature: float,
    top_k: int,
    top_p: float,
    max_tokens_per_patient: int | None,
    batch_size: int,
    chunk_size: int,
    seed: int,
    prompts_from: Path | None,
    year: int | None,
    age: str | None,
    gender: str | None,
    no_grammar: bool,
    id_offset: int | None,
    resume: bool,
    overwrite: bool,
    no_progress: bool,
) -> None:
    """Generate synthetic patients and write them as MEDS and OMOP CDM tables."""
    from ehrgpt.generation.engine import SamplingConfig
    from ehrgpt.pipelines.generate import generate

    sampling = SamplingConfig(
        max_tokens_per_patient=max_tokens_per_patient,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        grammar=not no_grammar,
    )
    try:
        sampling.check()
    except ValueError as exc:
        raise EhrgptError(f"sampling options: {exc}.") from None
    result = generate(
        model_dir,
        n,
        out,
        fmt=fmt,
        sampling=sampling,
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
        progress=not no_progress,
    )
    _show("generate", result)


@main.command("train")
@config_option
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Run folder made by `ehrgpt prepare` (RUN/tokenizer, RUN/tokenized).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=True, path_type=Path),
    help="Model folder to write (resumed if it holds checkpoints).",
)
@click.option(
    "--preset",
    type=click.Choice(preset_names()),
    default="tiny",
    show_default=True,
    help="Model size and training defaults.",
)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: epochs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of init and data order.")
@click.option(
    "--init-from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue pretraining this model folder (data prepared with --vocab-from).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--overwrite", is_flag=True, help="Start again instead of resuming an existing --out."
)
@click.pass_context
def train_cmd(
    ctx: click.Context,
    data: Path,
    out: Path,
    preset: str,
    max_steps: int | None,
    seed: int,
    init_from: Path | None,
    no_progress: bool,
    overwrite: bool,
) -> None:
    """Pretrain a CEHR-GPT model on a prepared run; resumes from the latest checkpoint.

    --config may also hold model fields (hidden_size ...) and training fields (lr,
    tokens_per_row, eval_every ...), top-level or in [model] / [train] tables.
    Works alone or under `torchrun --nproc_per_node=N -m ehrgpt train ...` (data parallel).
    """
    from ehrgpt.pipelines.train import train

    result = train(
        data,
        out,
        # None lets the settings file choose (train() reads it); given options win.
        preset=preset if _was_given(ctx, "preset") else None,
        config_file=ctx.meta.get(_CONFIG_PATH),
        max_steps=max_steps,
        seed=seed if _was_given(ctx, "seed") else None,
        init_from=init_from,
        resume=not overwrite,
        progress=not no_progress,
    )
    _show("train", result)


# -- representation: labels, embed, probe, baseline, finetune ------------------------------


_data_opt = click.option(
    "--data",
    "run_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Prepared run folder.",
)
_model_opt = click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model folder.",
)
_out_opt = click.option("--out", required=True, type=click.Path(path_type=Path))
_task_opt = click.option("--task", default=None, help="Shipped task name or ACES YAML path.")
_labels_opt = click.option(
    "--labels",
    default=None,
    type=click.Path(exists=True, path_type=Path),
    help="MEDS label parquet file or folder (instead of --task).",
)
_common_opts = [
    click.option("--n-boot", type=int, default=1000, show_default=True, help="Bootstrap draws."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--overwrite", is_flag=True, help="Replace --out."),
]


@main.command("labels")
@config_option
@_data_opt
@click.option("--task", required=True, help="Shipped task name or ACES YAML path.")
@_out_opt
@click.option("--overwrite", is_flag=True, help="Replace --out.")
def labels_cmd(run_dir: Path, task: str, out: Path, overwrite: bool) -> None:
    """Run an ACES task on a prepared run; write MEDS labels per split."""
    from ehrgpt.pipelines.labels import make_labels

    result = make_labels(run_dir, task, out, overwrite=overwrite)
    _show("labels", result)


@main.command("embed")
@config_option
@_model_opt
@_data_opt
@_labels_opt
@_task_opt
@_out_opt
@click.option(
    "--token-budget",
    type=int,
    default=16384,
    show_default=True,
    help="Tokens per batch (rows x longest history).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def embed_cmd(no_progress: bool, **kwargs) -> None:
    """One embedding per label row (last-token and mean pooling), as parquet shards."""
    from ehrgpt.pipelines.embed import embed

    result = embed(
        kwargs.pop("model_dir"),
        kwargs.pop("run_dir"),
        kwargs.pop("out"),
        progress=not no_progress,
        **kwargs,
    )
    _show("embed", result)


@main.command("probe")
@config_option
@_model_opt
@_data_opt
@_task_opt
@_labels_opt
@_out_opt
@click.option("--pooling", type=click.Choice(["mean", "last"]), default="mean", show_default=True)
@click.option("--demographics", is_flag=True, help="Add age, gender and race to the features.")
@click.option("--fewshot", is_flag=True, help="Run the EHRSHOT few-shot protocol and plot it.")
@click.option("--no-baseline", is_flag=True, help="Skip the count baseline.")
@_with(_common_opts)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def probe_cmd(
    model_dir: Path, run_dir: Path, out: Path, no_baseline: bool, no_progress: bool, **kwargs
) -> None:
    """Linear probe (and LightGBM) on embeddings, held_out metrics beside the count baseline."""
    from ehrgpt.pipelines.probe import probe

    result = probe(
        model_dir, run_dir, out, baseline=not no_baseline, progress=not no_progress, **kwargs
    )
    _show("probe (held_out)", result)


@main.command("zeroshot")
@config_option
@_model_opt
@_data_opt
@click.option("--task", required=True, help="Shipped task name or ACES YAML path.")
@_labels_opt
@_out_opt
@click.option("--samples", type=int, default=20, show_default=True, help="Futures per label.")
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="Tokens per future before it counts as unresolved (default: the model's context).",
)
@click.option(
    "--unresolved",
    type=click.Choice(["no-hit", "extend"]),
    default="no-hit",
    show_default=True,
    help="Unresolved futures count as no hit, or get more tokens (up to --extend-cap).",
)
@click.option("--extend-cap", type=int, default=None, help="Token cap of --unresolved extend.")
@_with(_sampling_opts)
@click.option(
    "--split",
    type=click.Choice(["held_out", "tuning", "train", "all"]),
    default="held_out",
    show_default=True,
    help="Labels to predict.",
)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Futures at once.")
@click.option(
    "--probe",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="An ehrgpt probe output folder of the same task, shown beside.",
)
@click.option("--no-baseline", is_flag=True, help="Skip the count baseline.")
@_with(_common_opts)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def zeroshot_cmd(
    model_dir: Path, run_dir: Path, out: Path, no_baseline: bool, no_progress: bool, **kwargs
) -> None:
    """Zero-shot risks from sampled futures; metrics, calibration plot, count baseline."""
    from ehrgpt.pipelines.zeroshot import zeroshot

    result = zeroshot(
        model_dir, run_dir, out, baseline=not no_baseline, progress=not no_progress, **kwargs
    )
    _show("zero-shot", result)


@main.command("baseline")
@config_option
@_data_opt
@_task_opt
@_labels_opt
@_out_opt
@_with(_common_opts)
def baseline_cmd(run_dir: Path, out: Path, **kwargs) -> None:
    """Count-feature baseline (LightGBM and logistic regression), held_out metrics."""
    from ehrgpt.pipelines.baseline import baseline

    _show("baseline (held_out)", baseline(run_dir, out, **kwargs))


@main.command("finetune")
@config_option
@_model_opt
@_data_opt
@_task_opt
@_labels_opt
@_out_opt
@click.option("--max-len", type=int, default=256, show_default=True, help="History tokens kept.")
@click.option("--max-epochs", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--no-baseline", is_flag=True, help="Skip the count baseline.")
@_with(_common_opts)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def finetune_cmd(
    model_dir: Path,
    run_dir: Path,
    out: Path,
    max_epochs: int,
    lr: float,
    seed: int,
    no_baseline: bool,
    no_progress: bool,
    **kwargs,
) -> None:
    """Fine-tune the model with a classification head; held_out metrics beside the baseline."""
    from ehrgpt.pipelines.finetune import finetune
    from ehrgpt.represent.finetune import FinetuneConfig

    config = FinetuneConfig(max_epochs=max_epochs, lr=lr, seed=seed)
    result = finetune(
        model_dir,
        run_dir,
        out,
        config=config,
        baseline=not no_baseline,
        progress=not no_progress,
        **kwargs,
    )
    _show("finetune (held_out)", result)


@main.command("evaluate")
@config_option
@click.option(
    "--real",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Prepared run (RUN/meds with train and held_out splits) or a MEDS folder.",
)
@click.option(
    "--synthetic",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="ehrgpt generate output, a MEDS folder, or an OMOP CDM (DuckDB file or table folder).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write report.html and metrics.json into.",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    default=("gi_bleed",),
    show_default=True,
    help="Utility task: a shipped task name or an ACES YAML path; repeatable (the first gives "
    "the headline TSTR and TRTR).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out (only on success).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def evaluate_cmd(no_progress: bool, tasks: tuple[str, ...], **kwargs) -> None:
    """Fidelity, utility and privacy of synthetic patients: OUT/report.html, OUT/metrics.json."""
    from ehrgpt.pipelines.evaluate import evaluate

    _show("evaluate", evaluate(tasks=tasks, progress=not no_progress, **kwargs))


if __name__ == "__main__":  # pragma: no cover
    main()
