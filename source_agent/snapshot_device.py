"""/dev/snapshot, the kernel's hibernation interface (kernel/power/user.c), as the cutover helper uses it:
FREEZE, CREATE_IMAGE, reading the image, FREE, UNFREEZE, and the kernel's power-off."""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
from typing import NoReturn, Protocol

from common.hibernate_image import SNAPSHOT_CREATE_IMAGE, SNAPSHOT_FREE, SNAPSHOT_FREEZE, SNAPSHOT_UNFREEZE

RB_POWER_OFF = 0x4321FEDC


class Snapshot(Protocol):
    def freeze(self) -> None: ...

    def create_image(self) -> int: ...  # in_suspend

    def read_pages(self, buffers: list[memoryview]) -> int: ...

    def free(self) -> None: ...

    def unfreeze(self) -> None: ...

    def power_off(self) -> None: ...


class SnapshotDevice:
    """/dev/snapshot through its ioctls (kernel/power/user.c)."""

    def __init__(self, path: str = "/dev/snapshot") -> None:
        # The image size the kernel aims at is raised through /sys/power/image_size (the helper's
        # _raise_image_size), not SNAPSHOT_PREF_IMAGE_SIZE: that sets the same variable, and the
        # old value must be read first to come back when P runs on.
        self.fd = os.open(path, os.O_RDONLY)

    def freeze(self) -> None:
        fcntl.ioctl(self.fd, SNAPSHOT_FREEZE)

    def create_image(self) -> int:
        arg = array.array("i", [0])
        fcntl.ioctl(self.fd, SNAPSHOT_CREATE_IMAGE, arg, True)
        return arg[0]

    def read_pages(self, buffers: list[memoryview]) -> int:
        return os.readv(self.fd, buffers)

    def free(self) -> None:
        fcntl.ioctl(self.fd, SNAPSHOT_FREE)

    def unfreeze(self) -> None:
        fcntl.ioctl(self.fd, SNAPSHOT_UNFREEZE)

    def power_off(self) -> None:
        # SNAPSHOT_POWER_OFF acts only in the ACPI platform mode, which this helper does not use; the
        # kernel's own power-off is what hibernation's "shutdown" mode does.
        power_off()


def power_off() -> NoReturn:
    """The kernel's power-off, at once. No sync: during the cutover the writeback workers are frozen
    (a sync with dirty data would wait for them forever), and past the point of no return nothing
    P still writes matters. Raises OSError only if the kernel refused."""
    ctypes.CDLL(None, use_errno=True).reboot(RB_POWER_OFF)
    raise OSError(ctypes.get_errno(), "reboot(POWER_OFF) returned")
