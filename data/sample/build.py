"""Rebuild data/sample/images/ from ATTRIBUTION.tsv and the extracted Debian packages.

    python data/sample/build.py EXTRACTED_ROOT [OUT_DIR]

EXTRACTED_ROOT is a folder into which the packages listed in README.md were unpacked with
`dpkg -x PACKAGE.deb EXTRACTED_ROOT`. Each image is the crop box of its source photograph (the
whole photograph when the box is "full"), resized so that its longer side is 320 px, and saved
as RGB JPEG quality 85 without metadata.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image

LONGER_SIDE = 320
QUALITY = 85
HERE = Path(__file__).resolve().parent


def build(root: Path, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(HERE / "ATTRIBUTION.tsv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    for row in rows:
        with Image.open(root / row["source_file"]) as photo:
            photo = photo.convert("RGB")
            if row["crop_box"] == "full":
                crop = photo
            else:
                left, top, right, bottom = (int(v) for v in row["crop_box"].split(","))
                crop = photo.crop((left, top, right, bottom))
        scale = LONGER_SIDE / max(crop.size)
        size = (round(crop.width * scale), round(crop.height * scale))
        crop.resize(size, Image.Resampling.LANCZOS).save(
            out_dir / f"{row['key']}.jpg", format="JPEG", quality=QUALITY
        )
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    target = Path(sys.argv[2]) if len(sys.argv) == 3 else HERE / "images"
    print(f"{build(Path(sys.argv[1]), target)} images written to {target}")
