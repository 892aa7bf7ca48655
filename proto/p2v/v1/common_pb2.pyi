from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_STATE_UNSPECIFIED: _ClassVar[MigrationState]
    MIGRATION_STATE_SETUP: _ClassVar[MigrationState]
    MIGRATION_STATE_ACTIVE: _ClassVar[MigrationState]
    MIGRATION_STATE_CUTOVER: _ClassVar[MigrationState]
    MIGRATION_STATE_COMPLETED: _ClassVar[MigrationState]
    MIGRATION_STATE_FAILED: _ClassVar[MigrationState]
    MIGRATION_STATE_CANCELLED: _ClassVar[MigrationState]
    MIGRATION_STATE_ROLLED_BACK: _ClassVar[MigrationState]
MIGRATION_STATE_UNSPECIFIED: MigrationState
MIGRATION_STATE_SETUP: MigrationState
MIGRATION_STATE_ACTIVE: MigrationState
MIGRATION_STATE_CUTOVER: MigrationState
MIGRATION_STATE_COMPLETED: MigrationState
MIGRATION_STATE_FAILED: MigrationState
MIGRATION_STATE_CANCELLED: MigrationState
MIGRATION_STATE_ROLLED_BACK: MigrationState

class Hello(_message.Message):
    __slots__ = ("protocol_version", "min_protocol_version", "capabilities", "agent_version", "host_id", "role")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    min_protocol_version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    agent_version: str
    host_id: str
    role: str
    def __init__(self, protocol_version: _Optional[int] = ..., min_protocol_version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., agent_version: _Optional[str] = ..., host_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "capabilities", "agent_version", "host_id", "peer_identity")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    agent_version: str
    host_id: str
    peer_identity: str
    def __init__(self, protocol_version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., agent_version: _Optional[str] = ..., host_id: _Optional[str] = ..., peer_identity: _Optional[str] = ...) -> None: ...

class MigrationStats(_message.Message):
    __slots__ = ("transferred", "remaining", "total", "duplicate", "normal", "normal_bytes", "dirty_pages_rate", "mbps", "dirty_sync_count", "pages_per_second", "expected_downtime_ms", "setup_time_ms", "total_time_ms", "downtime_ms", "precopy_bytes", "downtime_bytes", "skipped", "resent_bytes", "cutover_pages")
    TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    NORMAL_FIELD_NUMBER: _ClassVar[int]
    NORMAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIRTY_PAGES_RATE_FIELD_NUMBER: _ClassVar[int]
    MBPS_FIELD_NUMBER: _ClassVar[int]
    DIRTY_SYNC_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    SETUP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    PRECOPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    RESENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUTOVER_PAGES_FIELD_NUMBER: _ClassVar[int]
    transferred: int
    remaining: int
    total: int
    duplicate: int
    normal: int
    normal_bytes: int
    dirty_pages_rate: float
    mbps: float
    dirty_sync_count: int
    pages_per_second: float
    expected_downtime_ms: int
    setup_time_ms: int
    total_time_ms: int
    downtime_ms: int
    precopy_bytes: int
    downtime_bytes: int
    skipped: int
    resent_bytes: int
    cutover_pages: int
    def __init__(self, transferred: _Optional[int] = ..., remaining: _Optional[int] = ..., total: _Optional[int] = ..., duplicate: _Optional[int] = ..., normal: _Optional[int] = ..., normal_bytes: _Optional[int] = ..., dirty_pages_rate: _Optional[float] = ..., mbps: _Optional[float] = ..., dirty_sync_count: _Optional[int] = ..., pages_per_second: _Optional[float] = ..., expected_downtime_ms: _Optional[int] = ..., setup_time_ms: _Optional[int] = ..., total_time_ms: _Optional[int] = ..., downtime_ms: _Optional[int] = ..., precopy_bytes: _Optional[int] = ..., downtime_bytes: _Optional[int] = ..., skipped: _Optional[int] = ..., resent_bytes: _Optional[int] = ..., cutover_pages: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "fraction", "detail")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    phase: str
    fraction: float
    detail: str
    def __init__(self, phase: _Optional[str] = ..., fraction: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class MigrationStatus(_message.Message):
    __slots__ = ("migration_id", "state", "stats", "progress", "error", "round", "timestamp_ms", "point_of_no_return")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    POINT_OF_NO_RETURN_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: MigrationState
    stats: MigrationStats
    progress: Progress
    error: str
    round: int
    timestamp_ms: int
    point_of_no_return: bool
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., stats: _Optional[_Union[MigrationStats, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[str] = ..., round: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., point_of_no_return: _Optional[bool] = ...) -> None: ...

class MigrationRef(_message.Message):
    __slots__ = ("migration_id",)
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    def __init__(self, migration_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("unfinished_only",)
    UNFINISHED_ONLY_FIELD_NUMBER: _ClassVar[int]
    unfinished_only: bool
    def __init__(self, unfinished_only: _Optional[bool] = ...) -> None: ...

class MigrationSummary(_message.Message):
    __slots__ = ("status", "peer", "started_ms", "updated_ms", "live", "attention")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    status: MigrationStatus
    peer: str
    started_ms: int
    updated_ms: int
    live: bool
    attention: str
    def __init__(self, status: _Optional[_Union[MigrationStatus, _Mapping]] = ..., peer: _Optional[str] = ..., started_ms: _Optional[int] = ..., updated_ms: _Optional[int] = ..., live: _Optional[bool] = ..., attention: _Optional[str] = ...) -> None: ...

class MigrationList(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationSummary]
    def __init__(self, migrations: _Optional[_Iterable[_Union[MigrationSummary, _Mapping]]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("migration_id", "state", "detail")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: MigrationState
    detail: str
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., detail: _Optional[str] = ...) -> None: ...
