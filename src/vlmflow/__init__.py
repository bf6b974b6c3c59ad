"""vlmflow: image URLs in, a trained and evaluated vision-language model out.

Each stage lives in its own module (``ingest``, ``caption``, ``attributes``, ``h5``,
``train``, ``evaluate``); stages never import each other and meet through files.
Shared helpers sit in ``io`` (atomic writes, shard readers) and ``models`` (loading
and building models).
"""

__version__ = "0.1.0"
