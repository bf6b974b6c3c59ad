"""The ingest settings, its errors and the per-row failure every ingest step reports."""

from __future__ import annotations

import dataclasses
import ipaddress
import warnings
from dataclasses import dataclass
from typing import Any

from vlmflow.core.errors import ConfigError
from vlmflow.stages.ingest.resize import Resize, resize_from_settings

# Fields this stage writes into {key}.json; extra columns with these names get a prefix.
RESERVED_FIELDS = frozenset(
    {"key", "url", "caption", "row", "width", "height", "original_width", "original_height"}
)


# Tar member extension -> Pillow format name.
ENCODE_FORMATS = {"jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class IngestSettings:
    url_column: str = "url"
    caption_column: str = "caption"
    key_column: str | None = None  # None: key = sha1(url) hex [:16]
    # img2dataset's resize vocabulary (vlmflow.stages.ingest.resize says what each mode does):
    # keep_ratio (shorter side = image_size), keep_ratio_largest, center_crop, border, no.
    resize_mode: str = "keep_ratio_largest"
    image_size: int | None = None  # None: vlmflow.stages.ingest.resize.DEFAULT_IMAGE_SIZE
    resize_only_if_bigger: bool = True  # never enlarge (img2dataset's default is false)
    max_side: int | None = None  # image_size's earlier name: one more release, with a warning
    min_side: int = 8  # shorter side (before resize) below this -> failure "too_small"
    encode_format: str = "jpg"  # jpg or webp: the image member's extension in the tar
    jpeg_quality: int = 90
    webp_quality: int = 90
    max_bytes: int = 20_000_000  # response/file larger -> "too_large"
    max_pixels: int = 50_000_000  # decompression-bomb guard -> "too_large"
    timeout_s: float = 10.0  # each attempt, from the request to the last byte of the body
    # A shard's downloads stop after this long: rows not yet downloaded fail as "timeout"
    # (keep it below the profile's runtime for ingest). None: no budget.
    shard_budget_s: float | None = 1500.0
    retries: int = 2  # retries with exponential backoff on timeouts/connection errors/5xx
    threads: int = 8  # downloads in flight
    user_agent: str = "vlmflow/0.1 (image ingest)"
    # Addresses a URL may resolve to although they are loopback, private, link-local
    # (cloud metadata endpoints) or otherwise not public, as CIDRs. Default: none.
    allowed_networks: tuple[str, ...] = ()
    respect_robots_header: bool = True  # X-Robots-Tag noai / noimageai -> "robots"
    # file: URLs and plain paths in a URL list are read only from the list's own folder
    # (relative file: URLs) or under the dataset's image_root; anything else counts as
    # "blocked" unless this says the list is the user's own.
    allow_local_files: bool = False
    resize: Resize = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode is False:
            object.__setattr__(self, "resize_mode", "no")  # YAML reads a bare `no` as false
        try:
            resize, notes = resize_from_settings(
                self.resize_mode, self.image_size, self.max_side, self.resize_only_if_bigger
            )
        except ValueError as exc:
            raise IngestError(str(exc)) from None
        for note in notes:
            warnings.warn(note, FutureWarning, stacklevel=3)
        object.__setattr__(self, "resize", resize)
        if self.encode_format not in ENCODE_FORMATS:
            raise IngestError(
                f"ingest.encode_format: {self.encode_format!r} is not one of "
                f"{', '.join(ENCODE_FORMATS)}"
            )
        # From YAML this is a list; a bad CIDR is a config error, named here.
        networks = tuple(self.allowed_networks)
        for cidr in networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise IngestError(
                    f"ingest.allowed_networks: {cidr!r} is not a network: {exc}"
                ) from None
        object.__setattr__(self, "allowed_networks", networks)


class IngestError(ValueError):
    """Bad input (URL list, settings): the message names the file, row/key and field."""


class Failure(Exception):
    """A per-row failure: recorded in the stats, never raised out of a shard."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


def check_section(settings: dict[str, Any]) -> list[str]:
    """The config's ``ingest`` section as ingest jobs will take it: a bad value raises
    ConfigError at DAG build; the warnings (earlier names still in use) are returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        try:
            IngestSettings(**settings)
        except IngestError as exc:
            raise ConfigError(f"config.{exc}") from None
    return [str(warning.message) for warning in caught]
