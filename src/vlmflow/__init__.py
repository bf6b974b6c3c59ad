"""vlmflow: image URLs in, a trained and evaluated vision-language model out.

Stage modules (``ingest``, ``caption``, ``attributes``, ``h5``, ``train``, ``evaluate``,
``export``, ``duplicates``) each implement one rule family and meet through files; they
import the shared modules, never each other. Shared: ``contract`` (where shard outputs
are and how samples are counted), ``h5_layout`` (the HDF5 rows), ``vision`` (images as
the vision tower sees them), ``prompts``, ``models`` (loading), ``io`` (atomic writes),
``shards`` (reading WebDataset shards). docs/architecture.md has the module map.
"""

__version__ = "0.1.0"
