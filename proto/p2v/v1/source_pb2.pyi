from p2v.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DiscoverRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Nic(_message.Message):
    __slots__ = ("name", "mac", "driver", "pci_address", "pci_id", "addresses", "mtu", "master", "kind", "up", "bond_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PCI_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    BOND_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    mac: str
    driver: str
    pci_address: str
    pci_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    mtu: int
    master: str
    kind: str
    up: bool
    bond_mode: str
    def __init__(self, name: _Optional[str] = ..., mac: _Optional[str] = ..., driver: _Optional[str] = ..., pci_address: _Optional[str] = ..., pci_id: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., mtu: _Optional[int] = ..., master: _Optional[str] = ..., kind: _Optional[str] = ..., up: _Optional[bool] = ..., bond_mode: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("destination", "gateway", "device")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    destination: str
    gateway: str
    device: str
    def __init__(self, destination: _Optional[str] = ..., gateway: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class BlockDevice(_message.Message):
    __slots__ = ("name", "size_bytes", "driver", "pci_address", "pci_id", "serial", "holders", "removable", "md_level", "md_members", "kind", "parent")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PCI_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    REMOVABLE_FIELD_NUMBER: _ClassVar[int]
    MD_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MD_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    driver: str
    pci_address: str
    pci_id: str
    serial: str
    holders: _containers.RepeatedScalarFieldContainer[str]
    removable: bool
    md_level: str
    md_members: _containers.RepeatedScalarFieldContainer[str]
    kind: str
    parent: str
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., driver: _Optional[str] = ..., pci_address: _Optional[str] = ..., pci_id: _Optional[str] = ..., serial: _Optional[str] = ..., holders: _Optional[_Iterable[str]] = ..., removable: _Optional[bool] = ..., md_level: _Optional[str] = ..., md_members: _Optional[_Iterable[str]] = ..., kind: _Optional[str] = ..., parent: _Optional[str] = ...) -> None: ...

class FirmwareMemoryEntry(_message.Message):
    __slots__ = ("start", "end", "type")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    type: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., type: _Optional[str] = ...) -> None: ...

class Inventory(_message.Message):
    __slots__ = ("host_id", "hostname", "kernel_release", "cpu_model", "cpus", "memory_bytes", "mem_available_bytes", "nics", "routes", "block_devices", "firmware_memmap", "snapshot_device", "lockdown")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NICS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_DEVICES_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_MEMMAP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOCKDOWN_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    kernel_release: str
    cpu_model: str
    cpus: int
    memory_bytes: int
    mem_available_bytes: int
    nics: _containers.RepeatedCompositeFieldContainer[Nic]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    block_devices: _containers.RepeatedCompositeFieldContainer[BlockDevice]
    firmware_memmap: _containers.RepeatedCompositeFieldContainer[FirmwareMemoryEntry]
    snapshot_device: bool
    lockdown: str
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., kernel_release: _Optional[str] = ..., cpu_model: _Optional[str] = ..., cpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., nics: _Optional[_Iterable[_Union[Nic, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., block_devices: _Optional[_Iterable[_Union[BlockDevice, _Mapping]]] = ..., firmware_memmap: _Optional[_Iterable[_Union[FirmwareMemoryEntry, _Mapping]]] = ..., snapshot_device: _Optional[bool] = ..., lockdown: _Optional[str] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("destination",)
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    destination: str
    def __init__(self, destination: _Optional[str] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("code", "message", "blocking")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BLOCKING_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    blocking: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., blocking: _Optional[bool] = ...) -> None: ...

class PlannedPair(_message.Message):
    __slots__ = ("physical", "virtual", "scheme")
    PHYSICAL_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    physical: str
    virtual: str
    scheme: str
    def __init__(self, physical: _Optional[str] = ..., virtual: _Optional[str] = ..., scheme: _Optional[str] = ...) -> None: ...

class CheckVerdict(_message.Message):
    __slots__ = ("ok", "reasons", "plan", "unpaired")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    UNPAIRED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    plan: _containers.RepeatedCompositeFieldContainer[PlannedPair]
    unpaired: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., plan: _Optional[_Iterable[_Union[PlannedPair, _Mapping]]] = ..., unpaired: _Optional[_Iterable[str]] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("destination", "streams", "downtime_limit_ms", "max_bandwidth_bytes", "no_compression", "max_rounds", "memory_source", "dry_run", "rehearse")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_BYTES_FIELD_NUMBER: _ClassVar[int]
    NO_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REHEARSE_FIELD_NUMBER: _ClassVar[int]
    destination: str
    streams: int
    downtime_limit_ms: int
    max_bandwidth_bytes: int
    no_compression: bool
    max_rounds: int
    memory_source: str
    dry_run: bool
    rehearse: bool
    def __init__(self, destination: _Optional[str] = ..., streams: _Optional[int] = ..., downtime_limit_ms: _Optional[int] = ..., max_bandwidth_bytes: _Optional[int] = ..., no_compression: _Optional[bool] = ..., max_rounds: _Optional[int] = ..., memory_source: _Optional[str] = ..., dry_run: _Optional[bool] = ..., rehearse: _Optional[bool] = ...) -> None: ...

class RollbackReply(_message.Message):
    __slots__ = ("migration_id", "undone", "state", "failed")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    UNDONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    undone: _containers.RepeatedScalarFieldContainer[str]
    state: _common_pb2.MigrationState
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, migration_id: _Optional[str] = ..., undone: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[_common_pb2.MigrationState, str]] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...
