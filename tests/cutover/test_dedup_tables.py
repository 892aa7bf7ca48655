"""The helper's copy of V's hashes (source_agent/dedup_tables.py): the content set follows the pass's
changes to `held`, and the stash takes both tables out of memory and puts them back as they were."""

from pathlib import Path

import numpy as np

from source_agent.dedup_tables import DedupTables


def test_content_is_made_from_held_as_the_pass_left_it() -> None:
    tables = DedupTables(np.array([7, 0, 3, 7, 9], dtype=np.uint64))
    tables.held[1] = 5  # the pass sent PFN 1: V holds it now
    tables.held[4] = 0  # a PFN V no longer holds
    tables.update_content()
    assert tables.content.tolist() == [3, 5, 7]
    assert tables.held.tolist() == [7, 5, 3, 7, 0]


def test_content_made_on_first_use_without_an_update() -> None:
    assert DedupTables(np.array([4, 4, 0, 2], dtype=np.uint64)).content.tolist() == [2, 4]


def test_stash_and_unstash_give_back_both_tables(tmp_path: Path) -> None:
    held = np.arange(1, 3000, dtype=np.uint64)[::-1].copy()  # more than a page of each table
    tables = DedupTables(held)
    tables.update_content()
    path = tmp_path / "dedup.bin"
    tables.stash(str(path))
    assert path.stat().st_size >= 2 * held.nbytes and tables.stashed == str(path)
    assert not tables.held.any() and not tables.content.any()  # their pages left memory (and the image)
    tables.prefetch()
    tables.unstash()
    assert not path.exists() and tables.stashed == ""
    assert tables.held.tolist() == held.tolist()
    assert tables.content.tolist() == sorted(held.tolist())
