"""Workload 3: writes checksummed files on the md disk.

Each file is written to a temporary name, fsynced, renamed to fNNNNNNNN, then its sha256 is appended
to MANIFEST (fsynced). A file is immutable once listed, so verification never races the writer.
Only the newest WINDOW files are kept (bounded disk use); verify_files.py knows the window.
"""

import hashlib
import os
import random
import sys
import time

INTERVAL_S = 0.5
WINDOW = 400
MAX_FILES = 10 * 24 * 3600 * 2


def main() -> None:
    directory = sys.argv[1]
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, "MANIFEST")
    start = 0
    if os.path.exists(manifest_path):  # continue after a restart of P (not of this process)
        with open(manifest_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3:
                    start = max(start, int(parts[0]) + 1)
    manifest = open(manifest_path, "a")
    rng = random.Random(os.getpid())
    pid = os.getpid()
    for seq in range(start, start + MAX_FILES):
        size = rng.randrange(4096, 65536)
        data = rng.randbytes(size)
        name = os.path.join(directory, f"f{seq:08d}")
        tmp = name + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name)
        manifest.write(f"{seq} {hashlib.sha256(data).hexdigest()} {pid}\n")
        manifest.flush()
        os.fsync(manifest.fileno())
        old = os.path.join(directory, f"f{seq - WINDOW:08d}")
        if seq >= WINDOW and os.path.exists(old):
            os.unlink(old)
        time.sleep(INTERVAL_S)


if __name__ == "__main__":
    main()
