"""Compare two runs' results/ folders: the same rows in every parquet, json, jsonl and tsv
file, the same members in every tar and the same arrays in every HDF5 file.

Used to show that a change of structure changed no output (docs/testing.md):

    .venv/bin/python -m tests.compare_results BEFORE/results AFTER/results

Timings (``tokens_per_s`` and Snakemake's benchmark tables) and the report's pages and
figures are not compared. Prints one line per difference and exits 1 if there is any.
"""

from __future__ import annotations

import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Timings, and the datasets library's fingerprint of the code that built a folder.
TIMINGS = frozenset({"tokens_per_s", "_fingerprint"})
SKIPPED_PARTS = frozenset({"benchmarks", "report"})
SKIPPED_SUFFIXES = frozenset({".png", ".html", ".log", ".lock"})


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def h5_arrays(path: Path) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
        arrays["attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
    return arrays


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def content(path: Path) -> Any:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        return without_timings(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix == ".jsonl":
        return [without_timings(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".h5":
        return h5_arrays(path)
    if path.suffix == ".tar":
        return tar_members(path)
    if path.suffix == ".arrow":  # a datasets folder's rows
        with pa.ipc.open_stream(path) as reader:
            return reader.read_all().to_pylist()
    return path.read_bytes()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def compared_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or SKIPPED_PARTS & set(relative.parts):
            continue
        if path.suffix in SKIPPED_SUFFIXES:
            continue
        yield relative


def differences(before: Path, after: Path) -> Iterator[str]:
    old, new = set(compared_files(before)), set(compared_files(after))
    for relative in sorted(old ^ new):
        yield f"only in {'before' if relative in old else 'after'}: {relative}"
    for relative in sorted(old & new):
        if not same(content(before / relative), content(after / relative)):
            yield f"differs: {relative}"


def main(argv: list[str]) -> int:
    before, after = (Path(arg) for arg in argv)
    found = list(differences(before, after))
    for line in found:
        print(line)
    print(f"{len(list(compared_files(before)))} files compared, {len(found)} differences")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
