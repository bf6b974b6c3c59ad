"""vlmflow: image URLs in, a trained and evaluated vision-language model out.

The package's folders are its module map (docs/architecture.md): ``stages`` (one rule
family each, meeting through files), ``families`` (model families transformers does not
run as shipped), ``core`` (what they share), ``reporting`` and ``demo``, with ``cli`` and
``checks`` on top. pyproject.toml's import-linter contracts keep the layers.

The import paths from before the folders (``vlmflow.caption``, ``vlmflow.ingest.parts``,
...) still work for this release and name the same module objects: the workflow's
scripts keep them, because Snakemake reruns a script's jobs when the script file changes,
and a results folder made before the move must not rerun. No import path is public.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

__version__ = "0.1.0"

# vlmflow.<old> -> vlmflow.<new>: every module that moved into a folder.
FOLDERS = {
    "core": (
        "answers", "attribute_text", "constrained", "contract", "distributed", "engine",
        "engine_worker", "h5_layout", "io", "logs", "metrics", "models", "planning",
        "progress", "prompts", "shards", "stage_versions", "vision",
    ),
    "families": ("internvl_chat", "meta_llama", "remote_code"),
    "stages": (
        "attributes", "caption", "duplicates", "evaluate", "export", "h5", "h5_shuffle",
        "ingest", "train",
    ),
    "reporting": ("inspect_samples", "plots", "report", "status"),
    "demo": ("demo_models", "miniatures", "shapes"),
}  # fmt: skip
MOVED = {name: f"{folder}.{name}" for folder, names in FOLDERS.items() for name in names}


def moved_to(fullname: str) -> str | None:
    """The module an old import path names now (``vlmflow.ingest.parts`` ->
    ``vlmflow.stages.ingest.parts``); None for a path that did not move."""
    package, _, rest = fullname.partition(".")
    head, _, tail = rest.partition(".")
    if package != __name__ or head not in MOVED:
        return None
    return f"{__name__}.{MOVED[head]}" + (f".{tail}" if tail else "")


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module at its new one (the same object)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if moved_to(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = moved_to(spec.name)
        assert new is not None
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module ran at its new path."""


# First: below an old package path (vlmflow.ingest is vlmflow.stages.ingest), the path
# finder would load a module a second time under its old name.
if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, MovedModules())
