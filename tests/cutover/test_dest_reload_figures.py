"""A restarted destination agent that reloads a migration whose VM is P (GO went before the restart)
reports the image's figures from the receipt the earlier run left (cutover.json), not zeros: the
completion summary in the VM (`p2vctl migrate`) reads them from V's status."""

from __future__ import annotations

from pathlib import Path

from common.atomicfile import write_json_atomic
from dest_agent.migration_record import MigrationRecord
from dest_agent.service import DestinationService
from p2v.v1 import common_pb2
from tests.memory.harness import dest_config


def journal(root: Path, migration_id: str, receipt: dict | None) -> MigrationRecord:
    record = MigrationRecord(root, migration_id, source_host_id="p", memory_bytes=1 << 30, max_pfn=1 << 18,
                             page_size=4096, peer=["p2v-source"])
    record.dir.mkdir(parents=True)
    record.state = common_pb2.MIGRATION_STATE_CUTOVER
    record.journal()
    write_json_atomic(record.go_mark_path, {"migration": migration_id})
    if receipt is not None:
        write_json_atomic(record.dir / "cutover.json", receipt)
    return record


def test_reloaded_vm_is_p_reports_the_images_figures_from_the_receipt(tmp_path: Path) -> None:
    config = dest_config(tmp_path / "v")
    root = Path(config.agent.state_dir) / "migrations"
    journal(root, "moved", {"committed": True, "wire_bytes": 21711775, "pages_from_store": 48615,
                            "image_pages": 53786})
    journal(root, "bare", None)  # GO marked, the receipt lost: the status says nothing rather than fail
    service = DestinationService(config, "v")
    moved = service.status_of(service.migrations["moved"])
    assert moved.point_of_no_return
    assert (moved.stats.downtime_bytes, moved.stats.skipped, moved.stats.cutover_pages) == (21711775, 48615, 53786)
    bare = service.status_of(service.migrations["bare"])
    assert bare.point_of_no_return
    assert (bare.stats.downtime_bytes, bare.stats.skipped, bare.stats.cutover_pages) == (0, 0, 0)
