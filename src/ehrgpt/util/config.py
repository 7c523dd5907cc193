"""The one reader of TOML config files (``--config FILE``).

Keys are option names with underscores, at the top level or in tables (``[model]``,
``[train]``, ``[generate]`` ...); tables are flattened so every command reads the same file.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "c.toml"
>>> _ = p.write_text('seed = 3\\n[model]\\nhidden_size = 64\\n')
>>> read_config(p)
{'seed': 3, 'hidden_size': 64}
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ehrgpt.errors import EhrgptError


def read_config(path: Path) -> dict[str, Any]:
    """The settings of a TOML file, tables flattened (a clear error if missing or invalid)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EhrgptError(f"The config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise EhrgptError(f"The config file {path} is not valid TOML: {exc}.") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat
