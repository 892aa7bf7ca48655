"""Driver preparation: load the virtual devices' drivers on P and make P's initramfs carry them.

The Linux form of the patent's "attach a dummy device, let plug-and-play install the driver":
``modprobe virtio_pci virtio_net virtio_blk`` now, so that the devices bind at once when the VM's
PCI rescan finds them, and the initramfs module list so that a later boot of the mirrored disk
(warm cutover) finds its root. Each change is journaled with what its undo needs:

- driver-load: the modules that were *not* loaded before and are after (dependencies included);
  undo unloads exactly those, newest first. Built-in or already loaded modules are not touched.
- initramfs-modules: a marked block appended to ``/etc/initramfs-tools/modules`` (initramfs-tools)
  or a file ``/etc/dracut.conf.d/90-p2v-virtio.conf`` (dracut); undo removes it and rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from source_agent.redundancy import sysops
from source_agent.redundancy.journal import Entry, Journal

log = logging.getLogger(__name__)

VIRTIO_DRIVERS = ("virtio_pci", "virtio_net", "virtio_blk")
DRACUT_CONF = "/etc/dracut.conf.d/90-p2v-virtio.conf"
ITOOLS_MODULES = "/etc/initramfs-tools/modules"
_MODNAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class DriverError(RuntimeError):
    pass


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _p(root: Path, abs_path: str) -> Path:
    return root / abs_path.lstrip("/")


def loaded_modules(root: Path = Path("/")) -> list[str]:
    """Loadable modules now loaded, from /proc/modules (empty when the kernel has no modules)."""
    try:
        text = _p(root, "/proc/modules").read_text()
    except OSError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def module_refcount(name: str, root: Path = Path("/")) -> int:
    try:
        text = _p(root, "/proc/modules").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == _norm(name):
            return int(parts[2])
    return 0


def is_builtin(name: str, root: Path = Path("/"), release: str | None = None) -> bool:
    """Built into the kernel (so nothing to load or carry)."""
    name = _norm(name)
    release = release or os.uname().release
    try:
        lines = _p(root, f"/lib/modules/{release}/modules.builtin").read_text().splitlines()
        if any(_norm(Path(line).name.removesuffix(".ko")) == name for line in lines):
            return True
    except OSError:
        pass
    # without modules.builtin: present in /sys/module but not loadable
    return _p(root, f"/sys/module/{name}").is_dir() and name not in loaded_modules(root)


def _check_names(modules: Iterable[str]) -> list[str]:
    out = []
    for m in modules:
        if not _MODNAME_RE.match(m):
            raise DriverError(f"{m!r} is not a kernel module name")
        out.append(_norm(m))
    return out


def load(journal: Journal, modules: Iterable[str], options: dict[str, list[str]] | None = None) -> Entry | None:
    """Load the modules that are not there yet; journal what appeared. None if nothing to do.
    ``options``: module parameters, e.g. {"bonding": ["max_bonds=0"]} (no bond0 of its own)."""
    options = options or {}
    mods = list(modules)
    wanted = [m for m in _check_names(mods) if m not in loaded_modules() and not is_builtin(m)]
    if not wanted:
        log.info("drivers: %s already present", ", ".join(mods) or "-")
        return None
    before = loaded_modules()
    entry = journal.begin("driver-load", modules=wanted, before=before, new_modules=[])
    new: list[str] = []
    try:
        for m in wanted:
            opts = [o for o in options.get(m, []) if re.match(r"^[A-Za-z0-9_]+=[A-Za-z0-9_,.-]*$", o)]
            sysops.run(["modprobe", m, *opts], timeout=60)
    finally:
        new = [m for m in reversed(loaded_modules()) if m not in before]  # /proc/modules lists newest first
        journal.update(entry, new_modules=new)
    journal.done(entry)
    log.info("drivers: loaded %s (new modules: %s)", ", ".join(wanted), ", ".join(new))
    return entry


def undo_load(entry: Entry) -> None:
    """Unload the modules this entry brought in, newest first (bounded passes for dependencies)."""
    remaining = [m for m in reversed(entry.detail.get("new_modules", [])) if m in loaded_modules()]
    for _ in range(len(remaining) + 1):
        if not remaining:
            return
        progress = False
        for m in list(remaining):
            if module_refcount(m) == 0:
                sysops.run(["rmmod", m], timeout=30, check=False)
            if m not in loaded_modules():
                remaining.remove(m)
                progress = True
        if not progress:
            break
    if remaining:
        raise DriverError(f"could not unload {', '.join(remaining)}: still in use")


# --------------------------------------------------------------------------- initramfs


@dataclass(frozen=True)
class InitramfsTool:
    name: str  # "initramfs-tools" | "dracut" | ""
    config: Path  # the file p2v edits or writes


def detect_initramfs_tool(root: Path = Path("/")) -> InitramfsTool:
    if _p(root, ITOOLS_MODULES).is_file() and (sysops_has("update-initramfs") or root != Path("/")):
        return InitramfsTool("initramfs-tools", _p(root, ITOOLS_MODULES))
    if _p(root, "/etc/dracut.conf.d").is_dir() and (sysops_has("dracut") or root != Path("/")):
        return InitramfsTool("dracut", _p(root, DRACUT_CONF))
    return InitramfsTool("", Path())


def sysops_has(tool: str) -> bool:
    try:
        sysops.need(tool)
    except sysops.CommandError:
        return False
    return True


def _marker(entry_id: str, which: str) -> str:
    return f"# p2v {entry_id} {which}"


def add_modules_block(text: str, entry_id: str, modules: list[str]) -> tuple[str, list[str]]:
    """initramfs-tools module list: append a marked block with the modules not listed yet (pure)."""
    listed = {_norm(line.split()[0]) for line in text.splitlines() if line.strip() and not line.startswith("#")}
    add = [m for m in modules if _norm(m) not in listed]
    if not add:
        return text, []
    if text and not text.endswith("\n"):
        text += "\n"
    block = [_marker(entry_id, "begin"), *add, _marker(entry_id, "end")]
    return text + "\n".join(block) + "\n", add


def remove_modules_block(text: str, entry_id: str) -> str:
    """Remove the marked block (pure). Text without the block is returned unchanged."""
    lines = text.splitlines(keepends=True)
    begin, end = _marker(entry_id, "begin"), _marker(entry_id, "end")
    out: list[str] = []
    inside = False
    for line in lines:
        stripped = line.rstrip("\n")
        if stripped == begin:
            inside = True
            continue
        if inside and stripped == end:
            inside = False
            continue
        if not inside:
            out.append(line)
    return "".join(out)


def ensure_initramfs(
    journal: Journal,
    modules: Iterable[str],
    root: Path = Path("/"),
    rebuild: bool = True,
    release: str | None = None,
) -> Entry | None:
    """Make the initramfs carry ``modules``. None when they are built in or already carried, or when P
    uses neither initramfs-tools nor dracut (then ``initramfs_status`` explains)."""
    release = release or os.uname().release
    mods = [m for m in _check_names(modules) if not is_builtin(m, root, release)]
    tool = detect_initramfs_tool(root)
    if not mods or not tool.name:
        return None
    if tool.name == "initramfs-tools":
        old = tool.config.read_text()
        entry = journal.begin(
            "initramfs-modules",
            tool=tool.name,
            config=str(tool.config),
            release=release,
            added=[],
            sha256_before=hashlib.sha256(old.encode()).hexdigest(),
            rebuilt=False,
        )
        new, added = add_modules_block(old, entry.id, mods)
        if not added:
            journal.update(entry, "undone", note="already listed")
            return None
        _write(tool.config, new)
        journal.update(entry, added=added)
    else:
        if tool.config.exists():
            log.info("drivers: %s exists already", tool.config)
            return None
        entry = journal.begin(
            "initramfs-modules",
            tool=tool.name,
            config=str(tool.config),
            release=release,
            added=mods,
            rebuilt=False,
        )
        _write(tool.config, f'# written by p2v ({entry.id})\nadd_drivers+=" {" ".join(mods)} "\n')
    if rebuild:
        _rebuild(tool.name, release)
        journal.update(entry, rebuilt=True)
    journal.done(entry)
    return entry


def undo_initramfs(entry: Entry) -> None:
    config = Path(entry.detail["config"])
    if entry.detail.get("tool") == "initramfs-tools":
        if config.exists():
            text = config.read_text()
            new = remove_modules_block(text, entry.id)
            if new != text:
                _write(config, new)
    else:
        config.unlink(missing_ok=True)
    if entry.detail.get("rebuilt"):
        _rebuild(entry.detail["tool"], entry.detail.get("release") or os.uname().release)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.p2v-tmp")
    tmp.write_text(text)
    if path.exists():
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    os.replace(tmp, path)


def _rebuild(tool: str, release: str) -> None:
    if tool == "initramfs-tools":
        sysops.run(["update-initramfs", "-u", "-k", release], timeout=600)
    else:
        sysops.run(["dracut", "-f", "--kver", release], timeout=600)
