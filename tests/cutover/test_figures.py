"""V's cutover figures file: sections are added, nothing already there is lost."""

from __future__ import annotations

import json
from pathlib import Path

from dest_agent.cutover import add_figures


def test_add_figures_keeps_the_image_figures(tmp_path: Path) -> None:
    path = tmp_path / "cutover.json"
    path.write_text(json.dumps({"image_pages": 5, "steps": {"received": 1.0}}))
    add_figures(path, "resumed", {"unfrozen_at": 2.5, "steps": ["rescan-pci: ok"]})
    data = json.loads(path.read_text())
    assert data["image_pages"] == 5 and data["steps"] == {"received": 1.0}
    assert data["resumed"] == {"unfrozen_at": 2.5, "steps": ["rescan-pci: ok"]}


def test_add_figures_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "cutover.json"
    path.write_text("{not json")
    add_figures(path, "resumed", {"x": 1})  # logged, not raised: the move goes on
    assert path.read_text() == "{not json"
    add_figures(tmp_path / "absent" / "cutover.json", "resumed", {"x": 1})
