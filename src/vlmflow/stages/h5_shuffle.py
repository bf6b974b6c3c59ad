"""Shuffle Cerebras-layout LLaVA HDF5 files across files: a seeded two-pass shuffle.

Per-shard files keep each shard's samples together; a trainer that reads files in turn
(as Cerebras ModelZoo's reader does) then sees one shard's images at a time. This module
redistributes every row of the input files over ``chunks`` output files:

1. each input file in turn: every row is sent to a chunk drawn from a generator seeded
   with (seed, input index), and the rows of each chunk are written to a part file
   ``WORK/INPUT/chunk-C.h5``; a ``done.json`` closes the input (with its size and mtime),
   so a killed run restarts at the first input not done;
2. each chunk: its parts from all inputs are joined, permuted with a generator seeded
   with (seed, chunk), and written as ``OUT/chunk-C.h5``; the output folder appears at
   once when all chunks are written, and the part files are removed.

The multiset of rows (and their image paths) is kept exactly; the same seed and inputs
give the same files. Memory holds one input file or one chunk at a time.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vlmflow.core.h5_layout import write_rows
from vlmflow.core.io import atomic_dir, read_json, write_json
from vlmflow.core.logs import progress_bar

log = logging.getLogger(__name__)


def read_rows(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """``data`` and the decoded ``img_path`` entries of one file."""
    try:
        with h5py.File(path, "r") as f:
            data = f["data"][...]
            paths = [row[0].decode() for row in f["img_path"][...]]
    except (OSError, KeyError) as error:
        raise ValueError(f"{path}: not a LLaVA HDF5 file with data and img_path: {error}") from None
    if data.ndim != 3 or data.shape[1] != 4 or len(paths) != data.shape[0]:
        raise ValueError(
            f"{path}: data has shape {data.shape} and {len(paths)} img_path rows; "
            "expected (n, 4, max_seq_len) and n"
        )
    return data, paths


def _state(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def shuffle_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    chunks: int,
    seed: int,
    work_dir: str | Path | None = None,
) -> list[Path]:
    """Shuffle the rows of ``inputs`` into ``out_dir/chunk-C.h5`` for C < ``chunks``."""
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out.parent / f".{out.name}.parts"
    files = [Path(p) for p in inputs]
    max_seq_len: int | None = None
    for index, path in enumerate(progress_bar(files, desc="shuffle pass 1", unit="file")):
        part = work / f"{index:06d}"
        done = part / "done.json"
        if done.exists() and read_json(done) == {"input": str(path), "state": _state(path)}:
            log.info("pass 1: %s already split", path)
            continue
        data, paths = read_rows(path)
        if max_seq_len is None:
            max_seq_len = int(data.shape[2])
        elif data.shape[2] != max_seq_len:
            raise ValueError(
                f"{path}: max_seq_len {data.shape[2]}, but {files[0]} has {max_seq_len}"
            )
        chunk_of = np.random.default_rng([seed, index]).integers(0, chunks, len(paths))
        part.mkdir(parents=True, exist_ok=True)
        for chunk in range(chunks):
            rows = np.flatnonzero(chunk_of == chunk)
            write_rows(part / f"chunk-{chunk:05d}.h5", data[rows], [paths[i] for i in rows])
        write_json(done, {"input": str(path), "state": _state(path)})
        log.info("pass 1: %s: %d rows over %d chunks", path, len(paths), chunks)

    written = []
    with atomic_dir(out) as tmp:
        for chunk in progress_bar(range(chunks), desc="shuffle pass 2", unit="chunk"):
            pieces = [
                read_rows(work / f"{i:06d}" / f"chunk-{chunk:05d}.h5") for i in range(len(files))
            ]
            data = (
                np.concatenate([p[0] for p in pieces]) if pieces else np.zeros((0, 4, 1), np.int32)
            )
            paths = [path for piece in pieces for path in piece[1]]
            order = np.random.default_rng([seed, len(files), chunk]).permutation(len(paths))
            name = f"chunk-{chunk:05d}.h5"
            write_rows(tmp / name, data[order], [paths[i] for i in order])
            written.append(out / name)
            log.info("pass 2: %s: %d rows", name, len(paths))
    shutil.rmtree(work, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlmflow.stages.h5_shuffle", description=__doc__.splitlines()[0]
    )
    parser.add_argument("inputs", nargs="+", help="LLaVA HDF5 files (Cerebras layout)")
    parser.add_argument("--out", required=True, help="output folder for chunk-C.h5 files")
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shuffle_files(args.inputs, args.out, args.chunks, args.seed)


if __name__ == "__main__":
    main()
