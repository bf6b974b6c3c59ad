"""The shared core: what every stage and report builds on.

The file contract (paths, indexes, the key-to-shard tables), atomic writes, shards,
the H5 row layout, image loading, prompts, model references and loading, the vLLM engine,
progress and logs, answer parsing, the metric, json mode, planning patches and stage
versions. The core imports nothing of vlmflow outside it (import-linter: pyproject.toml).
"""
