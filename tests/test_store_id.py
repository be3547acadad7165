"""A data dir's store identity: made once, kept, adopted by a rebuild, and a
damaged one refused rather than replaced."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from strata.errors import StoreError
from strata.paths import StorePaths, store_id


def test_made_once_and_kept(tmp_path: Path) -> None:
    paths = StorePaths(tmp_path / "data")
    first = store_id(paths)
    assert len(first) == 32
    assert store_id(paths) == first
    assert paths.store_id_file.read_text() == first + "\n"


def test_processes_starting_together_agree(tmp_path: Path) -> None:
    paths = StorePaths(tmp_path / "data")
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: store_id(paths), range(32)))
    assert len(ids) == 1
    assert not [p for p in paths.root.iterdir() if p.name.startswith(".store-id.")]


def test_a_copy_adopts_its_source(tmp_path: Path) -> None:
    source = store_id(StorePaths(tmp_path / "a"))
    assert store_id(StorePaths(tmp_path / "b"), adopt=source) == source
    # An identity it already has is not replaced by the one offered.
    assert store_id(StorePaths(tmp_path / "a"), adopt="0" * 32) == source


@pytest.mark.parametrize("content", ["", "garbage\n", "A" * 32, "0" * 31])
def test_a_damaged_identity_is_refused(tmp_path: Path, content: str) -> None:
    paths = StorePaths(tmp_path)
    paths.store_id_file.write_text(content)
    with pytest.raises(StoreError, match=r"damaged \(expected 32 hex digits"):
        store_id(paths)
    assert paths.store_id_file.read_text() == content


def test_an_identity_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    paths = StorePaths(tmp_path)
    paths.store_id_file.mkdir()
    with pytest.raises(StoreError, match="cannot be read"):
        store_id(paths)
