"""p2vctl's live view (p2vctl/render.follow): each step's own word is printed once, above the bar,
as a log a user can scroll back through (which legs were brought back, the resume steps); the
pre-copy rounds stay in the bar."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from p2v.v1 import common_pb2
from p2vctl import render


async def test_each_step_is_said_once_and_rounds_stay_in_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=out, width=200, force_terminal=False))

    def status(phase: str, detail: str, state: int = common_pb2.MIGRATION_STATE_ACTIVE) -> common_pb2.MigrationStatus:
        return common_pb2.MigrationStatus(migration_id="m1", state=state,
                                          progress=common_pb2.Progress(phase=phase, detail=detail))

    async def stream():
        for s in (status("prepare", "negotiating with 10.0.0.2:7470"),
                  status("prepare", "nbd0 of md127 brought back (remove, reattach, re-add, wait) [0KB]"),
                  status("prepare", "nbd0 of md127 brought back (remove, reattach, re-add, wait) [0KB]"),
                  status("precopy", "round 1"), status("precopy", "round 2"),
                  status("resume", "adopt-nic: ok eth1 enslaved in p2vbond0 (170 ms)"),
                  status("cancel", "done", common_pb2.MIGRATION_STATE_COMPLETED)):
            yield s

    last = await render.follow(stream())
    text = out.getvalue()
    assert last is not None and last.state == common_pb2.MIGRATION_STATE_COMPLETED
    assert text.count("prepare: nbd0 of md127 brought back (remove, reattach, re-add, wait) [0KB]") == 1  # no markup
    assert "prepare: negotiating with 10.0.0.2:7470" in text
    assert "resume: adopt-nic: ok eth1 enslaved in p2vbond0" in text
    assert "precopy: round" not in text
    assert "migration m1: completed" in text
