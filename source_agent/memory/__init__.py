"""Memory sources, dirty tracking and a test workload for pre-copy."""

from __future__ import annotations

from .base import MemorySource, MemorySourceError
from .file_source import FileSource
from .kcore import KcoreSource, KPageFlags
from .tracker import DirtyTracker, HashTracker
from .workload import Workload, fill_region

__all__ = [
    "DirtyTracker",
    "FileSource",
    "HashTracker",
    "KPageFlags",
    "KcoreSource",
    "MemorySource",
    "MemorySourceError",
    "Workload",
    "fill_region",
    "open_memory_source",
]


def open_memory_source(spec: str) -> MemorySource:
    """"kcore" (all physical RAM, root) or "file:/path" (a file or /dev/shm region)."""
    if spec == "kcore":
        return KcoreSource()
    if spec.startswith("kcore:"):
        return KcoreSource(spec[len("kcore:") :])
    if spec.startswith("file:"):
        return FileSource(spec[len("file:") :])
    raise ValueError(f"unknown memory source {spec!r} (expected 'kcore' or 'file:/path')")
