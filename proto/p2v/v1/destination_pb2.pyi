from p2v.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_TYPE_UNSPECIFIED: _ClassVar[DeviceType]
    DEVICE_TYPE_NIC: _ClassVar[DeviceType]
    DEVICE_TYPE_DISK: _ClassVar[DeviceType]

class RedundancyScheme(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUNDANCY_SCHEME_UNSPECIFIED: _ClassVar[RedundancyScheme]
    REDUNDANCY_SCHEME_NONE: _ClassVar[RedundancyScheme]
    REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP: _ClassVar[RedundancyScheme]
    REDUNDANCY_SCHEME_MD_RAID1: _ClassVar[RedundancyScheme]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_OK: _ClassVar[AckStatus]
    ACK_STATUS_DUPLICATE: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]
DEVICE_TYPE_UNSPECIFIED: DeviceType
DEVICE_TYPE_NIC: DeviceType
DEVICE_TYPE_DISK: DeviceType
REDUNDANCY_SCHEME_UNSPECIFIED: RedundancyScheme
REDUNDANCY_SCHEME_NONE: RedundancyScheme
REDUNDANCY_SCHEME_BOND_ACTIVE_BACKUP: RedundancyScheme
REDUNDANCY_SCHEME_MD_RAID1: RedundancyScheme
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_OK: AckStatus
ACK_STATUS_DUPLICATE: AckStatus
ACK_STATUS_REJECTED: AckStatus

class CatalogRequest(_message.Message):
    __slots__ = ("migration_id", "memory_bytes")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    memory_bytes: int
    def __init__(self, migration_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class VirtualDevice(_message.Message):
    __slots__ = ("type", "device_id", "name", "mac", "serial", "size_bytes", "scheme", "driver", "export_uri")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    EXPORT_URI_FIELD_NUMBER: _ClassVar[int]
    type: DeviceType
    device_id: str
    name: str
    mac: str
    serial: str
    size_bytes: int
    scheme: RedundancyScheme
    driver: str
    export_uri: str
    def __init__(self, type: _Optional[_Union[DeviceType, str]] = ..., device_id: _Optional[str] = ..., name: _Optional[str] = ..., mac: _Optional[str] = ..., serial: _Optional[str] = ..., size_bytes: _Optional[int] = ..., scheme: _Optional[_Union[RedundancyScheme, str]] = ..., driver: _Optional[str] = ..., export_uri: _Optional[str] = ...) -> None: ...

class VirtualDeviceCatalog(_message.Message):
    __slots__ = ("host_id", "devices", "max_memory_bytes", "free_disk_bytes", "vm_firmware_memmap", "kernel_releases", "vm_cpu_model", "cutover_supported")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    VM_FIRMWARE_MEMMAP_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASES_FIELD_NUMBER: _ClassVar[int]
    VM_CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    CUTOVER_SUPPORTED_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    devices: _containers.RepeatedCompositeFieldContainer[VirtualDevice]
    max_memory_bytes: int
    free_disk_bytes: int
    vm_firmware_memmap: _containers.RepeatedCompositeFieldContainer[MemoryRange]
    kernel_releases: _containers.RepeatedScalarFieldContainer[str]
    vm_cpu_model: str
    cutover_supported: bool
    def __init__(self, host_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[VirtualDevice, _Mapping]]] = ..., max_memory_bytes: _Optional[int] = ..., free_disk_bytes: _Optional[int] = ..., vm_firmware_memmap: _Optional[_Iterable[_Union[MemoryRange, _Mapping]]] = ..., kernel_releases: _Optional[_Iterable[str]] = ..., vm_cpu_model: _Optional[str] = ..., cutover_supported: _Optional[bool] = ...) -> None: ...

class MemoryRange(_message.Message):
    __slots__ = ("start", "end", "type")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    type: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., type: _Optional[str] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("source_host_id", "memory_bytes", "page_size", "max_pfn", "firmware_memmap", "kernel_release", "cpu_model", "migration_id", "streams", "nic_macs", "kernel_version", "waiting_vm", "pci_addresses")
    SOURCE_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PFN_FIELD_NUMBER: _ClassVar[int]
    FIRMWARE_MEMMAP_FIELD_NUMBER: _ClassVar[int]
    KERNEL_RELEASE_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    NIC_MACS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WAITING_VM_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    source_host_id: str
    memory_bytes: int
    page_size: int
    max_pfn: int
    firmware_memmap: _containers.RepeatedCompositeFieldContainer[MemoryRange]
    kernel_release: str
    cpu_model: str
    migration_id: str
    streams: int
    nic_macs: _containers.RepeatedScalarFieldContainer[str]
    kernel_version: str
    waiting_vm: bool
    pci_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source_host_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., page_size: _Optional[int] = ..., max_pfn: _Optional[int] = ..., firmware_memmap: _Optional[_Iterable[_Union[MemoryRange, _Mapping]]] = ..., kernel_release: _Optional[str] = ..., cpu_model: _Optional[str] = ..., migration_id: _Optional[str] = ..., streams: _Optional[int] = ..., nic_macs: _Optional[_Iterable[str]] = ..., kernel_version: _Optional[str] = ..., waiting_vm: _Optional[bool] = ..., pci_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class PrepareReply(_message.Message):
    __slots__ = ("migration_id", "max_batch_bytes", "window", "streams", "bulk_port", "bulk_token")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    BULK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    max_batch_bytes: int
    window: int
    streams: int
    bulk_port: int
    bulk_token: bytes
    def __init__(self, migration_id: _Optional[str] = ..., max_batch_bytes: _Optional[int] = ..., window: _Optional[int] = ..., streams: _Optional[int] = ..., bulk_port: _Optional[int] = ..., bulk_token: _Optional[bytes] = ...) -> None: ...

class PageBatch(_message.Message):
    __slots__ = ("migration_id", "stream_id", "seq", "round", "pfns", "flags", "compression", "payload", "raw_size", "checksum", "batch_id")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PFNS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    stream_id: int
    seq: int
    round: int
    pfns: bytes
    flags: bytes
    compression: Compression
    payload: bytes
    raw_size: int
    checksum: int
    batch_id: int
    def __init__(self, migration_id: _Optional[str] = ..., stream_id: _Optional[int] = ..., seq: _Optional[int] = ..., round: _Optional[int] = ..., pfns: _Optional[bytes] = ..., flags: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., payload: _Optional[bytes] = ..., raw_size: _Optional[int] = ..., checksum: _Optional[int] = ..., batch_id: _Optional[int] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("stream_id", "seq", "batch_id", "status", "error", "pages_written")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PAGES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    seq: int
    batch_id: int
    status: AckStatus
    error: str
    pages_written: int
    def __init__(self, stream_id: _Optional[int] = ..., seq: _Optional[int] = ..., batch_id: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., error: _Optional[str] = ..., pages_written: _Optional[int] = ...) -> None: ...

class RoundMark(_message.Message):
    __slots__ = ("migration_id", "round", "batches", "final")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    round: int
    batches: int
    final: bool
    def __init__(self, migration_id: _Optional[str] = ..., round: _Optional[int] = ..., batches: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class RoundAck(_message.Message):
    __slots__ = ("round", "pages_held", "durable")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PAGES_HELD_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    pages_held: int
    durable: bool
    def __init__(self, round: _Optional[int] = ..., pages_held: _Optional[int] = ..., durable: _Optional[bool] = ...) -> None: ...

class HeldHashesRequest(_message.Message):
    __slots__ = ("migration_id", "start_pfn", "end_pfn")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    START_PFN_FIELD_NUMBER: _ClassVar[int]
    END_PFN_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    start_pfn: int
    end_pfn: int
    def __init__(self, migration_id: _Optional[str] = ..., start_pfn: _Optional[int] = ..., end_pfn: _Optional[int] = ...) -> None: ...

class HashChunk(_message.Message):
    __slots__ = ("start_pfn", "hashes")
    START_PFN_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    start_pfn: int
    hashes: bytes
    def __init__(self, start_pfn: _Optional[int] = ..., hashes: _Optional[bytes] = ...) -> None: ...

class RedundancyEntry(_message.Message):
    __slots__ = ("id", "kind", "physical", "virtual", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    physical: str
    virtual: str
    detail: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., physical: _Optional[str] = ..., virtual: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class RedundancyReport(_message.Message):
    __slots__ = ("migration_id", "entries")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    entries: _containers.RepeatedCompositeFieldContainer[RedundancyEntry]
    def __init__(self, migration_id: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[RedundancyEntry, _Mapping]]] = ...) -> None: ...

class RedundancyAck(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class CutoverRequest(_message.Message):
    __slots__ = ("migration_id", "phase")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[CutoverRequest.Phase]
        PHASE_ANNOUNCE: _ClassVar[CutoverRequest.Phase]
        PHASE_ABORT: _ClassVar[CutoverRequest.Phase]
    PHASE_UNSPECIFIED: CutoverRequest.Phase
    PHASE_ANNOUNCE: CutoverRequest.Phase
    PHASE_ABORT: CutoverRequest.Phase
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    phase: CutoverRequest.Phase
    def __init__(self, migration_id: _Optional[str] = ..., phase: _Optional[_Union[CutoverRequest.Phase, str]] = ...) -> None: ...

class CutoverReply(_message.Message):
    __slots__ = ("endpoint", "token", "ready", "detail", "feed_mac", "feed_pci_address", "vm_nic_pci_addresses", "vm_disk_pci_addresses", "commit_gate_address", "dest_wall_ns")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    FEED_MAC_FIELD_NUMBER: _ClassVar[int]
    FEED_PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VM_NIC_PCI_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    VM_DISK_PCI_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_GATE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEST_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    token: bytes
    ready: bool
    detail: str
    feed_mac: str
    feed_pci_address: str
    vm_nic_pci_addresses: _containers.RepeatedScalarFieldContainer[str]
    vm_disk_pci_addresses: _containers.RepeatedScalarFieldContainer[str]
    commit_gate_address: int
    dest_wall_ns: int
    def __init__(self, endpoint: _Optional[str] = ..., token: _Optional[bytes] = ..., ready: _Optional[bool] = ..., detail: _Optional[str] = ..., feed_mac: _Optional[str] = ..., feed_pci_address: _Optional[str] = ..., vm_nic_pci_addresses: _Optional[_Iterable[str]] = ..., vm_disk_pci_addresses: _Optional[_Iterable[str]] = ..., commit_gate_address: _Optional[int] = ..., dest_wall_ns: _Optional[int] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("migration_id", "source_committed")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    source_committed: bool
    def __init__(self, migration_id: _Optional[str] = ..., source_committed: _Optional[bool] = ...) -> None: ...

class ResolveReply(_message.Message):
    __slots__ = ("vm_runs", "detail")
    VM_RUNS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    vm_runs: bool
    detail: str
    def __init__(self, vm_runs: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class ResumedRequest(_message.Message):
    __slots__ = ("migration_id", "host_id", "resumed_at", "unfrozen_at", "resume_steps", "cutover_bytes", "image_bytes", "image_pages_sent", "image_pages_skipped", "frozen_at")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    RESUMED_AT_FIELD_NUMBER: _ClassVar[int]
    UNFROZEN_AT_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEPS_FIELD_NUMBER: _ClassVar[int]
    CUTOVER_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PAGES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_AT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    host_id: str
    resumed_at: float
    unfrozen_at: float
    resume_steps: _containers.RepeatedScalarFieldContainer[str]
    cutover_bytes: int
    image_bytes: int
    image_pages_sent: int
    image_pages_skipped: int
    frozen_at: float
    def __init__(self, migration_id: _Optional[str] = ..., host_id: _Optional[str] = ..., resumed_at: _Optional[float] = ..., unfrozen_at: _Optional[float] = ..., resume_steps: _Optional[_Iterable[str]] = ..., cutover_bytes: _Optional[int] = ..., image_bytes: _Optional[int] = ..., image_pages_sent: _Optional[int] = ..., image_pages_skipped: _Optional[int] = ..., frozen_at: _Optional[float] = ...) -> None: ...

class ResumedReply(_message.Message):
    __slots__ = ("cancel_ids", "unload")
    CANCEL_IDS_FIELD_NUMBER: _ClassVar[int]
    UNLOAD_FIELD_NUMBER: _ClassVar[int]
    cancel_ids: _containers.RepeatedScalarFieldContainer[str]
    unload: bool
    def __init__(self, cancel_ids: _Optional[_Iterable[str]] = ..., unload: _Optional[bool] = ...) -> None: ...

class CompletionReport(_message.Message):
    __slots__ = ("migration_id", "cancelled", "failed", "detail")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    cancelled: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    def __init__(self, migration_id: _Optional[str] = ..., cancelled: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ...) -> None: ...
