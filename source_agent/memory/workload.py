"""A workload that dirties pages of a region at a chosen rate, for tests and benchmarks.

Patterns: "random" (uniform over the region) or "hotset" (a fixed random set of
hot_fraction of the pages). Each dirtied page gets a never-repeating 64-bit counter at a
random word ("word", cheap, the page stays as compressible as it was) or wholly new random
content ("page"), so every write really changes the page's content.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from common.pagecodec import PAGE_SIZE

WORDS_PER_PAGE = PAGE_SIZE // 8


def fill_region(region: np.ndarray, kind: str, *, seed: int = 0, zero_fraction: float = 0.0) -> None:
    """Initial content: "zero", "random" (incompressible), "text" (compresses ~3-4x with zstd-1),
    with zero_fraction of the pages left zero. Works in 16 MiB chunks."""
    pages = region.reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(seed)
    chunk = 4096
    # 8-byte tokens from a small vocabulary: compresses several-fold, like text or code
    vocabulary = b"the quik brown fox jumps over lazy dogs 01234567 memory page kernel tasks       "
    tokens = np.frombuffer(vocabulary, dtype="<u8")
    for start in range(0, pages.shape[0], chunk):
        block = pages[start : start + chunk]
        n = block.shape[0]
        if kind == "zero":
            block[:] = 0
            continue
        if kind == "random":
            block[:] = rng.integers(0, 256, size=block.shape, dtype=np.uint8)
        elif kind == "text":
            words = tokens[rng.integers(0, tokens.size, size=(n, PAGE_SIZE // 8))]
            block[:] = words.view(np.uint8).reshape(n, PAGE_SIZE)
        else:
            raise ValueError(f"unknown fill {kind!r}")
        if zero_fraction > 0:
            block[rng.random(n) < zero_fraction] = 0


class Workload:
    """Dirties pages of `region` (a writable uint8 array) at rate_Bps from a background thread.

    `pause()` returns only once no write is in progress and none will start until `resume()`:
    the final round relies on it.
    """

    def __init__(
        self,
        region: np.ndarray,
        rate_Bps: float,
        *,
        pattern: str = "random",
        hot_fraction: float = 0.02,
        fill: str = "word",
        seed: int = 0,
        tick_s: float = 0.005,
    ) -> None:
        if region.size % PAGE_SIZE or region.size == 0:
            raise ValueError("region must be a non-empty whole number of pages")
        if pattern not in ("random", "hotset"):
            raise ValueError(f"unknown pattern {pattern!r}")
        if fill not in ("word", "page"):
            raise ValueError(f"unknown fill {fill!r}")
        self.words = region.reshape(-1).view(np.uint64).reshape(-1, WORDS_PER_PAGE)
        self.pages = self.words.shape[0]
        self.rate_Bps = float(rate_Bps)
        self.pattern = pattern
        self.fill = fill
        self.tick_s = tick_s
        self._rng = np.random.default_rng(seed)
        self.hot: np.ndarray | None = None
        if pattern == "hotset":
            count = max(1, int(self.pages * hot_fraction))
            self.hot = np.sort(self._rng.choice(self.pages, size=count, replace=False))
        self._counter = 1 + (seed << 40)
        self.pages_written = 0
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _pick(self, n: int) -> np.ndarray:
        if self.hot is not None:
            return self.hot[self._rng.integers(0, self.hot.size, size=n)]
        return self._rng.integers(0, self.pages, size=n)

    def step(self, n: int) -> None:
        """Dirty n pages now (from the caller's thread)."""
        if n <= 0:
            return
        idx = self._pick(n)
        if self.fill == "word":
            values = np.arange(self._counter, self._counter + n, dtype=np.uint64)
            self._counter += n
            self.words[idx, self._rng.integers(0, WORDS_PER_PAGE, size=n)] = values
        else:
            self.words[idx] = self._rng.integers(0, 1 << 63, size=(n, WORDS_PER_PAGE), dtype=np.uint64)
        self.pages_written += n

    # -- background thread -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("workload already started")
        self._thread = threading.Thread(target=self._run, name="p2v-workload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            baseline = time.monotonic()
            done = 0
            max_chunk = max(1, int(self.rate_Bps * 0.05 / PAGE_SIZE))  # at most 50 ms worth per write
            while not self._stop.is_set():
                with self._lock:
                    if self._paused.is_set():
                        due = 0
                    else:
                        due = int(self.rate_Bps * (time.monotonic() - baseline) / PAGE_SIZE) - done
                        due = min(due, max_chunk)
                        self.step(due)
                        done += max(due, 0)
                    if self._paused.is_set():
                        baseline, done = time.monotonic(), 0  # no catch-up burst after a pause
                self._stop.wait(self.tick_s)
        except BaseException as exc:  # surfaced through .error and stop()
            self.error = exc

    def pause(self) -> None:
        self._paused.set()
        with self._lock:  # waits for a write in progress
            pass

    def resume(self) -> None:
        self._paused.clear()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.error is not None:
            raise RuntimeError("workload thread failed") from self.error

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
