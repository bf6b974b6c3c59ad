"""Settings for the Snakemake process itself when it plans a large DAG.

Planning 10,000 shards makes Snakemake build about five million Python objects (jobs,
their files, wildcards, params). CPython's cyclic garbage collector handles such a heap
badly in two places, and neither has anything to do with the workflow's outputs:

- while the DAG grows, a full collection runs whenever the old generation has grown by a
  quarter, so the whole heap is traversed again and again (about 11 s of a 10,000-shard
  dry run on the development machine);
- at exit, the interpreter runs one more full collection over the whole heap before it
  tears it down (about 12 s there), after Snakemake has already printed its summary.

Young-generation collections, which catch nearly all short-lived cycles, are left as
they are, so peak memory does not grow (benchmarks/dag.py measures both).

Snakemake also checks, for every job that has to run, that its rule's ``script:`` can be
read: it formats the script's path and reads the whole file through its source cache,
once per job (2.0 of the 13.3 CPU seconds of a 2,000-shard dry run;
``benchmarks/dag_profile.py`` shows it). ``check_scripts_once_per_rule`` makes that check
once per rule when the path has no wildcards or params in it, which is all of vlmflow's
rules.
"""

from __future__ import annotations

import atexit
import gc
import warnings
from typing import Any

# The Snakemake versions whose ScriptProcessor check_scripts_once_per_rule was written for
# and tested on (tests/test_planning.py runs it on the pinned one).
SUPPORTED_SNAKEMAKE = "9.19 to 9.x"

# The old generation is considered for collection every this many young-generation-1
# collections (CPython's default is 10). 1,000 means roughly once per seven million net
# allocations: at most a few full collections while a 50,000-job DAG is built.
OLD_GENERATION_THRESHOLD = 1000


def relax_garbage_collector() -> None:
    """Fewer full collections while planning, none over the planned DAG at exit.

    Call once from the Snakefile. Idempotent: the exit hook is registered only once.
    """
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, max(old, OLD_GENERATION_THRESHOLD))
    # Unregistering first keeps a second call (a Snakefile included twice, tests) from
    # registering the hook twice.
    atexit.unregister(gc.freeze)
    # Exit hooks run last-registered first, so this runs before the interpreter's final
    # collection: everything alive at exit moves to the permanent generation, which that
    # collection skips. Snakemake has by then released its locks and closed its logs
    # itself; it does not rely on the collector for that.
    atexit.register(gc.freeze)


def check_scripts_once_per_rule() -> bool:
    """Check a rule's script once per DAG instead of once per job. Returns whether the
    check was changed (False when this Snakemake has no such check to change).

    Snakemake's ScriptProcessor (snakemake.dag) verifies, after the DAG is built, that
    the script of every job that has to run exists, by reading it. A script path without
    ``{`` is the same file for every job of a rule, so the result for the first job holds
    for the rest; paths with wildcards or params are still checked job by job, and
    notebooks go through the same code. Nothing else changes: which jobs run, the code
    Snakemake records for reruns, and what a job executes are decided elsewhere.

    Call once from the Snakefile. Idempotent. Where this Snakemake has no such check (it
    came with 9.19), it warns once, naming itself, and changes nothing.
    """
    try:
        from snakemake.dag import ScriptProcessor
    except ImportError:
        return _cannot_apply("snakemake.dag has no ScriptProcessor")
    check = getattr(ScriptProcessor, "process_job", None)
    if check is None or not hasattr(ScriptProcessor, "script_type"):
        return _cannot_apply("ScriptProcessor has no process_job / script_type")
    if getattr(check, "_once_per_rule", False):
        return True

    def process_job(self: Any, job: Any) -> None:
        script_type = self.script_type
        entry = getattr(job.rule, script_type, None)
        if not getattr(job, f"is_{script_type}", False) or entry is None:
            check(self, job)
            return
        entry = str(entry)
        if "{" in entry:  # formatted per job: wildcards or params
            check(self, job)
            return
        checked = self.__dict__.setdefault("_checked_scripts", set())
        key = (job.rule.name, str(job.rule.basedir), entry)
        if key not in checked:
            check(self, job)  # raises WorkflowError when the script cannot be read
            checked.add(key)

    process_job._once_per_rule = True  # type: ignore[attr-defined]
    ScriptProcessor.process_job = process_job
    return True


_warned: set[str] = set()


def _cannot_apply(why: str) -> bool:
    """Warn once that check_scripts_once_per_rule does nothing here; False."""
    if why not in _warned:
        _warned.add(why)
        from importlib.metadata import version

        warnings.warn(
            f"vlmflow.core.planning.check_scripts_once_per_rule does not apply to snakemake "
            f"{version('snakemake')} ({why}; written for snakemake {SUPPORTED_SNAKEMAKE}): "
            "every job's script is checked as Snakemake does, which only slows planning",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
