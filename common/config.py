"""Agent configuration: a TOML file, then command-line overrides, into typed dataclasses.

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class TlsConfig:
    ca: str = "/etc/p2v/tls/ca.pem"
    cert: str = ""
    key: str = ""
    # Identities (certificate CN or DNS SAN) allowed to call this agent; empty = any
    # certificate signed by the CA.
    allowed_peers: list[str] = dataclasses.field(default_factory=list)
    # Name expected in the peer's certificate when this agent is the client.
    server_name: str = "p2v-dest"
    # Local development only: plaintext, no peer authentication.
    insecure: bool = False


@dataclasses.dataclass
class MigrationDefaults:
    streams: int = 3
    downtime_limit_ms: int = 300
    max_bandwidth_bytes: int = 0
    zstd_level: int = 1
    compression: bool = True
    max_rounds: int = 30
    #: right before FREEZE the cutover helper sends the pages changed since pre-copy's last round
    #: (while P still runs), so that the image carries fewer of them inside the downtime
    final_pass: bool = True


@dataclasses.dataclass
class SourceAgentSection:
    listen_unix: str = "/run/p2v/source.sock"
    listen_tcp: str = ""  # host:port; always TLS
    state_dir: str = "/var/lib/p2v-source"
    #: tmpfs, kept across the agent's restarts (systemd: RuntimeDirectoryPreserve=restart): what a
    #: cutover leaves for the next agent that only this boot's P can use (host_settings.PEER_NOTE_FILE)
    runtime_dir: str = "/run/p2v"
    log_level: str = "info"
    memory_source: str = "kcore"  # "kcore" or "file:/path"


@dataclasses.dataclass
class SourceConfig:
    agent: SourceAgentSection = dataclasses.field(default_factory=SourceAgentSection)
    tls: TlsConfig = dataclasses.field(default_factory=lambda: TlsConfig(
        cert="/etc/p2v/tls/p2v-source.pem", key="/etc/p2v/tls/p2v-source.key", server_name="p2v-dest",
        allowed_peers=["p2v-dest", "p2vctl"]))
    migration: MigrationDefaults = dataclasses.field(default_factory=MigrationDefaults)


@dataclasses.dataclass
class DestAgentSection:
    listen: str = "0.0.0.0:7470"
    listen_unix: str = ""  # optional local socket (no TLS; filesystem permissions guard it)
    state_dir: str = "/var/lib/p2v-dest"
    log_level: str = "info"


@dataclasses.dataclass
class DestLimits:
    max_batch_bytes: int = 1 << 20  # largest uncompressed payload accepted
    window: int = 8  # unacknowledged batches per stream
    max_streams: int = 8
    max_memory_bytes: int = 64 << 30
    #: a migration whose source says nothing this long is failed before the point of no return and
    #: its waiting VM destroyed (dest_agent.source_lease); 0 = never
    source_silence_s: int = 900


@dataclasses.dataclass
class DestVmConfig:
    """The waiting VM V builds for the hibernation carrier (dest_agent.vm_builder)."""
    enabled: bool = False  # build waiting VMs and receive images (cutover support)
    bridge: str = "br0"  # the VM's NICs join this bridge
    image_address: str = ""  # V's address for the image socket (reachable from P), required if enabled
    image_port: int = 0  # 0 = ephemeral
    feed_vm_ip: str = ""  # the waiting VM's feed NIC, CIDR (reachable from V), required if enabled
    feed_vm_mac: str = "52:54:00:fe:ed:01"
    feed_port: int = 7480
    #: the feed's shared memory (MiB, a power of two; 0 = the image goes over the feed NIC only):
    #: an ivshmem-plain device over /dev/shm, the image's pages skip the VM's network stack
    feed_ring_mib: int = 64
    name_prefix: str = "p2v-vm-"
    kernel_dir: str = "/boot"  # vmlinuz-<release> of P's kernel
    modules_base: str = "/"  # <base>/lib/modules/<release>
    work_dir: str = ""  # disks, console logs, initramfs cache; "" = <state_dir>/vm
    console_log: str = ""  # "" = <work_dir>/<vm name>.console.log
    control_socket: str = ""  # ttyS1 as a unix socket ("" = none)
    shared_ide_disks: list[str] = dataclasses.field(default_factory=list)  # "path:bus:unit[:format[:model]]"
    disk_bytes: int = 0  # the VM's local virtio disk (md's new home), 0 = none
    disk_serial: str = "p2v-data"
    vcpus: int = 1
    run_as_root: bool = False
    cpu_model: str = "qemu64"
    cpu_features: list[str] = dataclasses.field(default_factory=list)  # required on top of the model
    cpu_model_name: str = "QEMU Virtual CPU version 2.5+"  # what the VM's /proc/cpuinfo will say
    boot_timeout_s: int = 180


@dataclasses.dataclass
class DestConfig:
    agent: DestAgentSection = dataclasses.field(default_factory=DestAgentSection)
    tls: TlsConfig = dataclasses.field(default_factory=lambda: TlsConfig(
        cert="/etc/p2v/tls/p2v-dest.pem", key="/etc/p2v/tls/p2v-dest.key", server_name="p2v-source",
        allowed_peers=["p2v-source"]))
    limits: DestLimits = dataclasses.field(default_factory=DestLimits)
    # Virtual device catalog spec, validated by dest_agent.catalog.
    catalog: dict[str, Any] = dataclasses.field(default_factory=dict)
    vm: DestVmConfig = dataclasses.field(default_factory=DestVmConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict or isinstance(annotation, types.GenericAlias):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply "section.key=value" (from --set) onto the raw TOML tree."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {key} is not a table")
    node[keys[-1]] = value


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    for assignment in overrides or []:
        apply_override(data, assignment)
    return from_dict(cls, data)
