"""Check the file writer's files against MANIFEST; print one JSON object.

Only files inside the writer's window (minus a margin for deletions racing this check) are checked.
"""

import hashlib
import json
import os
import sys

WINDOW = 400
MARGIN = 20


def main() -> None:
    directory = sys.argv[1]
    entries: dict[int, str] = {}
    pids: set[str] = set()
    with open(os.path.join(directory, "MANIFEST")) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                entries[int(parts[0])] = parts[1]
                pids.add(parts[2])
    last = max(entries) if entries else -1
    checked, bad, missing = 0, [], []
    for seq in sorted(entries):
        if seq <= last - WINDOW + MARGIN:
            continue
        path = os.path.join(directory, f"f{seq:08d}")
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            missing.append(seq)
            continue
        checked += 1
        if digest != entries[seq]:
            bad.append(seq)
    print(json.dumps({"entries": len(entries), "last_seq": last, "checked": checked, "bad": bad,
                      "missing": missing, "writer_pids": sorted(pids)}))


if __name__ == "__main__":
    main()
