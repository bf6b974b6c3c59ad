"""The Snakemake process's settings for large DAGs: the garbage collector, the script check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

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
        from vlmflow.core.planning import relax_garbage_collector
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
        from vlmflow.core.planning import relax_garbage_collector
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


# A workflow that counts how often Snakemake reads a job's script to check it exists
# (snakemake.script.get_source, called by the check vlmflow's patch wraps).
COUNTED_SNAKEFILE = """
import atexit
import snakemake.script
from vlmflow.core.planning import check_scripts_once_per_rule

reads = []
original = snakemake.script.get_source


def counted(path, *args, **kwargs):
    reads.append(str(path))
    return original(path, *args, **kwargs)


snakemake.script.get_source = counted
print("patched", check_scripts_once_per_rule(), check_scripts_once_per_rule())
atexit.register(lambda: print("reads", *sorted(reads)))


rule all:
    input:
        expand("plain/{i}.txt", i=range(4)),
        expand("templated/{i}.txt", i=range(3)),


rule plain:
    output:
        "plain/{i}.txt",
    script:
        "scripts/SCRIPT.py"


rule templated:
    output:
        "templated/{i}.txt",
    script:
        "scripts/job{wildcards.i}.py"
"""


def dry_run(tmp_path, script: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "Snakefile").write_text(COUNTED_SNAKEFILE.replace("SCRIPT", script))
    (tmp_path / "scripts").mkdir(exist_ok=True)
    for name in ("plain", "job0", "job1", "job2"):
        (tmp_path / "scripts" / f"{name}.py").write_text("pass\n")
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--quiet", "all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def test_a_rules_script_is_checked_once_and_a_templated_one_per_job(tmp_path) -> None:
    done = dry_run(tmp_path, "plain")
    assert done.returncode == 0, done.stderr
    # The installed Snakemake still has the check the patch replaces (a newer Snakemake
    # without it fails here, so the pin in vlmflow.core.planning gets looked at); the second
    # call leaves the first patch in place.
    assert "patched True True" in done.stdout
    # Four plain jobs, one read; three templated jobs, three reads (three files).
    reads = done.stdout.split("reads")[-1].split()
    assert reads == ["scripts/job{wildcards.i}.py"] * 3 + ["scripts/plain.py"]


def test_a_missing_script_still_fails_the_dry_run_naming_it(tmp_path) -> None:
    done = dry_run(tmp_path, "missing")
    assert done.returncode != 0
    assert "scripts/missing.py" in done.stdout + done.stderr


def test_the_script_check_applies_to_the_pinned_snakemake_and_warns_where_it_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import snakemake.api  # loads snakemake.dag as a Snakemake run does (a bare import cycles)
    import snakemake.dag

    from vlmflow.core import planning

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pinned Snakemake: applies, nothing to warn
        assert planning.check_scripts_once_per_rule()

    class OlderProcessor:  # a Snakemake before 9.19: no per-job script check
        pass

    monkeypatch.setattr(snakemake.dag, "ScriptProcessor", OlderProcessor)
    monkeypatch.setattr(planning, "_warned", set())
    with pytest.warns(RuntimeWarning, match="check_scripts_once_per_rule does not apply"):
        assert not planning.check_scripts_once_per_rule()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not planning.check_scripts_once_per_rule()
