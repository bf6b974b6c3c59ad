"""The two-pass shuffle across HDF5 files: same rows, new order, restartable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from vlmflow.core.h5_layout import write_rows
from vlmflow.stages import h5_shuffle
from vlmflow.stages.h5_shuffle import read_rows, shuffle_files


def _inputs(root: Path, sizes: list[int], max_seq_len: int = 6) -> list[Path]:
    paths, number = [], 0
    for index, size in enumerate(sizes):
        data = np.zeros((size, 4, max_seq_len), dtype=np.int32)
        data[:, 0, 0] = np.arange(number, number + size)  # a row id in input_ids
        data[:, 1, :] = 1
        images = [f"{index:06d}/img{n}.jpg" for n in range(number, number + size)]
        number += size
        path = root / f"in-{index}.h5"
        write_rows(path, data, images)
        paths.append(path)
    return paths


def _rows(paths: list[Path]) -> list[tuple[bytes, str]]:
    rows = []
    for path in paths:
        data, images = read_rows(path)
        rows += [(data[i].tobytes(), images[i]) for i in range(len(images))]
    return rows


def test_shuffle_keeps_every_row_and_mixes_the_files(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, [20, 20, 20])
    out = shuffle_files(inputs, tmp_path / "out", chunks=3, seed=5)
    assert [p.name for p in out] == ["chunk-00000.h5", "chunk-00001.h5", "chunk-00002.h5"]
    assert sorted(_rows(out)) == sorted(_rows(inputs))
    # Each chunk mixes rows of several inputs, not in their input order.
    for path in out:
        data, images = read_rows(path)
        assert len({image.split("/")[0] for image in images}) > 1
        ids = data[:, 0, 0].tolist()
        assert ids != sorted(ids)
        with h5py.File(path, "r") as f:
            assert f.attrs["n_examples"] == len(images)
            assert f["data"].chunks == (1, 4, 6) and f["data"].compression == "gzip"
    assert not (tmp_path / ".out.parts").exists()


def test_same_seed_same_files_other_seed_other_order(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path, [15, 15])
    first = _rows(shuffle_files(inputs, tmp_path / "a", chunks=2, seed=1))
    again = _rows(shuffle_files(inputs, tmp_path / "b", chunks=2, seed=1))
    other = _rows(shuffle_files(inputs, tmp_path / "c", chunks=2, seed=2))
    assert first == again
    assert first != other and sorted(first) == sorted(other)


def test_a_killed_shuffle_restarts_at_the_first_input_not_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _inputs(tmp_path, [10, 10, 10])
    expected = _rows(shuffle_files(inputs, tmp_path / "reference", chunks=2, seed=3))

    real_write = h5_shuffle.write_rows

    def dies_in_third_input(path: Path, *args: Any) -> None:
        if "000002" in str(path):
            raise KeyboardInterrupt("killed")
        real_write(path, *args)

    monkeypatch.setattr(h5_shuffle, "write_rows", dies_in_third_input)
    with pytest.raises(KeyboardInterrupt):
        shuffle_files(inputs, tmp_path / "out", chunks=2, seed=3)
    assert not (tmp_path / "out").exists()
    parts = tmp_path / ".out.parts"
    assert (parts / "000000" / "done.json").exists() and (parts / "000001" / "done.json").exists()

    monkeypatch.setattr(h5_shuffle, "write_rows", real_write)
    read = []
    real_read = h5_shuffle.read_rows

    def spy(path: Path) -> Any:
        read.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(h5_shuffle, "read_rows", spy)
    out = shuffle_files(inputs, tmp_path / "out", chunks=2, seed=3)
    # Pass 1 reads only the third input again; pass 2 reads the parts.
    assert [name for name in read if name.startswith("in-")] == ["in-2.h5"]
    monkeypatch.undo()
    assert _rows(out) == expected


def test_inputs_of_other_lengths_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _inputs(tmp_path / "a", [3])
    second = _inputs(tmp_path / "b", [3], max_seq_len=8)
    with pytest.raises(ValueError, match=r"in-0\.h5: max_seq_len 8"):
        shuffle_files(first + second, tmp_path / "out", chunks=2, seed=0)
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"broken\.h5: not a LLaVA HDF5 file"):
        shuffle_files([tmp_path / "broken.h5"], tmp_path / "out2", chunks=1, seed=0)
