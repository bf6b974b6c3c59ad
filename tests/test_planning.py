"""The Snakemake process's garbage-collector settings for planning large DAGs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # Only the old generation waits longer; the young ones keep their settings.
        ("700, 10, 10", ["700", "10", "1000"]),
        # A higher old-generation threshold set by the user is kept.
        ("700, 10, 5000", ["700", "10", "5000"]),
    ],
)
def test_the_old_generation_is_collected_rarely(before: str, after: list[str]) -> None:
    out = run_python(
        f"""
        import gc
        gc.set_threshold({before})
        from vlmflow.planning import relax_garbage_collector
        relax_garbage_collector()
        print(*gc.get_threshold())
        """
    )
    assert out.split() == after


def test_what_is_alive_at_exit_is_frozen_before_the_final_collection() -> None:
    # This hook is registered first, so it runs after vlmflow's: it sees the heap as
    # the interpreter's final collection will.
    out = run_python(
        """
        import atexit, gc
        atexit.register(lambda: print("frozen", gc.get_freeze_count(), gc.get_count()[2]))
        from vlmflow.planning import relax_garbage_collector
        relax_garbage_collector()
        relax_garbage_collector()
        planned_jobs = [{"job": n, "files": [str(n)]} for n in range(10_000)]
        """
    )
    word, frozen, old_generation = out.split()
    assert word == "frozen"
    assert int(frozen) > 10_000  # the dicts and lists above, and the rest of the heap
    assert int(old_generation) == 0  # nothing left for the final collection to traverse


def test_without_it_nothing_is_frozen_at_exit() -> None:
    # The test above would pass for the wrong reason if something else froze the heap.
    out = run_python(
        """
        import atexit, gc
        atexit.register(lambda: print(gc.get_freeze_count()))
        planned_jobs = [{"job": n} for n in range(10_000)]
        """
    )
    assert out.split() == ["0"]
