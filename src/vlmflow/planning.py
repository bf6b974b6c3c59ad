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
"""

from __future__ import annotations

import atexit
import gc

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
