"""Every constant of the rig in one place: names, addresses, paths, sizes.

Other parts of the project (the destination agent's VM builder, the migration tests) depend on these
values, so they are plain module-level constants; `RigConfig` bundles the tunable ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# --- names -----------------------------------------------------------------------------------------
#: Every QEMU process and libvirt domain the rig (or a test on it) creates is named with this prefix;
#: teardown finds leftovers by it.
NAME_PREFIX = "p2vrig-"
P_VM_NAME = NAME_PREFIX + "p"

# --- network -------------------------------------------------------------------------------------
#: Linux bridge in the root namespace, no IP address on the host. P's tap and the target VM's tap
#: (libvirt `<interface type='bridge'><source bridge='p2vbr0'/>`) join it.
BRIDGE = "p2vbr0"
NS_DEST = "p2v-dest"
NS_CLIENT = "p2v-client"
SUBNET = "10.77.0.0/24"
PREFIX_LEN = 24
DEST_IP = "10.77.0.2"
CLIENT_IP = "10.77.0.3"
P_IP = "10.77.0.10"
P_MAC = "52:54:00:77:00:10"
#: Host-side interface names (IFNAMSIZ is 16 including the NUL).
P_TAP = "p2vtap-p"
VETH_DEST_HOST = "p2vv-dest"
VETH_CLIENT_HOST = "p2vv-client"
#: Interface name inside each namespace.
NS_IFNAME = "eth0"
#: P's TCP echo server (workload 2).
ECHO_PORT = 7000

# --- P's CPU -----------------------------------------------------------------------------------
#: A "physical" CPU of this century: qemu64 plus the x86-64-v2 features that numpy 2.x wheels (and
#: much else) require. The target VM must present exactly the same model and features, because a
#: resumed kernel and its processes keep using what they detected at boot.
P_CPU_MODEL = "qemu64"
P_CPU_FEATURES = ("ssse3", "sse4.1", "sse4.2", "popcnt", "cx16", "lahf_lm")


def qemu_cpu_arg() -> str:
    return ",".join([P_CPU_MODEL, *(f"+{f}" for f in P_CPU_FEATURES)])


# --- P's identity --------------------------------------------------------------------------------
P_HOSTNAME = "p2v-phys"
P_MACHINE_ID = "5032760f2a7e4d1c9b3e0c0ffee77010"

# --- inside P (paths the workloads and the agent use) ---------------------------------------------
P_PROJECT_DIR = "/opt/p2v"
P_RIG_DIR = "/opt/p2v-rig"
#: Volatile state lives on tmpfs: it is part of P's memory and travels with it.
P_STATE_DIR = "/run/p2v-rig"
P_COUNTER_LOG = P_STATE_DIR + "/counter.log"
P_DATA_MOUNT = "/data"
P_MD_DEVICE = "/dev/md/p2vdata"
P_FILES_DIR = P_DATA_MOUNT + "/files"
P_AGENT_CONFIG = "/etc/p2v/source.toml"
P_AGENT_READY_FILE = "/run/p2v-source.ready"
P_AGENT_SOCKET = "/run/p2v/source.sock"
P_AGENT_LOG = P_STATE_DIR + "/source-agent.log"
P_AGENT_PIDFILE = P_STATE_DIR + "/source-agent.pid"
#: IDE disk model strings: P's boot script finds its disks by them (device names are not stable).
DISK_MODEL_DATA = "P2V-DATA"
DISK_MODEL_SPARE = "P2V-SPARE"
ROOT_LABEL = "p2vroot"

#: Console markers printed by P's boot script and workloads.
MARK_READY = "P2V-RIG-READY"
MARK_COUNTER = "P2V-COUNTER"

#: The project's Python packages shipped into P (folders of the repo copied to /opt/p2v).
PROJECT_EXCLUDES = (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "p2v.egg-info",
                    "node_modules", ".mypy_cache")

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_rig_dir() -> Path:
    """Cache and run state; must be traversable by uid libvirt-qemu (so not under /root)."""
    return Path(os.environ.get("P2V_RIG_DIR", "/var/lib/p2v-rig"))


def host_kernel_version() -> str:
    """The newest kernel that has both /boot/vmlinuz-* and /lib/modules/* (P boots it)."""
    forced = os.environ.get("P2V_RIG_KERNEL")
    if forced:
        return forced
    versions = [p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*")]
    versions = [v for v in versions if Path("/lib/modules", v, "modules.dep").exists()]
    if not versions:
        raise RuntimeError("no kernel found: apt-get install linux-image-amd64 (see rig/host-setup.sh)")

    def version_key(v: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", v)]

    return max(versions, key=version_key)


@dataclass
class RigConfig:
    rig_dir: Path = field(default_factory=default_rig_dir)
    memory_mib: int = int(os.environ.get("P2V_RIG_MEM_MIB", "1024"))
    smp: int = 1
    data_disk_mib: int = 512
    spare_disk_mib: int = 256
    suite: str = "bookworm"
    mirror: str = ""  # empty: take it from the host's apt sources
    repo_root: Path = REPO_ROOT
    #: Seconds to wait for P's boot script to report ready.
    boot_timeout_s: float = 120.0
    #: Seconds to wait for the source agent's ready file after P is ready.
    agent_timeout_s: float = 60.0
    #: Start libvirtd/virtlogd (the destination side needs them).
    with_libvirt: bool = True
    #: Start the long-lived TCP client in the client namespace.
    with_client: bool = True
    #: Extra input of the image hash (tests use it to force a new project layer without touching
    #: the image a running rig uses).
    image_salt: str = ""

    @property
    def cache_dir(self) -> Path:
        return self.rig_dir / "cache"

    @property
    def run_dir(self) -> Path:
        return self.rig_dir / "run"

    def kernel_version(self) -> str:
        return host_kernel_version()

    def apt_mirror(self) -> str:
        return self.mirror or host_debian_mirror()


def host_debian_mirror() -> str:
    """The Debian mirror configured on the host (deb822 or one-line sources), for debootstrap."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or not (path.suffix in (".list", ".sources") or path.name == "sources.list"):
            continue
        text = path.read_text(errors="replace")
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"^URIs:\s*(\S+)", line)
            if m and "security" not in m.group(1) and "debian" in m.group(1):
                return m.group(1)
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and "security" not in m.group(1) and "debian" in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"
