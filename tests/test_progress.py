"""Tests for vlmflow.core.progress: the side file that lets a stopped shard job resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vlmflow.core.progress import ProgressFile, run_batches


def rows(*keys: str) -> list[dict[str, Any]]:
    return [{"key": key, "value": key.upper()} for key in keys]


def test_sigkill_loses_at_most_the_unflushed_batches(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet.progress.jsonl"
    progress = ProgressFile(path, "fp", flush_every=2)
    for batch in (["a", "b"], ["c", "d"], ["e", "f"]):
        progress.add(rows(*batch))
    # SIGKILL now: nothing runs after this point, so the third batch was never written.
    resumed = ProgressFile(path, "fp", flush_every=2)
    assert sorted(resumed.done) == ["a", "b", "c", "d"]
    assert resumed.done["c"] == {"key": "c", "value": "C"}


def test_a_line_cut_short_is_dropped_and_the_file_repaired(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    progress = ProgressFile(path, "fp", flush_every=1)
    progress.add(rows("a"))
    progress.add(rows("b"))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"key": "c", "val')  # killed mid-write
    resumed = ProgressFile(path, "fp", flush_every=1)
    assert sorted(resumed.done) == ["a", "b"]
    resumed.add(rows("c"))
    assert sorted(ProgressFile(path, "fp").done) == ["a", "b", "c"]


def test_other_fingerprint_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    progress = ProgressFile(path, "old settings", flush_every=1)
    progress.add(rows("a"))
    fresh = ProgressFile(path, "new settings", flush_every=1)
    assert fresh.done == {}
    fresh.add(rows("b"))
    assert sorted(ProgressFile(path, "new settings").done) == ["b"]
    assert ProgressFile(path, "old settings").done == {}


def test_run_batches_skips_done_batches_and_keeps_key_order(tmp_path: Path) -> None:
    keys = ["k0", "k1", "k2", "k3", "k4"]
    progress = ProgressFile(tmp_path / "p.jsonl", "fp")
    progress.add(rows("k3", "k1"))  # an earlier attempt did the batch [k3, k1]
    calls: list[list[str]] = []

    def run_batch(indices: list[int]) -> list[dict[str, Any]]:
        calls.append([keys[i] for i in indices])
        return rows(*(keys[i] for i in indices))

    done = run_batches(
        keys,
        2,
        run_batch,
        lambda i, error: {"key": keys[i], "failure": str(error)},
        progress,
        seed=(0,),
        desc="test",
        order=[3, 1, 0, 4, 2],
    )
    assert calls == [["k0", "k4"], ["k2"]]
    assert list(done) == ["k3", "k1", "k0", "k4", "k2"]


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("bad image")])
def test_failing_batches_are_halved_down_to_the_failing_sample(
    tmp_path: Path, error: Exception
) -> None:
    keys = [f"k{i}" for i in range(8)]
    sizes: list[int] = []

    def run_batch(indices: list[int]) -> list[dict[str, Any]]:
        sizes.append(len(indices))
        if len(indices) > 2 or 5 in indices:  # too big for memory, and one bad sample
            raise error
        return rows(*(keys[i] for i in indices))

    done = run_batches(
        keys,
        8,
        run_batch,
        lambda i, err: {"key": keys[i], "failure": f"{type(err).__name__}: {err}"},
        ProgressFile(tmp_path / "p.jsonl", "fp"),
        seed=(0,),
        desc="test",
    )
    assert list(done) == keys
    assert [k for k, row in done.items() if "failure" in row] == ["k5"]
    assert sizes == [8, 4, 2, 2, 4, 2, 1, 1, 2]


def test_read_only_progress_resumes_but_never_writes(tmp_path: Path) -> None:
    """The other ranks of a model-parallel job skip what rank 0 saved, and leave the
    file to rank 0."""
    path = tmp_path / "p.jsonl"
    main = ProgressFile(path, "fp", flush_every=1)
    main.add(rows("a"))
    saved = path.read_bytes()
    other = ProgressFile(path, "fp", flush_every=1, read_only=True)
    assert sorted(other.done) == ["a"]
    other.add(rows("b"))
    other.flush()
    assert sorted(other.done) == ["a", "b"]
    assert path.read_bytes() == saved
    ProgressFile(tmp_path / "new.jsonl", "fp", flush_every=1, read_only=True).add(rows("c"))
    assert not (tmp_path / "new.jsonl").exists()
