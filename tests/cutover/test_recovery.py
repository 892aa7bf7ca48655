"""The next agent's repair of P after a cutover whose helper and agent both died
(source_agent/host_settings.py: the pending-cutover file and recover_interrupted_cutover).

The verdict is pure; the waiting is on a real process; the bond's and the kernel's files are a
stand-in tree (the host kernel has no bonding). The real agents doing it over mutual TLS:
tests/foundation/test_service_integration.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from common.procfs import process_started
from source_agent import host_settings as hs
from source_agent.host_settings import HostSettings, PendingCutover
from tests.agents import REPO

BOOT = "7a1e1d0c-boot"


def stand_in(root: Path) -> tuple[HostSettings, Path]:
    """A bond whose timers the helper held, an image_size it raised, an NBD leg's io_timeout the
    agent raised; the settings are what the agent saw first."""
    (root / "bond9" / "bonding").mkdir(parents=True)
    (root / "bond9" / "bonding" / "miimon").write_text("10\n")  # held by the helper
    (root / "bond9" / "bonding" / "downdelay").write_text("10000\n")
    (root / "image_size").write_text("1007353856\n")
    (root / "block" / "nbd0" / "queue").mkdir(parents=True)
    (root / "block" / "nbd0" / "queue" / "io_timeout").write_text("180000\n")
    return HostSettings([], [], {"bond9": {"miimon": "100", "downdelay": "0"}}, "412000000",
                        io_timeouts={"nbd0": "30000"}), root / "image_size"


def settings_now(root: Path) -> tuple[str, str, str, str]:
    return ((root / "bond9/bonding/miimon").read_text().strip(), (root / "bond9/bonding/downdelay").read_text().strip(),
            (root / "image_size").read_text().strip(), (root / "block/nbd0/queue/io_timeout").read_text().strip())


HELD = ("10", "10000", "1007353856", "180000")  # as the cutover left them
RESTORED = ("100", "0", "412000000", "30000")


def recover_in(state: Path, root: Path, **kw) -> asyncio.Task:
    return asyncio.create_task(hs.recover_interrupted_cutover(
        state, root=str(root), image_size_path=str(root / "image_size"), block_root=str(root / "block"),
        boot_id=BOOT, **kw))


def recover(state: Path, root: Path, **kw) -> list[str]:
    async def run() -> list[str]:
        return await recover_in(state, root, **kw)

    return asyncio.run(run())


def test_verdict() -> None:
    pending = PendingCutover(HostSettings([], [], {}, ""), BOOT, helper_pid=4242, helper_started=9001)
    assert hs.recovery_verdict(pending, "another-boot", 9001) == hs.OTHER_BOOT  # a restart undid it all
    assert hs.recovery_verdict(pending, BOOT, 9001) == hs.WAIT  # the helper still works
    assert hs.recovery_verdict(pending, BOOT, None) == hs.REPAIR  # gone
    assert hs.recovery_verdict(pending, BOOT, 777) == hs.REPAIR  # its pid now names another process
    assert hs.recovery_verdict(replace(pending, helper_pid=0), BOOT, None) == hs.REPAIR  # never forked
    committed = replace(pending, committed=True)  # the helper was sending COMMIT
    assert hs.recovery_verdict(committed, BOOT, 9001) == hs.WAIT  # it powers P off itself
    assert hs.recovery_verdict(committed, BOOT, None) == hs.POWER_OFF  # V may run the OS: P must not
    assert hs.recovery_verdict(committed, "another-boot", None) == hs.OTHER_BOOT


def test_pending_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    settings, _ = stand_in(tmp_path / "net")
    pending = PendingCutover(settings, BOOT, "m1", "10.0.0.2:7470", 12, 34)
    path = hs.pending_path(tmp_path / "state")
    hs.write_pending(path, pending)
    assert hs.read_pending(path) == pending
    assert hs.read_pending(tmp_path / "none.json") is None
    negative_pid = json.dumps({**json.loads(pending.to_json()), "helper_pid": -1}).encode()
    committed_text = json.dumps({**json.loads(pending.to_json()), "committed": "yes"}).encode()
    for bad in (b"{", b"[]", b'{"settings": {}}', negative_pid, committed_text):
        path.write_bytes(bad)
        with pytest.raises(hs.PendingError):
            hs.read_pending(path)
    # the next agent leaves a file it cannot read where it is, and changes nothing
    path.write_bytes(b"{")
    done = recover(tmp_path / "state", tmp_path / "net")
    assert path.exists() and "left as it is" in done[0], done
    assert settings_now(tmp_path / "net") == HELD


def test_nothing_pending_nothing_done(tmp_path: Path) -> None:
    assert recover(tmp_path / "state", tmp_path) == []


def test_a_file_from_another_boot_is_only_dropped(tmp_path: Path) -> None:
    settings, _ = stand_in(tmp_path / "net")
    path = hs.pending_path(tmp_path / "state")
    hs.write_pending(path, PendingCutover(settings, "an-earlier-boot"))
    done = recover(tmp_path / "state", tmp_path / "net")
    assert not path.exists() and "earlier boot" in done[0], done
    assert settings_now(tmp_path / "net") == HELD  # untouched


def test_the_commit_note_names_the_helper_and_says_committed(tmp_path: Path) -> None:
    """Made by the helper before FREEZE from the agent's note, written when COMMIT leaves."""
    settings, _ = stand_in(tmp_path / "net")
    path = hs.pending_path(tmp_path / "state")
    hs.write_pending(path, PendingCutover(settings, BOOT, "m1", "10.0.0.2:7470"))  # before the agent knew the pid
    note = hs.commit_note(path)
    assert hs.read_pending(path).committed is False  # making it changes nothing yet
    hs.write_commit_note(path, note)
    after = hs.read_pending(path)
    assert after.committed and after.helper_pid == os.getpid()
    assert after.helper_started == process_started(os.getpid()) and after.settings == settings
    with pytest.raises(hs.PendingError):
        hs.commit_note(tmp_path / "none.json")


class PowerOff:
    def __init__(self, refuse: bool = False) -> None:
        self.calls = 0
        self.refuse = refuse

    def __call__(self) -> None:
        self.calls += 1
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")


@pytest.mark.parametrize("refuse", [False, True], ids=["powered-off", "kernel-refuses"])
def test_a_committed_cutover_powers_p_off_instead_of_repairing(tmp_path: Path, refuse: bool) -> None:
    """Agent and helper gone after the helper marked the cutover committed: COMMIT may have reached
    V, which then runs the OS. P is powered off; nothing is put back (the block keeps P cut off if
    the kernel refuses), V is not told to cancel, and the file stays for the next agent."""
    settings, _ = stand_in(tmp_path / "net")
    path = hs.pending_path(tmp_path / "state")
    hs.write_pending(path, PendingCutover(settings, BOOT, "m1", "10.0.0.2:7470", helper_pid=0, committed=True))
    told: list[str] = []

    async def after_repair(pending: PendingCutover) -> str:
        told.append(pending.migration_id)
        return "V told"

    power_off = PowerOff(refuse)
    done = recover(tmp_path / "state", tmp_path / "net", after_repair=after_repair, power_off=power_off)
    assert power_off.calls == 1 and told == []
    assert settings_now(tmp_path / "net") == HELD and path.exists()
    assert "point of no return" in done[0], done
    assert ("by hand" in done[0]) is refuse, done


@pytest.fixture
def live_helper(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A real process standing for a helper that outlived its agent, and the pending cutover that
    names it (pid and start time); killed and reaped at the end whatever the test did."""
    settings, _ = stand_in(tmp_path / "net")
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_started(helper.pid)
        assert started is not None
        path = hs.pending_path(tmp_path / "state")
        hs.write_pending(path, PendingCutover(settings, BOOT, helper_pid=helper.pid, helper_started=started))
        yield helper, path
    finally:
        helper.kill()
        helper.wait()


def test_waits_for_a_helper_that_outlived_its_agent_then_repairs(tmp_path: Path, live_helper) -> None:
    """While the helper lives nothing is touched; once it is gone without having ended the cutover,
    P's settings come back and the file goes."""
    helper, path = live_helper

    async def scenario() -> tuple[bool, tuple, list[str]]:
        task = recover_in(tmp_path / "state", tmp_path / "net", poll_s=0.05)
        await asyncio.sleep(0.5)
        waiting = not task.done() and path.exists()
        during = settings_now(tmp_path / "net")
        helper.kill()
        helper.wait()  # reaped, as init reaps an orphan
        return waiting, during, await asyncio.wait_for(task, 10)

    waiting, during, done = asyncio.run(scenario())
    assert waiting and during == HELD
    assert settings_now(tmp_path / "net") == RESTORED
    assert not path.exists() and "bond9's timers" in done[0], done


def test_a_helper_that_ends_the_cutover_itself_leaves_nothing_to_repair(tmp_path: Path, live_helper) -> None:
    helper, path = live_helper

    async def scenario() -> list[str]:
        task = recover_in(tmp_path / "state", tmp_path / "net", poll_s=0.05)
        await asyncio.sleep(0.3)
        hs.clear_pending(path)  # what cutover_helper.run does when it ends the cutover
        helper.kill()
        helper.wait()
        return await asyncio.wait_for(task, 10)

    done = asyncio.run(scenario())
    assert done == ["the cutover helper ended the cutover itself"]
    assert settings_now(tmp_path / "net") == HELD  # the helper's business


def test_a_helper_past_its_time_is_killed(tmp_path: Path, live_helper) -> None:
    helper, path = live_helper

    async def scenario() -> list[str]:
        task = recover_in(tmp_path / "state", tmp_path / "net", poll_s=0.05, wait_s=0.3)
        await asyncio.to_thread(helper.wait)  # stand in for init: reap the helper once it is killed
        return await asyncio.wait_for(task, 10)

    done = asyncio.run(scenario())
    assert helper.returncode == -9
    assert settings_now(tmp_path / "net") == RESTORED and not path.exists(), done


@pytest.mark.parametrize("fault, parent_survives", [("helper-killed-after-image", True),
                                                     ("agent-and-helper-killed-after-image", False)])
def test_fault_point_kills_the_agent_too_only_when_named(fault: str, parent_survives: bool) -> None:
    """The helper's parent is its agent: a shell stands for it here."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from source_agent.cutover_helper import fault_point; "
            "fault_point('after-image'); print('helper alive')")
    res = subprocess.run(["sh", "-c", f'{sys.executable} -c "{code}"; echo parent alive'], capture_output=True,
                         text=True, timeout=60, env={"P2V_FAULT": fault, "PATH": "/usr/bin:/bin"})
    assert "helper alive" not in res.stdout, res
    assert ("parent alive" in res.stdout) == parent_survives, res
