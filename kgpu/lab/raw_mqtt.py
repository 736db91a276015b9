"""MQTT 3.1.1 packets written by hand, for the lab's clients that a client library would get in the
way of: the benches' flooder, which must publish faster than paho can (bench/flood.py), and the
tests' login probe, which must see the broker's CONNACK code itself rather than a reconnect
(tests/helpers/dynsec.py)."""

from __future__ import annotations

import socket

DISCONNECT = b"\xe0\x00"


def _varint(n: int) -> bytes:
    """MQTT's variable-length integer (the remaining length)."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str | None = None, password: str | None = None, *,
                   keepalive_s: int = 0) -> bytes:
    """A CONNECT with a clean session; the username and password flags only for what is given."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    variable = _utf8("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big")
    payload = _utf8(client_id)
    payload += _utf8(username) if username is not None else b""
    payload += _utf8(password) if password is not None else b""
    return b"\x10" + _varint(len(variable) + len(payload)) + variable + payload


def publish_packet(topic: str, payload: bytes) -> bytes:
    """One PUBLISH, QoS 0, not retained."""
    body = _utf8(topic) + payload
    return b"\x30" + _varint(len(body)) + body


def read_connack(sock: socket.socket) -> bytes:
    """The broker's first 4 bytes after a CONNECT (a CONNACK is `20 02 flags code`); fewer when it
    closed the connection first."""
    answer = b""
    while len(answer) < 4:
        chunk = sock.recv(4 - len(answer))
        if not chunk:
            break
        answer += chunk
    return answer
