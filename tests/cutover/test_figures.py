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


def test_stream_cpu_splits_the_machine_from_the_helper(tmp_path: Path) -> None:
    import os
    import resource

    from common.procfs import stat_counters
    from source_agent.cutover_helper import stream_cpu

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  {hz} 0 {2 * hz} {5 * hz} 0 0 {hz // 2} 0 0 0\ncpu0 1 2 3\nintr 1000 0 5\n"
                    "softirq 50 0 10 3 4 0 0 0 0 0 0\n")
    before = stat_counters(str(stat))
    assert before == {"user": 1.0, "nice": 0.0, "system": 2.0, "idle": 5.0, "iowait": 0.0, "irq": 0.0,
                      "softirq": 0.5, "steal": 0.0, "interrupts": 1000, "net_tx": 3, "net_rx": 4}
    stat.write_text(f"cpu  {3 * hz} 0 {3 * hz} {5 * hz} 0 0 {2 * hz} 0 0 0\nintr 1800 0 9\n"
                    "softirq 90 0 20 5 34 0 0 0 0 0 0\n")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sum(range(200_000))  # some user time of this process between the two samples
    out = stream_cpu(before, stat_counters(str(stat)), ru, resource.getrusage(resource.RUSAGE_SELF))
    assert (out["cpu_user"], out["cpu_system"], out["cpu_softirq"], out["cpu_idle"]) == (2.0, 1.0, 1.5, 0.0)
    assert (out["interrupts"], out["net_tx"], out["net_rx"]) == (800, 2, 30)
    assert out["helper_user"] >= 0 and out["helper_system"] >= 0
    assert stat_counters(str(tmp_path / "absent")) == {}
    assert stream_cpu({}, {}, ru, ru)["helper_user"] == 0
