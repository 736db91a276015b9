"""Telemetry payloads in memory the controller shares with its sample writer process (Linux).

A backlog drain moves some 150 MB of payloads per 20,000 messages from the controller to its
sample writer process (cloud/sample_writer.py). In the frames, each payload was copied by msgpack's
encoding, by the pipe's write and read (the kernel, a system call per megabyte) and by the child's
join and decoding of the frame; the child's frame-reader thread and the controller's sample thread
spent some 0.09 s each of a 1.6 s drain on it, taking the interpreter lock from the threads that
decode and read. Here the controller copies a payload once, into an area both processes map (a
memfd), and the frame says where it lies: [offset, length].

The area is a ring: payloads are placed one after the other, from where the last one ended, and
wrap to the start when they reach the end; what lies between `tail` and `head` is live (the child
may still read it: the batch it writes, and the next one's first frames sent ahead), the rest is
free. The controller frees what the child is done with (`free_to`, once it answered a batch, or
`clear`, once it dropped or died). A payload with no room travels in its frame as before; so does
every payload where the system has no memfd (`create_area` gives None).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Sequence
from typing import Any

from shared.logs import get_logger

log = get_logger(__name__)


class PayloadArea:
    """The controller's side: the memfd (given to every child it starts) and the ring on it.
    Used from one thread (the ingest's sample thread)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)  # shared, read and write
        self.head = 0  # where the next payload goes
        self.tail = 0  # the oldest byte the child may still read
        self._placed = 0  # bytes placed (and left unused at the end on a wrap), ever
        self._freed = 0  # of which freed
        self.placed = 0  # payloads that went through the area
        self.inline = 0  # payloads that found no room and went in their frame

    @property
    def used(self) -> int:
        return self._placed - self._freed

    def mark(self) -> tuple[int, int]:
        """Where the ring stands now: `free_to` it once the child is done with what lies before."""
        return self.head, self._placed

    def place(self, payloads: Sequence[bytes]) -> list[Any]:
        """Copy each payload into the ring; its [offset, length], or the payload itself where
        there is no room for it."""
        out: list[Any] = []
        for payload in payloads:
            size = len(payload)
            at = self._room(size)
            if at is None:
                out.append(payload)
                self.inline += 1
                continue
            if at != self.head:  # wrapped: the end is left unused until what lies before it is freed
                self._placed += self.size - self.head
            self._map[at:at + size] = payload
            self.head = at + size
            self._placed += size
            self.placed += 1
            out.append([at, size])
        return out

    def _room(self, size: int) -> int | None:
        """Where a payload of `size` bytes goes (at `head`, or at 0 past the end), None: no room."""
        if size == 0 or size > self.size:
            return None
        if self.used == 0:  # empty: start over at 0
            self.head = self.tail = 0
            return 0
        head, tail = self.head, self.tail
        if head > tail:  # live: tail..head, free: head..end and 0..tail
            if head + size <= self.size:
                return head
            return 0 if size <= tail else None
        return head if head + size <= tail else None  # live: tail..end and 0..head, free: head..tail

    def free_to(self, mark: tuple[int, int]) -> None:
        """The child is done with everything placed before `mark`."""
        self.tail, self._freed = mark

    def clear(self) -> None:
        """The child reads nothing more of it (it dropped its frames, or died)."""
        self.head = self.tail = self._placed = self._freed = 0

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def create_area(size: int) -> PayloadArea | None:
    """A shared area of `size` bytes (its pages taken as they are first written), or None where
    the system gives none (not Linux, or refused): payloads then go in the frames."""
    if size <= 0 or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("kgpu-telemetry-payloads", os.MFD_CLOEXEC)  # Popen(pass_fds) hands it on
    except OSError as exc:
        log.warning("no shared memory for telemetry payloads (%s): they go through the pipe", exc)
        return None
    try:
        os.ftruncate(fd, size)
        return PayloadArea(fd, size)
    except (OSError, ValueError) as exc:
        os.close(fd)
        log.warning("no shared memory for telemetry payloads (%s): they go through the pipe", exc)
        return None


class AreaReader:
    """The child's side: the same area, read-only; a payload taken out by its reference."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._map = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        os.close(fd)  # the mapping keeps the memory

    def payload(self, reference: Any) -> bytes:
        """The payload at `reference` ([offset, length]); ValueError for one out of the area."""
        if not (isinstance(reference, list | tuple) and len(reference) == 2
                and all(type(x) is int for x in reference)):
            raise ValueError(f"a payload reference that is not [offset, length]: {str(reference)[:80]}")
        start, length = reference
        if start < 0 or length < 0 or start + length > self.size:
            raise ValueError(f"a payload reference out of the shared area: [{start}, {length}] of {self.size} bytes")
        return self._map[start:start + length]
