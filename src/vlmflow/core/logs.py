"""Send a job's Python logging, warnings and progress bars to its Snakemake log file."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
# In a log file a bar is a line every so often, not a redraw 10 times a second.
LOG_FILE_INTERVAL_S = 30.0


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


class _OneLinePerUpdate:
    """A stream for tqdm that writes each refresh as its own line: tqdm redraws with
    carriage returns, which a log file turns into one endless line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
) -> tqdm[T]:
    """A tqdm bar on stderr (the job's log inside ``log_to``): redrawn in place on a
    terminal, a line every 30 s (and at the end) in a file."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable)
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        initial=initial,
        disable=disable,
        file=_OneLinePerUpdate(stream),
        mininterval=LOG_FILE_INTERVAL_S,
        ascii=True,
        ncols=100,
    )
