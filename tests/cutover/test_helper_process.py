"""The agent forks the cutover helper (source_agent/cutover.py, HelperProcess): a real child process,
its outcome through a pipe, its death explained, a hang cut short, and the agent's event loop going
on meanwhile. The snapshot device is never the real one here: a missing path, or a FIFO that blocks
the child's open()."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from source_agent.cutover import CutoverAborted, HelperProcess


def config(snapshot_device: str, **extra) -> dict:
    return {"migration_id": "m1", "endpoint": "127.0.0.1:9", "token": "00", "snapshot_device": snapshot_device,
            **extra}


async def test_forked_helper_reports_its_outcome_while_the_agent_runs_on(tmp_path: Path) -> None:
    ticks = 0

    async def agent_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    helper = HelperProcess()
    await helper.warm_up()
    work = asyncio.create_task(agent_work())
    try:
        outcome = await helper.run(config(str(tmp_path / "no-snapshot")), np.arange(16, dtype=np.uint64))
    finally:
        work.cancel()
    assert outcome["outcome"] == "aborted" and "cannot open" in outcome["reason"], outcome
    assert "no-snapshot" in outcome["reason"]
    assert helper.pid is None  # reaped
    assert ticks > 0


async def test_forked_helper_that_dies_says_why(tmp_path: Path) -> None:
    with pytest.raises(CutoverAborted) as err:
        await HelperProcess().run(config(str(tmp_path / "x"), no_such_option=1), np.zeros(4, dtype=np.uint64))
    assert "rc=70" in str(err.value) and "no_such_option" in str(err.value), err.value


async def test_hung_helper_is_killed(tmp_path: Path) -> None:
    fifo = tmp_path / "snapshot"
    os.mkfifo(fifo)  # opening it for reading blocks: a helper stuck in the kernel
    helper = HelperProcess()
    with pytest.raises(CutoverAborted, match="did not finish in time"):
        await helper.run(config(str(fifo)), np.zeros(4, dtype=np.uint64), timeout_s=1.0)
    assert helper.pid is None


async def test_cancelled_cutover_kills_the_helper(tmp_path: Path) -> None:
    fifo = tmp_path / "snapshot"
    os.mkfifo(fifo)
    helper = HelperProcess()
    task = asyncio.create_task(helper.run(config(str(fifo)), np.zeros(4, dtype=np.uint64)))
    for _ in range(1000):
        if helper.pid is not None:
            break
        await asyncio.sleep(0.01)
    pid = helper.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)
