"""MQTT 3.1.1 packets built by hand, for the few places that talk to a broker without paho: the load
generator's thousands of asyncio connections, and login probes (``broker run``'s reload check, the
login cost in ``bench edge``, tests that read a CONNACK's return code). Standard library only."""

from __future__ import annotations

import socket
import struct
from typing import Final

# Fixed-header first bytes (type << 4 | flags).
CONNECT: Final = 0x10
CONNACK: Final = 0x20
PUBLISH: Final = 0x30
PUBACK: Final = 0x40
SUBSCRIBE: Final = 0x82  # flags 0b0010 are mandatory
SUBACK: Final = 0x90
PINGREQ: Final = 0xC0
PINGRESP: Final = 0xD0
DISCONNECT: Final = 0xE0
PROTOCOL_LEVEL: Final = 4  # 3.1.1
CLEAN_SESSION: Final = 0x02
USERNAME_FLAG: Final = 0x80
PASSWORD_FLAG: Final = 0x40
QOS1: Final = 1
CONNACK_LENGTH: Final = 4  # fixed header, remaining length 2, session present, return code


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(value: str) -> bytes:
    """An MQTT UTF-8 string: two length bytes, then the text."""
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def packet(first: int, body: bytes) -> bytes:
    """A whole packet: first byte, remaining length, body."""
    return bytes([first]) + remaining_length(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int = 30,
    clean: bool = True,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT (no will), with a username and/or password when given."""
    flags = CLEAN_SESSION if clean else 0
    flags |= USERNAME_FLAG if username is not None else 0
    flags |= PASSWORD_FLAG if password is not None else 0
    body = utf8("MQTT") + bytes([PROTOCOL_LEVEL, flags]) + struct.pack("!H", keepalive_s) + utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return packet(CONNECT, body)


def read_connack(sock: socket.socket) -> bytes:
    """The broker's answer to a CONNECT sent on ``sock``: its first ``CONNACK_LENGTH`` bytes, fewer (or
    b"") when the broker closes the connection first."""
    reply = b""
    while len(reply) < CONNACK_LENGTH:
        chunk = sock.recv(CONNACK_LENGTH - len(reply))
        if not chunk:
            break
        reply += chunk
    return reply


def connack_accepted(reply: bytes) -> bool:
    """Whether ``reply`` (``read_connack``) is a CONNACK with return code 0 (accepted)."""
    return len(reply) == CONNACK_LENGTH and reply[0] == CONNACK and reply[3] == 0
