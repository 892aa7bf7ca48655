"""`p2v.v1.PageBatch` wire bytes by hand, and a lazy reader over a received buffer.

The bulk data plane (source_agent.transport, dest_agent.bulk_receiver) carries PageBatch
messages on plain sockets. Going through protobuf objects costs a full copy of the payload
on each side (SerializeToString, ParseFromString); at ~1 GB/s on a 2-core box that matters.
Here the sender emits the message as three buffers (head, payload, tail) so the payload goes
to the socket from where it already is, and the receiver reads the fields as views into the
buffer the socket filled, without copying the payload.

The bytes are exactly what protobuf's serializer produces for the same field values (fields
in number order, proto3 defaults omitted; tests/memory/test_page_wire.py checks this), so any
protobuf implementation can read them, and `read_batch` accepts any valid encoding (fields in
any order, repeated scalars: last wins, unknown fields skipped).

Framing on a bulk socket: a 4-byte little-endian length, then that many bytes of one message.
"""

from __future__ import annotations

import struct
from typing import Any

from p2v.v1 import destination_pb2

FRAME_HEADER = struct.Struct("<I")

# Field tags of PageBatch: (number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited).
_T_MIGRATION_ID = 0x0A
_T_STREAM_ID = 0x10
_T_SEQ = 0x18
_T_ROUND = 0x20
_T_PFNS = 0x2A
_T_FLAGS = 0x32
_T_COMPRESSION = 0x38
_T_PAYLOAD = 0x42
_T_RAW_SIZE = 0x48
_T_CHECKSUM = 0x51
_T_BATCH_ID = 0x58

_FIXED64 = struct.Struct("<Q")


def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1  # protobuf encodes negative int32/enum values as 10-byte varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(out: bytearray, tag: int, data: Any) -> None:
    n = len(data)
    if n:
        out.append(tag)
        out += _varint(n)
        out += data


def _int_field(out: bytearray, tag: int, value: int) -> None:
    if value:
        out.append(tag)
        out += _varint(value)


def encode_parts(*, migration_id: str, stream_id: int, seq: int, round: int, pfns: Any, flags: Any,
                 compression: int, payload: Any, raw_size: int, checksum: int, batch_id: int
                 ) -> tuple[bytes, Any, bytes]:
    """(head, payload, tail): their concatenation is the PageBatch's serialisation.

    `pfns`, `flags` and `payload` are bytes-like; the payload is returned as given (not copied).
    """
    head = bytearray()
    _len_field(head, _T_MIGRATION_ID, migration_id.encode())
    _int_field(head, _T_STREAM_ID, stream_id)
    _int_field(head, _T_SEQ, seq)
    _int_field(head, _T_ROUND, round)
    _len_field(head, _T_PFNS, pfns)
    _len_field(head, _T_FLAGS, flags)
    _int_field(head, _T_COMPRESSION, compression)
    n = len(payload)
    if n:
        head.append(_T_PAYLOAD)
        head += _varint(n)
    tail = bytearray()
    _int_field(tail, _T_RAW_SIZE, raw_size)
    if checksum:
        tail.append(_T_CHECKSUM)
        tail += _FIXED64.pack(checksum)
    _int_field(tail, _T_BATCH_ID, batch_id)
    return bytes(head), payload if n else b"", bytes(tail)


def message_parts(msg: destination_pb2.PageBatch, payload: Any = None) -> tuple[bytes, Any, bytes]:
    """encode_parts from a PageBatch message. `payload` (bytes-like, equal to msg.payload) spares
    reading the payload out of the message, which copies it."""
    return encode_parts(
        migration_id=msg.migration_id, stream_id=msg.stream_id, seq=msg.seq, round=msg.round,
        pfns=msg.pfns, flags=msg.flags, compression=msg.compression,
        payload=msg.payload if payload is None else payload, raw_size=msg.raw_size,
        checksum=msg.checksum, batch_id=msg.batch_id)


class WireError(ValueError):
    """Bytes that are not a valid protobuf encoding of a PageBatch."""


class WireBatch:
    """A PageBatch read lazily from a buffer: bytes fields are memoryviews into it.

    It has the attributes `decode_batch` and the destination's intake read from a PageBatch
    message, so both take either. The buffer must not be reused while the batch is alive.
    """

    __slots__ = (
        "_size",
        "batch_id",
        "checksum",
        "compression",
        "flags",
        "migration_id",
        "payload",
        "pfns",
        "raw_size",
        "round",
        "seq",
        "stream_id",
    )

    def __init__(self) -> None:
        empty = memoryview(b"")
        self.migration_id = ""
        self.stream_id = self.seq = self.round = self.compression = self.raw_size = 0
        self.checksum = self.batch_id = 0
        self.pfns = self.flags = self.payload = empty
        self._size = 0

    def ByteSize(self) -> int:  # the protobuf message's method name, for duck typing
        if self._size:  # read from a buffer
            return self._size
        head, payload, tail = self.parts()
        return len(head) + len(payload) + len(tail)

    def parts(self) -> tuple[bytes, Any, bytes]:
        """Wire bytes as (head, payload, tail), the payload not copied (see encode_parts)."""
        return encode_parts(migration_id=self.migration_id, stream_id=self.stream_id, seq=self.seq,
                            round=self.round, pfns=self.pfns, flags=self.flags, compression=self.compression,
                            payload=self.payload, raw_size=self.raw_size, checksum=self.checksum,
                            batch_id=self.batch_id)

    def SerializeToString(self) -> bytes:  # protobuf's method name
        return b"".join(self.parts())

    def to_message(self) -> destination_pb2.PageBatch:
        return destination_pb2.PageBatch(
            migration_id=self.migration_id, stream_id=self.stream_id, seq=self.seq, round=self.round,
            pfns=bytes(self.pfns), flags=bytes(self.flags), compression=self.compression,
            payload=bytes(self.payload), raw_size=self.raw_size, checksum=self.checksum, batch_id=self.batch_id)


# Scalar fields: name, and the bit width protobuf truncates the varint to (uint32 / uint64 / enum).
_SCALARS = {
    2: ("stream_id", 32), 3: ("seq", 64), 4: ("round", 32), 7: ("compression", 32),
    9: ("raw_size", 32), 11: ("batch_id", 64),
}
_BYTES = {5: "pfns", 6: "flags", 8: "payload"}


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):  # a varint is at most 10 bytes
        if pos >= end:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    raise WireError("varint longer than 10 bytes")


def read_batch(data: Any) -> WireBatch:
    """Parse PageBatch wire bytes without copying the bytes fields; raise WireError if invalid."""
    buf = memoryview(data).cast("B")
    end = len(buf)
    batch = WireBatch()
    batch._size = end
    pos = 0
    for _ in range(end):  # each iteration consumes at least one byte
        if pos >= end:
            break
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos, end)
            scalar = _SCALARS.get(number)
            if scalar is not None:
                name, bits = scalar
                value &= (1 << bits) - 1
                if name == "compression" and value >= 1 << 31:
                    value -= 1 << 32  # an enum is an int32
                setattr(batch, name, value)
            elif number in _BYTES or number in (1, 10):
                raise WireError(f"field {number} has the wrong wire type")
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            if length > end - pos:
                raise WireError(f"field {number} runs past the end of the message")
            view = buf[pos:pos + length]
            pos += length
            if number in _BYTES:
                setattr(batch, _BYTES[number], view)
            elif number == 1:
                try:
                    batch.migration_id = str(view, "utf-8")
                except UnicodeDecodeError:
                    raise WireError("migration_id is not UTF-8") from None
            elif number in _SCALARS or number == 10:
                raise WireError(f"field {number} has the wrong wire type")
        elif wire_type == 1:
            if end - pos < 8:
                raise WireError("truncated fixed64")
            value = _FIXED64.unpack_from(buf, pos)[0]
            pos += 8
            if number == 10:
                batch.checksum = value
            elif number in _SCALARS or number in _BYTES or number == 1:
                raise WireError(f"field {number} has the wrong wire type")
        elif wire_type == 5:
            if end - pos < 4:
                raise WireError("truncated fixed32")
            if number <= 11:
                raise WireError(f"field {number} has the wrong wire type")
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
    return batch


# -- the bulk socket's handshake and TLS ----------------------------------------------------------

# First frame on a bulk socket: this magic, then the token from PrepareReply.bulk_token. The
# destination answers with one BatchAck frame (seq 0): ACK_STATUS_OK, or REJECTED with the
# reason, then it closes. A zero-length frame from the source means "no more batches" (a TLS
# transport cannot half-close); the destination then closes after the last ack.
HELLO_MAGIC = b"P2VBULK1"
BULK_CAPABILITY = "bulk-socket"


def server_ssl_context(cfg: Any) -> Any:
    """Mutual TLS 1.3 for the bulk listener, from the same files as the gRPC server (TlsConfig)."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cfg.cert, cfg.key)
    ctx.load_verify_locations(cfg.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ssl_context(cfg: Any) -> Any:
    """Client side: our certificate, the CA, and the destination's name checked (cfg.server_name),
    like the gRPC channel's ssl_target_name_override."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cfg.ca)
    ctx.load_cert_chain(cfg.cert, cfg.key)
    ctx.check_hostname = True
    return ctx


def cert_identities(peercert: dict | None) -> list[str]:
    """CN and DNS/IP SANs of a verified peer certificate (ssl's getpeercert() dict)."""
    if not peercert:
        return []
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    return names
