"""Raw protocol frames for the tests that speak to a stage byte by byte (test_protocol.py,
test_auth.py): the header of cpp/protocol/protocol.h, a frame builder and a frame reader.

Header: ``HDR`` = magic u32, version u16, type u8, flags u8, request id u64, session id u64,
dtype u8, 3 pad bytes, payload length u32 (little-endian, 32 bytes).
"""

from __future__ import annotations

import socket
import struct

from nakshatra import _nakshatra

HDR = struct.Struct("<IHBBQQB3xI")  # magic, version, type, flags, request id, session id, dtype, payload_len
MAGIC = 0x534B414E
HELLO, HELLO_OK, OPEN, FORWARD, STATS, STATS_OK, AUTH, AUTH_OK, ERROR = 1, 2, 3, 5, 11, 12, 20, 21, 255


def frame(type_: int, payload: bytes = b"", *, request_id: int = 1, flags: int = 0, session: int = 0,
          version: int = _nakshatra.PROTOCOL_VERSION, magic: int = MAGIC, length: int | None = None) -> bytes:
    """One frame's bytes: header + ``payload``; ``length`` overrides the header's payload length
    (to send a lying header), ``version`` and ``magic`` a wrong protocol."""
    n = len(payload) if length is None else length
    return HDR.pack(magic, version, type_, flags, request_id, session, 0, n) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; raises ConnectionError when the peer closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def read_frame_bytes(sock: socket.socket) -> bytes:
    """One whole frame (header + payload) as received."""
    hdr = recv_exact(sock, HDR.size)
    return hdr + recv_exact(sock, HDR.unpack(hdr)[-1])


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One frame as (type, payload); asserts the magic."""
    f = read_frame_bytes(sock)
    magic, _, type_, *_ = HDR.unpack_from(f)
    assert magic == MAGIC
    return type_, f[HDR.size:]


def frame_type(f: bytes) -> int:
    """The type of a frame given as bytes."""
    return HDR.unpack_from(f)[2]
