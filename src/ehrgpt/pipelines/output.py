"""The output folder of a command: built under a temporary name, renamed into place at the end.

A failed run leaves nothing behind; an existing folder is replaced only with ``overwrite`` and
only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ehrgpt.errors import OutputExistsError
from ehrgpt.util.atomic import replace_folder


@contextlib.contextmanager
def output_folder(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to write into; it becomes ``out`` if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"The output folder {out} already exists; choose another --out or pass --overwrite."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
