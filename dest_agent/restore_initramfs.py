"""V builds the waiting VM's restore initramfs: busybox, the feed NIC's virtio drivers from P's
kernel's module tree, a minimal Python runtime and the restore program (dest_agent/restore_program.py).

The module tree and kernel are those of P's kernel release as installed on V
(/lib/modules/<release>, /boot/vmlinuz-<release>); `check` refuses a migration when V lacks them.
The Python runtime is V's own python3 (same architecture; the restore program uses only the standard
library): the interpreter, its shared libraries, and exactly the standard-library files the restore
program imports (found by importing them in a child interpreter and listing their files).

The result is cached by the hash of everything that goes into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common.atomicfile import write_json_atomic

#: Drivers of the feed NIC (the restore kernel receives the image over it), and of the `pc` machine's
#: IDE controller: P's kernel resumes IDE disks it shares with the VM reliably only when the restore
#: kernel had set the controller up the Linux way (as a restore from swap does); with only the
#: firmware's setup, libata's revalidation after the jump failed and dropped P's root disk.
FEED_MODULES = ("virtio_pci", "virtio_net", "ata_piix", "sd_mod")
RESTORE_PROGRAM = Path(__file__).resolve().parent / "restore_program.py"
#: The restore program's imports (kept in sync with restore_program.py; a test checks it).
RESTORE_IMPORTS = ("__future__", "fcntl", "json", "mmap", "os", "socket", "sys", "time")
RECIPE_VERSION = 1

INIT_SCRIPT = r"""#!/bin/busybox sh
# The waiting VM's /init: drivers for the feed NIC, its address, then the restore program.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "4 4 1 7" > /proc/sys/kernel/printk
say() { echo "P2V-WAITING-VM [$(cut -d' ' -f1 /proc/uptime)] $*"; }
arg() { for a in $(cat /proc/cmdline); do case "$a" in $1=*) echo "${a#$1=}";; esac; done; }
while read -r m; do [ -n "$m" ] && insmod "/mods/$m" 2>/dev/null; done < /mods/order
MAC=$(arg p2v.feedmac); ADDR=$(arg p2v.feedip); PORT=$(arg p2v.port); TOKEN=$(arg p2v.token)
nic=; n=0
while [ -z "$nic" ] && [ $n -lt 100 ]; do
  for d in /sys/class/net/*; do [ "$(cat $d/address 2>/dev/null)" = "$MAC" ] && nic=${d##*/}; done
  [ -n "$nic" ] || { usleep 100000; n=$((n+1)); }
done
if [ -z "$nic" ]; then say "ERROR no feed NIC with MAC $MAC"; sleep 5; poweroff -f; fi
ip link set lo up; ip link set "$nic" up; ip addr add "$ADDR" dev "$nic"
say "feed $nic $ADDR port $PORT"
export PYTHONHOME=/usr PATH=/bin:/usr/bin
/usr/bin/python3 -S -I -u /restore_program.py "$PORT" "$TOKEN"
say "ERROR restore program ended rc=$?"
sleep 2; poweroff -f
"""


class InitramfsError(RuntimeError):
    pass


def module_order(release: str, modules: tuple[str, ...] = FEED_MODULES,
                 base: Path = Path("/")) -> list[Path]:
    """The .ko files (dependencies first) for modules of kernel `release` under base/lib/modules."""
    argv = ["modprobe", "-S", release, "--show-depends", "-a", *modules]
    if base != Path("/"):
        argv[1:1] = ["-d", str(base)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise InitramfsError(f"modules {modules} of kernel {release}: {res.stderr.strip()}")
    order: list[Path] = []
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod":
            path = Path(parts[1])
            if path not in order:
                order.append(path)
    return order


def python_runtime_files(python: str = sys.executable, imports: tuple[str, ...] = RESTORE_IMPORTS
                         ) -> tuple[Path, list[Path], list[Path]]:
    """(interpreter, shared libraries, standard-library files) the restore program needs."""
    probe = ("import sys, json\n" + "".join(f"import {m}\n" for m in imports)
             + "print(json.dumps([sys.base_prefix, sys.platlibdir, sorted({getattr(m, '__file__', None) or '' "
               "for m in list(sys.modules.values())})]))")
    res = subprocess.run([python, "-S", "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise InitramfsError(f"probing {python}: {res.stderr.strip()}")
    _prefix, _platlib, files = json.loads(res.stdout)
    interpreter = Path(os.path.realpath(python))
    stdlib = [Path(f) for f in files if f and Path(f).is_file()]
    libs: list[Path] = []
    for obj in [interpreter, *[f for f in stdlib if f.suffix == ".so"]]:
        ldd = subprocess.run(["ldd", str(obj)], capture_output=True, text=True, timeout=30)
        for line in ldd.stdout.splitlines():
            parts = line.split()
            for p in parts:
                if p.startswith("/") and Path(p).exists() and Path(p) not in libs:
                    libs.append(Path(p))
    return interpreter, libs, stdlib


def _stdlib_dir(stdlib: list[Path]) -> Path:
    for f in stdlib:
        if f.name == "os.py":
            return f.parent
    raise InitramfsError("the interpreter's os.py was not found among its modules")


def build_inputs(release: str, modules_base: Path, python: str) -> dict:
    kos = module_order(release, base=modules_base)
    interpreter, libs, stdlib = python_runtime_files(python)

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return {
        "recipe": RECIPE_VERSION, "release": release, "init": hashlib.sha256(INIT_SCRIPT.encode()).hexdigest(),
        "program": digest(RESTORE_PROGRAM), "busybox": digest(Path("/bin/busybox")),
        "modules": {str(k): digest(k) for k in kos}, "interpreter": digest(interpreter),
        "libs": [str(x) for x in libs], "stdlib": [str(x) for x in stdlib],
    }


def build(release: str, cache_dir: Path, modules_base: Path = Path("/"), python: str = sys.executable) -> Path:
    """The restore initramfs for P's kernel `release` (built once per distinct input, then cached)."""
    if not (modules_base / "lib/modules" / release / "modules.dep").exists():
        raise InitramfsError(f"V has no module tree for P's kernel {release} "
                             f"({modules_base / 'lib/modules' / release})")
    if not Path("/bin/busybox").exists():
        raise InitramfsError("busybox is missing on V (apt-get install busybox-static)")
    inputs = build_inputs(release, modules_base, python)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"restore-{release}-{key}.cpio"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="restore-initramfs-", dir=cache_dir) as tmp:
        root = Path(tmp) / "root"
        for d in ("bin", "proc", "sys", "dev", "mods", "tmp", "usr/bin"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin/busybox")
        (root / "bin/sh").symlink_to("busybox")
        order = []
        for ko in module_order(release, base=modules_base):
            shutil.copy2(ko, root / "mods" / ko.name)
            order.append(ko.name)
        (root / "mods/order").write_text("\n".join(order) + "\n")
        interpreter, libs, stdlib = python_runtime_files(python)
        shutil.copy2(interpreter, root / "usr/bin/python3")
        for lib in libs:
            dst = root / str(lib).lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dst)
        libdir = _stdlib_dir(stdlib)
        target_libdir = root / "usr/lib" / libdir.name  # PYTHONHOME=/usr -> /usr/lib/python3.X
        for f in stdlib:
            rel = f.relative_to(libdir) if f.is_relative_to(libdir) else Path("lib-dynload") / f.name
            dst = target_libdir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        (target_libdir / "lib-dynload").mkdir(exist_ok=True)
        shutil.copy2(RESTORE_PROGRAM, root / "restore_program.py")
        (root / "init").write_text(INIT_SCRIPT)
        os.chmod(root / "init", 0o755)
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        part = out.with_suffix(".part")
        part.write_bytes(cpio)
        os.chmod(part, 0o644)
        part.rename(out)
    write_json_atomic(out.with_suffix(".json"), inputs)
    return out
