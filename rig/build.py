"""Build P's system: kernel + small initramfs + an ext4 root image, cached by content hash.

Two layers, each cached under `<rig_dir>/cache`:

* base layer (slow, ~1-2 min; rebuilt only when its inputs change): Debian via debootstrap, the
  project's Python dependencies (cp311 manylinux wheels installed with `pip --target`), the kernel's
  modules (minus the big irrelevant driver trees), bytecode compiled. Kept as a directory tree.
* image layer (fast, seconds): a hard-link copy of the base tree plus the project source, the rig's
  guest scripts and P's identity, turned into `root.ext4` with `mkfs.ext4 -d` (no loop mounts), and
  the initramfs that mounts it.

A build whose inputs are unchanged returns the cached paths after hashing the inputs only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from rig import config as C
from rig.config import RigConfig
from rig.lock import FileLock

log = logging.getLogger(__name__)

#: Bump when the base recipe below changes in a way its other inputs don't capture.
BASE_RECIPE_VERSION = 3
#: Bump when the image recipe changes in a way its inputs don't capture.
IMAGE_RECIPE_VERSION = 3

DEBIAN_PACKAGES = (
    "python3", "mdadm", "nbd-client", "iproute2", "kmod", "busybox-static", "procps", "e2fsprogs",
    "iputils-ping", "ethtool", "util-linux",
)
#: pip platform tags P's python3.11 on glibc 2.36 accepts (pip needs them spelled out with --target).
PIP_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64",
                 "manylinux_2_34_x86_64", "linux_x86_64")
#: Kernel module trees P never needs; dropping them keeps the image (and its rebuild) small.
MODULE_TREES_DROPPED = (
    "kernel/drivers/gpu", "kernel/drivers/media", "kernel/sound", "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/drivers/iio", "kernel/net/wireless",
    "kernel/net/mac80211", "kernel/drivers/bluetooth", "kernel/net/bluetooth",
)
#: Modules the initramfs loads to find and mount the root disk.
INITRAMFS_MODULES = ("ata_piix", "ata_generic", "sd_mod", "ext4")
#: Files in the base tree that the image layer replaces (unlinked first: they are hard links
#: into the cached base tree, which must never be modified).
PROJECT_TOP_EXCLUDES = ("tests", "bench", "rig")
DEBIAN_SITE = "usr/local/lib/python3.11/dist-packages"

GUEST_DIR = Path(__file__).resolve().parent / "guest"


@dataclass
class BuildResult:
    root_image: Path
    kernel: Path
    initrd: Path
    image_hash: str
    base_hash: str
    base_cached: bool
    image_cached: bool
    seconds: float
    base_seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log.debug("run: %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}"
                           f"\n{res.stderr[-3000:]}")
    return res


def python_requirements(repo_root: Path) -> list[str]:
    """The project's runtime dependencies (plus the `fast` extra) from pyproject.toml."""
    meta = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    reqs = list(meta.get("dependencies", []))
    reqs += meta.get("optional-dependencies", {}).get("fast", [])
    return reqs


def base_inputs(cfg: RigConfig) -> dict:
    kver = cfg.kernel_version()
    return {
        "recipe": BASE_RECIPE_VERSION,
        "suite": cfg.suite,
        "mirror": cfg.apt_mirror(),
        "packages": sorted(DEBIAN_PACKAGES),
        "python_requirements": python_requirements(cfg.repo_root),
        "pip_platforms": PIP_PLATFORMS,
        "kernel_version": kver,
        "vmlinuz_sha256": _sha256_file(Path(f"/boot/vmlinuz-{kver}")),
        "modules_dep_sha256": _sha256_file(Path(f"/lib/modules/{kver}/modules.dep")),
        "modules_dropped": MODULE_TREES_DROPPED,
    }


def _hash_obj(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def build_base(cfg: RigConfig, force: bool = False) -> tuple[Path, str, bool, float]:
    """Return (rootfs dir, base hash, was cached, seconds spent)."""
    t0 = time.monotonic()
    inputs = base_inputs(cfg)
    base_hash = _hash_obj(inputs)
    final = cfg.cache_dir / f"base-{base_hash}"
    if (final / "base.json").exists() and not force:
        return final / "rootfs", base_hash, True, time.monotonic() - t0
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.rig_dir, 0o755)
    os.chmod(cfg.cache_dir, 0o755)
    work = Path(tempfile.mkdtemp(prefix=f"base-{base_hash}.tmp-", dir=cfg.cache_dir))
    try:
        root = work / "rootfs"
        debs = cfg.cache_dir / "debs"
        debs.mkdir(exist_ok=True)
        log.info("base layer: debootstrap %s (%s)", cfg.suite, inputs["mirror"])
        _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
              "--include=" + ",".join(DEBIAN_PACKAGES), cfg.suite, str(root), inputs["mirror"]],
             timeout=1800)
        log.info("base layer: pip install %d requirements", len(inputs["python_requirements"]))
        site = root / DEBIAN_SITE
        site.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site),
               "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
               "--abi", "cp311"]
        for plat in PIP_PLATFORMS:
            pip += ["--platform", plat]
        _run(pip + inputs["python_requirements"], timeout=1800)
        _install_kernel_modules(root, inputs["kernel_version"])
        _slim(root)
        _compile_bytecode(root / DEBIAN_SITE)
        (work / "base.json").write_text(json.dumps({"inputs": inputs, "seconds": time.monotonic() - t0},
                                                   indent=1))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        os.chmod(final, 0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final / "rootfs", base_hash, False, time.monotonic() - t0


def _install_kernel_modules(root: Path, kver: str) -> None:
    src = Path("/lib/modules", kver)
    dst = root / "lib/modules" / kver
    if dst.exists():
        shutil.rmtree(dst)
    dropped = {src / d for d in MODULE_TREES_DROPPED}

    def ignore(dirpath: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(dirpath, n) in dropped or n in ("build", "source")]

    shutil.copytree(src, dst, ignore=ignore, symlinks=True)
    # modules.dep must only name modules that are present, so regenerate it for the pruned tree
    _run(["depmod", "-b", str(root), kver])


def _slim(root: Path) -> None:
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale"):
        p = root / rel
        if p.is_dir():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "partial"):
                    child.unlink()


def _compile_bytecode(path: Path) -> None:
    """Precompile so P's python3.11 does not write __pycache__ on its (slow, TCG) first boot."""
    if sys.version_info[:2] != (3, 11) or not path.exists():
        return  # a different magic number would be useless to P
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", str(path)],
                   capture_output=True, check=False)


# --- image layer -----------------------------------------------------------------------------------

def _copy_project(repo_root: Path, dst: Path) -> None:
    def ignore(dirpath: str, names: list[str]) -> list[str]:
        skip = [n for n in names if n in C.PROJECT_EXCLUDES or n.endswith(".pyc")]
        if Path(dirpath) == repo_root:
            # P needs the project's packages, not its tests or the host-side rig
            skip += [n for n in names if n.startswith(".") or n in PROJECT_TOP_EXCLUDES]
        return skip

    shutil.copytree(repo_root, dst, ignore=ignore, symlinks=True)


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0")
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode())
            else:
                h.update(b"X" if os.access(p, os.X_OK) else b"F")
                h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _identity_files(cfg: RigConfig) -> dict[str, str]:
    """P's fixed identity and configuration (relative path in the root -> content)."""
    env = {
        "P_IP": C.P_IP, "P_PREFIX_LEN": str(C.PREFIX_LEN), "P_MAC": C.P_MAC, "ECHO_PORT": str(C.ECHO_PORT),
        "STATE_DIR": C.P_STATE_DIR, "COUNTER_LOG": C.P_COUNTER_LOG, "DATA_MOUNT": C.P_DATA_MOUNT,
        "MD_DEVICE": C.P_MD_DEVICE, "FILES_DIR": C.P_FILES_DIR, "DISK_MODEL_DATA": C.DISK_MODEL_DATA,
        "DISK_MODEL_SPARE": C.DISK_MODEL_SPARE, "PROJECT_DIR": C.P_PROJECT_DIR, "RIG_DIR": C.P_RIG_DIR,
        "AGENT_CONFIG": C.P_AGENT_CONFIG, "AGENT_READY_FILE": C.P_AGENT_READY_FILE,
        "AGENT_LOG": C.P_AGENT_LOG, "AGENT_PIDFILE": C.P_AGENT_PIDFILE,
        "MARK_READY": C.MARK_READY, "MARK_COUNTER": C.MARK_COUNTER,
    }
    return {
        "etc/hostname": C.P_HOSTNAME + "\n",
        "etc/machine-id": C.P_MACHINE_ID + "\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n{C.P_IP}\t{C.P_HOSTNAME}\n",
        "etc/resolv.conf": "",
        "etc/fstab": f"LABEL={C.ROOT_LABEL} / ext4 rw 0 1\n",
        "etc/p2v-rig/rig.env": "".join(f"{k}='{v}'\n" for k, v in sorted(env.items())),
        "etc/p2v/source.toml": f'[agent]\nlisten_unix = "{C.P_AGENT_SOCKET}"\n',
        "etc/mdadm/mdadm.conf": "# written by the rig; arrays are assembled by P's boot script\n"
                                "HOMEHOST <none>\n",
        f"{DEBIAN_SITE}/p2v-project.pth": f"{C.P_PROJECT_DIR}\n{C.P_PROJECT_DIR}/proto\n",
    }


def image_inputs(cfg: RigConfig, base_hash: str, project_hash: str) -> dict:
    return {
        "recipe": IMAGE_RECIPE_VERSION,
        "base": base_hash,
        "project": project_hash,
        "guest": _hash_tree(GUEST_DIR),
        "identity": _identity_files(cfg),
        "initramfs_modules": INITRAMFS_MODULES,
        "salt": cfg.image_salt,
    }


def build(cfg: RigConfig | None = None, force_base: bool = False, force_image: bool = False) -> BuildResult:
    """Build (or find in the cache) P's kernel, initramfs and root image."""
    cfg = cfg or RigConfig()
    t0 = time.monotonic()
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cfg.cache_dir / "build.lock")  # concurrent builds would race on the cache
    lock.acquire(timeout_s=1800)
    try:
        return _build_locked(cfg, t0, force_base, force_image)
    finally:
        lock.release()


def _build_locked(cfg: RigConfig, t0: float, force_base: bool, force_image: bool) -> BuildResult:
    base_root, base_hash, base_cached, base_seconds = build_base(cfg, force=force_base)
    with tempfile.TemporaryDirectory(prefix="project-", dir=cfg.cache_dir) as tmp:
        # hash a private copy so that edits made meanwhile by others cannot split hash and content
        project_copy = Path(tmp) / "p2v"
        _copy_project(cfg.repo_root, project_copy)
        project_hash = _hash_tree(project_copy)
        inputs = image_inputs(cfg, base_hash, project_hash)
        image_hash = _hash_obj(inputs)
        final = cfg.cache_dir / f"image-{image_hash}"
        cached = (final / "image.json").exists() and not force_image and not force_base
        if not cached:
            _build_image(cfg, base_root, project_copy, inputs, final)
    result = BuildResult(
        root_image=final / "root.ext4", kernel=final / "vmlinuz", initrd=final / "initrd.img",
        image_hash=image_hash, base_hash=base_hash, base_cached=base_cached, image_cached=cached,
        seconds=time.monotonic() - t0, base_seconds=base_seconds)
    if not cached:
        _prune_old(cfg, keep={final.name, f"base-{base_hash}"})
    return result


def _build_image(cfg: RigConfig, base_root: Path, project_copy: Path, inputs: dict, final: Path) -> None:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=cfg.cache_dir))
    try:
        staging = work / "rootfs"
        # hard links: seconds instead of copying ~500 MB; files we change are unlinked first
        _run(["cp", "-al", str(base_root), str(staging)])
        shutil.copytree(project_copy, staging / C.P_PROJECT_DIR.lstrip("/"), symlinks=True)
        rig_dst = staging / C.P_RIG_DIR.lstrip("/")
        rig_dst.mkdir(parents=True)
        for src in GUEST_DIR.iterdir():
            if src.is_file():
                shutil.copy2(src, rig_dst / src.name)
        for name in ("rc.sh", "services.sh", "init"):
            os.chmod(rig_dst / name, 0o755)
        for rel, content in _identity_files(cfg).items():
            _put(staging / rel, content)
        _put(staging / "etc/inittab", (GUEST_DIR / "inittab").read_text())
        # busybox init is P's PID 1 (reaps orphans, respawns the control server)
        _put_symlink(staging / "sbin/init", "/bin/busybox")
        _compile_bytecode(staging / C.P_PROJECT_DIR.lstrip("/"))
        _compile_bytecode(rig_dst)
        _make_ext4(staging, work / "root.ext4")
        kver = inputs_kernel_version(cfg)
        shutil.copy2(f"/boot/vmlinuz-{kver}", work / "vmlinuz")
        _make_initramfs(staging, kver, work / "initrd.img")
        shutil.rmtree(staging)
        (work / "image.json").write_text(json.dumps({"inputs": inputs, "seconds": time.monotonic() - t0},
                                                    indent=1, default=str))
        for p in work.iterdir():
            os.chmod(p, 0o644)
        os.chmod(work, 0o755)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def inputs_kernel_version(cfg: RigConfig) -> str:
    return cfg.kernel_version()


def _put(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(content)


def _put_symlink(path: Path, target: str) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _make_ext4(tree: Path, image: Path) -> None:
    used = _tree_bytes(tree)
    size_mib = int(used * 1.25 / (1 << 20)) + 384  # headroom for P's own writes
    with image.open("wb") as f:
        f.truncate(size_mib << 20)
    _run(["mkfs.ext4", "-q", "-F", "-L", C.ROOT_LABEL, "-d", str(tree), "-E", "root_owner=0:0",
          str(image)], timeout=600)


def _make_initramfs(root: Path, kver: str, out: Path) -> None:
    """busybox + the modules that mount the root disk + /init (rig/guest/init)."""
    with tempfile.TemporaryDirectory(prefix="initramfs-") as tmp:
        ir = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "newroot", "mods"):
            (ir / d).mkdir()
        shutil.copy2(root / "bin/busybox", ir / "bin/busybox")
        (ir / "bin/sh").symlink_to("busybox")
        deps = _run(["modprobe", "-d", str(root), "-S", kver, "--show-depends", "-a",
                     *INITRAMFS_MODULES]).stdout
        order: list[str] = []
        for line in deps.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                path = Path(parts[1])
                if not str(path).startswith(str(root)):
                    path = root / str(path).lstrip("/")
                if path.name not in order:
                    shutil.copy2(path, ir / "mods" / path.name)
                    order.append(path.name)
        (ir / "mods/order").write_text("\n".join(order) + "\n")
        shutil.copy2(GUEST_DIR / "init", ir / "init")
        os.chmod(ir / "init", 0o755)
        files = subprocess.run(["find", "."], cwd=ir, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=ir, input=files,
                              capture_output=True, check=True).stdout
        out.write_bytes(cpio)  # uncompressed: a few MB, and the kernel unpacks it fastest this way


def _prune_old(cfg: RigConfig, keep: set[str], keep_images: int = 3) -> None:
    """Drop stale cached layers (and leftovers of interrupted builds), never the running rig's."""
    try:
        in_use = json.loads((cfg.run_dir / "state.json").read_text())["build"]["root_image"]
        keep = keep | {Path(in_use).parent.name}
    except (OSError, ValueError, KeyError):
        pass
    entries = sorted(cfg.cache_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    images_kept = 0
    for p in entries:
        if p.name in keep or not p.is_dir():
            continue
        if ".tmp-" in p.name and time.time() - p.stat().st_mtime > 3600:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("image-") and ".tmp-" not in p.name:
            images_kept += 1
            if images_kept >= keep_images:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith("base-") and ".tmp-" not in p.name:
            shutil.rmtree(p, ignore_errors=True)
