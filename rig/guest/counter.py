"""Workload 1: a counter. Every 100 ms one line `PID value timestamp` to a file (tmpfs, so it is part
of P's memory) and `<marker> PID value timestamp` to the console (so the host sees it from outside)."""

import os
import sys
import time

INTERVAL_S = 0.1
MAX_VALUES = 10 * 24 * 3600 * 10  # ten days: a bound, not a limit anyone should reach


def main() -> None:
    path, marker = sys.argv[1], sys.argv[2]
    pid = os.getpid()
    out = open(path, "a", buffering=1)
    try:
        console = open("/dev/console", "w", buffering=1)
    except OSError:
        console = None
    deadline = time.monotonic()
    for value in range(MAX_VALUES):
        line = f"{pid} {value} {time.time():.3f}"
        out.write(line + "\n")
        if console is not None:
            try:
                console.write(f"{marker} {line}\n")
            except OSError:
                pass
        deadline += INTERVAL_S
        delay = deadline - time.monotonic()
        if delay < -1.0:  # we were stopped (e.g. across a migration): don't burst to catch up
            deadline = time.monotonic()
        elif delay > 0:
            time.sleep(delay)


if __name__ == "__main__":
    main()
