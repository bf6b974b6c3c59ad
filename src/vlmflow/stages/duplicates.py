"""Duplicates across shards, and eval images that leak from the train datasets.

Ingest drops a repeated key or URL *within* a shard. Across shards it cannot (a shard's
outputs depend only on its own rows), so this step runs after ingest, once per dataset,
on the shards' stats files, which list each stored image's key, URL and digest (the
bytes after decode and re-encode: the same picture under two URLs has one digest):

* ``duplicate``: an image whose key, URL or digest an earlier sample of the dataset has
  (earlier: by shard, then row; the first one stays);
* ``leak``: an image of an eval dataset whose URL or digest is in a train dataset.

The result, ``results/{dataset}/duplicates.tsv``, is read by the funnel (counted in
the report), the exports and eval (left out of both). The H5 files keep them: each
shard is packed on its own, and a shard's H5 file must not change when another shard
is added.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmflow.core.contract import DuplicatesError
from vlmflow.core.io import image_digest, read_json
from vlmflow.core.shards import iter_samples

STATS_SUFFIX = ".stats.json"


@dataclass(frozen=True)
class Stored:
    """One image a shard stored."""

    key: str
    url: str
    digest: str
    shard: str


def stored_images(stats_path: str | Path) -> Iterator[Stored]:
    """The images of one shard, in row order, from its stats json.

    A stats file written before the digests were recorded is read from its tar instead.
    """
    path = Path(stats_path)
    try:
        stats = read_json(path)
        shard = str(stats["shard"])
        images = stats.get("images")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DuplicatesError(f"{path}: not a readable ingest stats file: {exc!r}") from None
    if images is None:
        yield from _from_tar(path, shard)
        return
    for entry in images:
        try:
            key, url, digest = (str(value) for value in entry)
        except (TypeError, ValueError):
            raise DuplicatesError(
                f"{path}: field images: expected [key, url, digest] entries, got {entry!r}"
            ) from None
        yield Stored(key, url, digest, shard)


def _from_tar(stats_path: Path, shard: str) -> Iterator[Stored]:
    tar = stats_path.with_name(stats_path.name.removesuffix(STATS_SUFFIX) + ".tar")
    for sample in iter_samples(tar):
        url = str(sample.meta.get("url", ""))
        yield Stored(sample.key, url, image_digest(sample.image_data), shard)


def find_duplicates(
    stats_paths: Sequence[str | Path], train_stats_paths: Sequence[str | Path] = ()
) -> list[dict[str, str]]:
    """A row (key, shard, reason, detail) per duplicate or leaked image of a dataset.

    ``stats_paths``: the dataset's shards in order; ``train_stats_paths``: those of the
    train datasets, for an eval dataset (empty for a train dataset).
    """
    train_urls: dict[str, Stored] = {}
    train_digests: dict[str, Stored] = {}
    for image in _all(train_stats_paths):
        train_urls.setdefault(image.url, image)
        train_digests.setdefault(image.digest, image)
    seen_keys: dict[str, Stored] = {}
    seen_urls: dict[str, Stored] = {}
    seen_digests: dict[str, Stored] = {}
    rows = []
    for image in _all(stats_paths):
        leak = _match(image, train_urls, train_digests)
        earlier = _match(image, seen_urls, seen_digests)
        if earlier is None and image.key in seen_keys:
            earlier = seen_keys[image.key], "same key"
        if leak is not None:
            rows.append(_row(image, "leak", f"{leak[1]} of train image {leak[0].key}"))
        elif earlier is not None:
            rows.append(_row(image, "duplicate", f"{earlier[1]} as {earlier[0].key}"))
        if earlier is None:
            seen_keys[image.key] = image
            seen_urls.setdefault(image.url, image)
            seen_digests.setdefault(image.digest, image)
    return rows


def _all(paths: Iterable[str | Path]) -> Iterator[Stored]:
    for path in paths:
        yield from stored_images(path)


def _match(
    image: Stored, urls: dict[str, Stored], digests: dict[str, Stored]
) -> tuple[Stored, str] | None:
    if image.url and image.url in urls:
        return urls[image.url], "same URL"
    if image.digest in digests:
        return digests[image.digest], "same image"
    return None


def _row(image: Stored, reason: str, detail: str) -> dict[str, str]:
    return {"key": image.key, "shard": image.shard, "reason": reason, "detail": detail}
