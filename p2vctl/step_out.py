"""p2vctl out of P's memory image for the cutover (common.cutover_marker says why).

    python3 -m p2vctl.step_out MARKER -- ARGS...

A bare interpreter, standard library only (~3 MiB against p2vctl's ~20 with gRPC, asyncio, protobuf
and rich): it waits while the agent's cutover runs, then becomes `python3 -m p2vctl.cli ARGS` (a
`watch` of the same migration) in the same process. It waits no longer than the agent waits for
its cutover helper, and not for an agent that died: the watch then waits for the next one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from common.cutover_marker import HELPER_TIMEOUT_S, announce_watcher, cutover_running, remove, watcher_path

#: the agent's own limit on its cutover helper, and a margin
MAX_WAIT_S = HELPER_TIMEOUT_S + 60.0
POLL_S = 0.1


def wait_while_cutover_runs(marker: Path, max_wait_s: float = MAX_WAIT_S, poll_s: float = POLL_S) -> bool:
    """True once the cutover is over: the agent removed the marker, or the agent that made it died
    (the watch this process becomes then says so and waits for the next agent); False after
    max_wait_s."""
    deadline = time.monotonic() + max_wait_s
    while cutover_running(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python3 -m p2vctl.step_out MARKER -- P2VCTL-ARGS...", file=sys.stderr)
        return 2
    marker, args = Path(argv[0]), argv[2:]
    try:
        announce_watcher(marker)
    except OSError as exc:  # the agent then does not wait for this process before it unloads
        print(f"p2vctl: cannot leave a note for the agent ({exc}); following again after the cutover",
              file=sys.stderr)
    try:
        over = wait_while_cutover_runs(marker)
    except KeyboardInterrupt:  # the operator stops following; the migration goes on (p2vctl watch)
        remove(watcher_path(marker, os.getpid()))
        return 130
    if not over:
        remove(watcher_path(marker, os.getpid()))
        print(f"p2vctl: the cutover still runs after {MAX_WAIT_S:.0f} s; following the migration again",
              file=sys.stderr)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "p2vctl.cli", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
