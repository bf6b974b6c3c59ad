"""A dataset's duplicates across shards and, for an eval dataset, its leaks from the train
datasets (see vlmflow.duplicates)."""

from collections import Counter

from vlmflow.contract import read_shard_index, write_duplicates
from vlmflow.duplicates import find_duplicates
from vlmflow.logs import log_to

with log_to(snakemake.log[0]) as log:
    rows = find_duplicates(
        read_shard_index(snakemake.input.stats, "stats"),
        read_shard_index(snakemake.input.train_stats, "stats"),
    )
    write_duplicates(rows, snakemake.output[0])
    log.info("%s", dict(Counter(row["reason"] for row in rows)) or "no duplicates, no leaks")
