"""Registration of the ehrgpt model with Hugging Face's Auto classes, on ``import ehrgpt``.

``import ehrgpt`` followed by ``AutoModelForCausalLM.from_pretrained(MODEL_DIR)`` must work,
yet the CLI should not pay for importing torch and transformers when a command does not need
them (``ehrgpt --help``, ``ehrgpt prepare``). So :func:`register_on_import` registers at once
when transformers is already imported, and otherwise the moment it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys


def _register() -> None:
    import ehrgpt.model  # noqa: F401  (its modeling module calls the Auto*.register functions)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when ``transformers`` is imported, registers right after it."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_on_import() -> None:
    """Register now if transformers is loaded, else as soon as it is."""
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
