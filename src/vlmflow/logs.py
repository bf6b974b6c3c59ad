"""Send a job's Python logging, warnings and progress bars to its Snakemake log file."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
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
        log = logging.getLogger("vlmflow")
        # Where a job ran, and which GPUs Slurm gave it, is the first thing to check.
        log.info(
            "host %s, Slurm job %s, CUDA_VISIBLE_DEVICES=%s",
            socket.gethostname(),
            os.environ.get("SLURM_JOB_ID", "-"),
            os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
        )
        try:
            with contextlib.redirect_stderr(handle):
                yield log
        except BaseException:
            logging.getLogger("vlmflow").exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
