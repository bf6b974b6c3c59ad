"""Send a job's Python logging, warnings and progress bars to its Snakemake log file."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def log_to(path: str | Path) -> Iterator[logging.Logger]:
    """Log to ``path`` (and stderr is redirected there too, so tqdm bars land in it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", buffering=1) as handle:
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            with contextlib.redirect_stderr(handle):
                yield logging.getLogger("vlmflow")
        except BaseException:
            logging.getLogger("vlmflow").exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
