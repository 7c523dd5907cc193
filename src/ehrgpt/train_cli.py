"""The ``train`` subcommand (added to ``ehrgpt`` in :mod:`ehrgpt.cli`; also ``python -m
ehrgpt.train``, alone or under ``torchrun``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ehrgpt.errors import EhrgptError

PRESET_NAMES = ("tiny", "small", "base")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def summary_table(result) -> Table:
    """The end-of-training summary (the same figures as the model card)."""
    table = Table(title="train: summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for what, value in result.rows():
        table.add_row(what, value)
    return table


def _set(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
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
    type=click.Choice(PRESET_NAMES),
    default="tiny",
    show_default=True,
    help="Model size and training defaults.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML file of settings (model fields like hidden_size, training fields like lr, "
    "tokens_per_row, eval_every; top-level or in [model] / [train] tables). "
    "Command-line options win.",
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
    config_file: Path | None,
    max_steps: int | None,
    seed: int,
    init_from: Path | None,
    no_progress: bool,
    overwrite: bool,
) -> None:
    """Pretrain a CEHR-GPT model on a prepared run; resumes from the latest checkpoint.

    Works alone or under `torchrun --nproc_per_node=N -m ehrgpt.train ...` (data parallel).
    """
    from ehrgpt.train import train

    console = Console()
    try:
        result = train(
            data,
            out,
            # None lets the config file choose (train() reads it); given options win.
            preset=preset if _set(ctx, "preset") else None,
            config_file=config_file,
            max_steps=max_steps,
            seed=seed if _set(ctx, "seed") else None,
            init_from=init_from,
            resume=not overwrite,
            progress=not no_progress,
        )
    except EhrgptError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if _rank() == 0:
        console.print(summary_table(result))


def main() -> None:  # pragma: no cover - thin wrapper
    """Entry point of ``python -m ehrgpt.train``."""
    train_cmd(prog_name="python -m ehrgpt.train")
