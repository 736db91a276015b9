"""The fleet's telemetry writes in a process of their own: the controller's second core.

Why (docs/benchmarks.md, "The steady 20,000 GPU samples a second"): one controller process did not
keep up with 2,500 nodes x 8 GPUs every second on two cores, because its writer thread waited for
the interpreter lock 37 % of its time: SQLite's driver releases the lock around every step, and the
MQTT network thread and the event loop take it meanwhile. Telemetry is most of what is written and
needs no ack, so its writes run in a child process, with an interpreter lock of its own.

How: the controller budgets and accounts every message as before (cloud/ingest.py), but only
peeks at telemetry (cloud/telemetry_peek.py: node, time, id, GPUs), and hands a batch's telemetry
to the child as the bytes that arrived (placed in a ring of memory both processes share,
cloud/payload_area.py, the frame saying where), with the time they arrived, the node's clock skew
and, where the node's GPU budget left samples out, the GPUs it kept (`RawTelemetry`). The child
validates them in full (shared.protocol.decode_and_check: the checks and reasons of one process,
some 17 µs a message: the controller's core is left for reading the broker), tells the controller
what it refused and why (`SamplesWritten.refused`, logged here as the controller logs its own), and
writes the rest through `IngestCore.ingest`, the same code as in one process; the latest samples
held by `latest_sample_every` wait and are written there too. Events and statuses stay in the
controller's own writer: they carry the acks.

The two talk over the child's stdin and stdout, in frames of a 4-byte length and a msgpack map:
first {"op": "open", "settings": {...}} (`WriterSettings`), answered once the store is open; then
a batch as {"op": "add", "items": [...]} frames (not answered) and a last {"op": "write", "items":
[...]}, written in one transaction and answered {"ok": true, "samples": N, "refused": [[place,
reason], ...]} or {"ok": false, "error": "store" | "refused", "message": ..., "reason": ...};
{"op": "drop"} (not answered) forgets the batch's frames so far; {"op": "stop"} is answered once the
samples that waited are written. The child reads its frames ahead on a thread of its own
(`FrameReader`, a few frames at most), so that the controller's write of a frame ends once it is
in, and its sample thread encodes the next while the child decodes this one; the controller reads
the answers on one too. `write` blocks (on the ingest's sample thread, never the event loop) until
the child answers, sending meanwhile the next batch's first frames (`ahead`): the child's next
batch is under way in the pipe while it writes this one. The ingest hands it one batch at a time
(cloud/sample_handover.py), so the child's pace is the back-pressure (a frame sent ahead waits in
the pipe). A database error comes back as FleetStoreError and a refused batch as ValueError,
which the ingest retries or counts as it does its own writes; a child that died is started again by the next
`write` (telemetry written twice is a no-op: the history's unique index, the latest sample's
WHERE). The child's logs go to the controller's stderr, in its format.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec

from cloud.gc_tuning import tune_gc_for_ingest
from cloud.payload_area import AreaReader, PayloadArea, create_area
from cloud.store.base import DEFAULT_BUSY_TIMEOUT_MS, FleetStoreError
from cloud.store.batch import Incoming
from cloud.store.ingest import IngestCore
from cloud.wal_checkpointer import WalCheckpointer
from shared.logs import ThrottledLog, get_logger, setup_logging
from shared.protocol import Direction, RejectedMessage, TelemetryBodyStruct, decode_and_check

log = get_logger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30  # a batch is at most batch_size x the payload limit; a longer length is a broken pipe
FRAME_MESSAGES = 1_000  # messages a frame: bounds what both sides hold of a batch in transit
PIPE_BYTES = 1 << 20  # the pipes' buffer, where the system allows it (_widen_pipe)
READ_AHEAD_FRAMES = 4  # frames the child holds read and not yet decoded, at most (FrameReader)
AREA_BYTES = 64 * 1024 * 1024  # the shared payload ring (cloud/payload_area.py) when the ingest names no size
AHEAD_POLL_S = 0.005  # while the child writes a batch, how often `write` looks for the next one's messages
START_TIMEOUT_S = 60.0  # the child imports SQLAlchemy and opens the store: a second or two, more when busy


class RawTelemetry(NamedTuple):
    """One telemetry message as the child takes it: what arrived, and what the controller decided
    about it (arrival time, the node's clock skew, and the GPUs whose samples its budget kept, None
    for all)."""

    topic: str
    payload: bytes
    received_at: float
    clock_skew: float
    kept: tuple[str, ...] | None


class SamplesWritten(NamedTuple):
    """A batch written by the child: its GPU samples stored, and the messages it refused (their
    place in the batch -> the reason, as `kgpu_ingest_rejected_total` counts it)."""

    samples: int
    refused: dict[int, str]


@dataclasses.dataclass(frozen=True)
class WriterSettings:
    """What the child needs to open the same store as the controller: its first frame on stdin
    (not its command line, which any user of the machine can read: the URL may hold a password)."""

    db: str
    history_resolution_s: float = 0.0
    latest_sample_every: float = 0.0
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS
    log_level: str = "info"
    log_json: bool | None = None
    reject_log_every_s: float = 10.0  # the controller's reject_log_interval


class WriterProcessEnded(FleetStoreError):
    """The child ended (crashed, killed, or never started): the batch was not written."""


# -- the frames, both sides ------------------------------------------------------------------------

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def _widen_pipe(fd: int) -> None:
    """The pipe's buffer as large as Linux lets an unprivileged process make it (1 MiB by
    default, against 64 KiB): a frame of 1,000 telemetry messages is some 7.5 MB, and each
    buffer's worth costs the controller's sample thread a write and the GIL back, and the child
    a read. Elsewhere (or refused) the pipe stays as it is."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, PIPE_BYTES))


def _send(stream: IO[bytes], message: dict[str, Any]) -> None:
    body = _encode(message)
    data = memoryview(_LENGTH.pack(len(body)) + body)
    while data:  # an unbuffered pipe may take less than all of it
        written = stream.write(data)
        data = data[written if written is not None else 0:]
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    """`size` bytes, or None at the end of the stream (the other side is gone)."""
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(stream: IO[bytes]) -> dict[str, Any] | None:
    head = _read_exact(stream, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes: the pipe is out of step")
    body = _read_exact(stream, size)
    if body is None:
        return None
    message = _decode(body)
    if not isinstance(message, dict):
        raise ValueError("a frame that is not a map: the pipe is out of step")
    return message


# -- the controller's side -------------------------------------------------------------------------


class SampleWriterProcess:
    """The controller's handle on the child. Blocking calls, made from ONE thread (the ingest's
    sample thread); `kill` from any."""

    def __init__(self, settings: WriterSettings, *, start_timeout_s: float = START_TIMEOUT_S,
                 frame_messages: int = FRAME_MESSAGES, area_bytes: int = AREA_BYTES) -> None:
        self.settings = settings
        self.area_bytes = area_bytes  # the shared payload ring's size (0: payloads go in the frames)
        self.area: PayloadArea | None = None  # made at the first start, kept for every child after
        self.start_timeout_s = start_timeout_s
        self.frame_messages = max(1, frame_messages)
        self.starts = 0  # children started (a restart after the first counts in kgpu_ingest_sample_writer_starts)
        # messages of the next batch sent ahead (in "add" frames) while the child wrote the one before
        self.sent_ahead = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._answers: FrameReader | None = None  # the child's stdout, read on a thread of its own
        self._lock = threading.Lock()  # `kill` from another thread against a start or a stop

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child and wait until its store is open; FleetStoreError with its reason if
        it cannot open it (a restart is tried again by the next `write`)."""
        with self._lock:
            self._kill_locked()
            if self.area is None and self.area_bytes > 0:
                self.area = create_area(self.area_bytes)
                self.area_bytes = self.area.size if self.area is not None else 0  # not asked again
            area = self.area
            root = str(Path(__file__).resolve().parent.parent)  # where `cloud` is importable from
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cloud.sample_writer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=env, close_fds=True, pass_fds=(area.fd,) if area is not None else (), bufsize=0)
            self.starts += 1
            proc = self._proc
            assert proc.stdin is not None and proc.stdout is not None
            self._answers = FrameReader(proc.stdout)  # always read: a child never waits to answer
            self.sent_ahead = 0
        _widen_pipe(proc.stdin.fileno())  # the batches' way (answers are small)
        opening: dict[str, Any] = {"op": "open", "settings": dataclasses.asdict(self.settings)}
        if area is not None:
            opening["area"] = {"fd": area.fd, "bytes": area.size}
        try:
            _send(proc.stdin, opening)
        except OSError as exc:
            raise self._ended(proc, exc) from None
        try:
            self._answer(proc, self.start_timeout_s)
        except queue.Empty:
            self.kill()
            raise WriterProcessEnded(f"sample writer process: not ready within {self.start_timeout_s:.0f} s",
                                     reason="writer process start timed out") from None
        except BaseException:
            self.kill()  # it said why (its store did not open) and is leaving
            raise
        log.info("sample writer process started", extra={"pid": proc.pid, "starts": self.starts})

    def write(self, items: Sequence[RawTelemetry],
              ahead: Callable[[int], Sequence[RawTelemetry]] | None = None) -> SamplesWritten:
        """Write these telemetry messages in ONE transaction of the child's; what it wrote and
        what it refused (validated in full there: the controller only peeked at them).
        They travel in frames of at most `frame_messages` ("add" ... "write": a frame of 5,000
        messages would be some 37 MB, held twice on each side while it travels), not answered
        until the last, so that the child decodes one frame while the next is encoded. Raises
        FleetStoreError (retry), ValueError (refused: never retry) or WriterProcessEnded.

        `ahead(sent)`: while the child writes, the next batch's first messages (those after the
        `sent` already sent ahead), sent as "add" frames of the child's next batch, so that it
        decodes them the moment it has answered instead of waiting for the controller to take
        its answer and send them (traced: 30-40 ms a batch, with the frames then coming slower
        than it decodes). The next `write`'s `items` must begin with them (cloud/sample_handover.py
        puts them first); `sent_ahead` says how many went. A batch that fails takes them back:
        the child drops its next batch, and they go again with it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            if proc is not None:
                log.error("sample writer process ended (exit code %s): starting it again", proc.returncode)
            self.start()
            proc = self._proc
            assert proc is not None
        sent, self.sent_ahead = self.sent_ahead, 0
        if sent > len(items):  # not the messages sent ahead: the child's batch starts again
            self._send(proc, {"op": "drop"})
            sent = 0
        self._send_frames(proc, items[sent:], last=True)
        # What the answer frees of the ring: all placed so far (frames dropped included: the child
        # has read them by the time it answers), not what goes ahead while it writes
        done = self.area.mark() if self.area is not None else None
        while True:
            try:
                answer = self._answer(proc, AHEAD_POLL_S if ahead is not None else None)
                break
            except queue.Empty:
                assert ahead is not None
                more = ahead(self.sent_ahead)
                if more:
                    self._send_frames(proc, more, last=False)
                    self.sent_ahead += len(more)
            except BaseException as exc:
                if isinstance(exc, FleetStoreError | ValueError) and not isinstance(exc, WriterProcessEnded):
                    self._free(done)  # it answered: done with the batch (a child that ended freed all)
                self._drop_ahead()
                raise
        self._free(done)
        refused = {int(at): str(reason) for at, reason in answer.get("refused") or ()}
        return SamplesWritten(int(answer.get("samples", 0)), refused)

    def _drop_ahead(self) -> None:
        """The batch failed: the next one's messages sent ahead are dropped by the child (if it
        lives), to go again, whole, with their batch. Their payloads stay in the ring until the
        child answers again: it may be reading them now, before it comes to the "drop"."""
        proc, sent, self.sent_ahead = self._proc, self.sent_ahead, 0
        if sent and proc is not None and proc.poll() is None:
            with contextlib.suppress(WriterProcessEnded):
                self._send(proc, {"op": "drop"})

    def _free(self, mark: tuple[int, int] | None) -> None:
        if self.area is not None and mark is not None:
            self.area.free_to(mark)

    def _send_frames(self, proc: subprocess.Popen[bytes], items: Sequence[RawTelemetry], *, last: bool) -> None:
        """`items` in "add" frames of `frame_messages` at most, the last a "write" if `last`."""
        size = self.frame_messages
        starts = range(0, len(items), size) if items or not last else range(1)
        for start in starts:
            op = "write" if last and start + size >= len(items) else "add"
            frame = items[start:start + size]
            rows: list[tuple[Any, ...]]
            if self.area is not None:  # each payload where it lies in the shared ring, unless it found no room
                payloads = self.area.place([item.payload for item in frame])
                rows = [(i.topic, p, i.received_at, i.clock_skew, i.kept) for i, p in zip(frame, payloads, strict=True)]
            else:
                rows = [tuple(item) for item in frame]
            self._send(proc, {"op": op, "items": rows})

    def _send(self, proc: subprocess.Popen[bytes], frame: dict[str, Any]) -> None:
        assert proc.stdin is not None
        try:
            _send(proc.stdin, frame)
        except (BrokenPipeError, OSError) as exc:
            raise self._ended(proc, exc) from None

    def stop(self, timeout_s: float) -> int:
        """Ask the child to write the samples that wait and leave; how many it wrote then. Killed
        if it does not leave within `timeout_s` (what waited is then lost: only latest figures)."""
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return 0
        assert proc.stdin is not None
        flushed = 0
        try:
            _send(proc.stdin, {"op": "stop"})
            with contextlib.suppress(queue.Empty):
                flushed = int(self._answer(proc, timeout_s).get("flushed", 0))
            proc.wait(max(0.1, timeout_s))
        except (OSError, FleetStoreError, subprocess.TimeoutExpired) as exc:
            log.warning("sample writer process did not stop cleanly: %s", exc)
        finally:
            self.close()
        return flushed

    def close(self) -> None:
        """End the child now and give the shared payload ring back (a later `write` makes another)."""
        with self._lock:
            self._kill_locked()
            area, self.area = self.area, None
            self.area_bytes = area.size if area is not None else self.area_bytes
        if area is not None:
            area.close()

    def kill(self) -> None:
        """End the child now (a write in flight fails with WriterProcessEnded)."""
        with self._lock:
            self._kill_locked()

    def _kill_locked(self) -> None:
        proc, self._proc = self._proc, None
        self.sent_ahead, self._answers = 0, None
        if self.area is not None:
            self.area.clear()
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _answer(self, proc: subprocess.Popen[bytes], timeout_s: float | None) -> dict[str, Any]:
        """The child's next answer (queue.Empty after `timeout_s`, None: no bound)."""
        answers = self._answers
        if answers is None:
            raise self._ended(proc, None)
        try:
            answer = answers.get(timeout_s)
        except (OSError, ValueError) as exc:
            raise self._ended(proc, exc) from None
        if answer is None:
            raise self._ended(proc, None)
        if answer.get("ok"):
            return answer
        message = str(answer.get("message") or "the sample writer process failed")
        if answer.get("error") == "refused":
            raise ValueError(message)
        raise FleetStoreError(message, reason=str(answer.get("reason") or message))

    def _ended(self, proc: subprocess.Popen[bytes], exc: BaseException | None) -> WriterProcessEnded:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)
        code = proc.poll()
        self.kill()  # the next write starts a new one
        why = f" ({exc})" if exc is not None else ""
        return WriterProcessEnded(f"sample writer process ended (exit code {code}){why}: the batch is written "
                                  "again by a new one", reason="writer process ended")


# -- the child's side ------------------------------------------------------------------------------


def decode_batch(items: Sequence[Sequence[Any]], first: int = 0, reject_log: ThrottledLog | None = None,
                 area: AreaReader | None = None) -> tuple[list[Incoming], dict[int, str]]:
    """The controller's `RawTelemetry` rows as the store's `Incoming`: validated in full (the
    controller only peeked at them: cloud/telemetry_peek.py), with the controller's arrival time
    and clock skew, and only the samples its budget kept. Also the messages refused, by their
    place in the batch (`first` is the place of `items[0]`) -> the reason, each logged as the
    controller logs its own refusals (`reject_log`: one line per reason every so often). A row's
    payload is its bytes, or [offset, length] in the shared `area` (cloud/payload_area.py);
    ValueError for such a reference without an area, or out of it (the frame is out of shape)."""
    batch: list[Incoming] = []
    refused: dict[int, str] = {}
    for at, row in enumerate(items, first):
        item = RawTelemetry(*row)
        if not isinstance(item.payload, bytes):
            if area is None:
                raise ValueError("a payload reference, and no shared area was opened")
            item = item._replace(payload=area.payload(item.payload))
        try:
            checked = decode_and_check(item.topic, item.payload, direction=Direction.EDGE_TO_CLOUD,
                                       typed_body_only=True)
        except RejectedMessage as exc:
            refused[at] = exc.reason
            if reject_log is not None:
                reject_log.log(exc.reason, "rejected message: %s: %s", exc.reason, exc.detail[:300],
                               extra={"topic": item.topic[:200]})
            continue
        body = checked.body
        if item.kept is not None and isinstance(body, TelemetryBodyStruct):
            kept = set(item.kept)
            body = msgspec.structs.replace(body, samples=[s for s in body.samples if s.uuid in kept])
        batch.append(Incoming(envelope=checked.envelope, body=body, received_at=item.received_at,
                              clock_skew=item.clock_skew))
    return batch, refused


class FrameReader:
    """One side's incoming frames read ahead on a thread of its own (`READ_AHEAD_FRAMES` at most).
    In the child, so that the controller's write of a frame ends as soon as it is in, not once the
    child has decoded the one before (traced: the child waited 0.19 s of a 1.67 s drain for
    frames); in the controller, so that the child never waits to answer while the controller
    sends it the next batch's frames. The end of the input reads as None; a frame out of step is
    raised where it is taken."""

    _END = object()

    def __init__(self, requests: IO[bytes]) -> None:
        self._frames: queue.Queue[Any] = queue.Queue(READ_AHEAD_FRAMES)
        self._thread = threading.Thread(target=self._read, args=(requests,), name="frame-reader", daemon=True)
        self._thread.start()

    def _read(self, requests: IO[bytes]) -> None:
        try:
            while (frame := _receive(requests)) is not None:
                self._frames.put(frame)
        except (OSError, ValueError) as exc:
            self._frames.put(exc)
            return
        self._frames.put(self._END)

    def get(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The next frame (None: the controller is gone); queue.Empty after `timeout_s`."""
        frame = self._frames.get(timeout=timeout_s)
        if frame is self._END:
            self._frames.put(frame)  # every later get sees the end too
            return None
        if isinstance(frame, BaseException):
            raise frame
        return frame


def serve(settings: WriterSettings, requests: IO[bytes], answers: IO[bytes], area: AreaReader | None = None) -> int:
    """The child's loop: open the store, answer frames until "stop" or the controller is gone;
    payloads in the shared `area` where the frames say so."""
    try:  # its commits synced by the checkpoints after them (cloud/wal_checkpointer.py: why)
        store = IngestCore(settings.db, history_resolution_s=settings.history_resolution_s,
                           latest_sample_every=settings.latest_sample_every,
                           busy_timeout_ms=settings.busy_timeout_ms, sync_every_commit=False, auto_checkpoint=False)
    except (FleetStoreError, ValueError) as exc:
        _send(answers, {"ok": False, "error": "store", "message": str(exc),
                        "reason": getattr(exc, "reason", str(exc))})
        return 1
    tune_gc_for_ingest()
    _send(answers, {"ok": True, "ready": True, "pid": os.getpid()})
    reject_log = ThrottledLog(log, settings.reject_log_every_s)
    batch = Batch(reject_log, area)
    frames = FrameReader(requests)
    checkpoints = WalCheckpointer(store)
    try:
        while True:
            due = store.latest_due_in()
            try:  # the latest samples that wait are written when due while no batch is in progress
                request = frames.get(due if due is not None and not batch.received else None)
            except queue.Empty:
                _flush(store, everything=False)
                checkpoints.request()
                continue
            if request is None:  # the controller is gone: write what waits, and leave
                _flush(store, everything=True)
                return 0
            op = request.get("op")
            if op == "stop":
                _send(answers, {"ok": True, "flushed": _flush(store, everything=True)})
                return 0
            if op == "drop":  # the batch before failed: this one's messages sent ahead come again with it
                batch = Batch(reject_log, area)
                continue
            if op not in ("add", "write"):
                batch = Batch(reject_log, area)
                _send(answers, {"ok": False, "error": "refused", "message": f"unknown op {op!r}"})
                continue
            batch.add(request.get("items") or [])
            if op == "write":
                _send(answers, batch.write(store))
                checkpoints.request()
                batch = Batch(reject_log, area)
    finally:
        checkpoints.stop()  # the last commits synced before the process leaves
        store.close()


class Batch:
    """The messages of one batch as its frames arrive ("add", not answered, so the controller
    encodes the next frame while this decodes the last), written in ONE transaction by "write":
    a node's row and its GPUs' latest samples are written once for all its messages of the batch."""

    def __init__(self, reject_log: ThrottledLog | None = None, area: AreaReader | None = None) -> None:
        self.reject_log = reject_log
        self.area = area
        self.items: list[Incoming] = []
        self.received = 0  # messages of the batch so far, written or refused
        self.refused: dict[int, str] = {}  # place in the batch -> why
        self.error: dict[str, Any] | None = None

    def add(self, frame: Sequence[Sequence[Any]]) -> None:
        try:
            decoded, refused = decode_batch(frame, self.received, self.reject_log, self.area)
        except (ValueError, TypeError) as exc:  # a frame out of shape: the whole batch is refused
            self.error = {"ok": False, "error": "refused", "message": f"a frame out of shape: {exc}"}
            return
        self.items += decoded
        self.received += len(frame)
        self.refused.update(refused)

    def write(self, store: IngestCore) -> dict[str, Any]:
        if self.error is not None:
            return self.error
        started = time.perf_counter()
        try:
            store.ingest(self.items)
        except FleetStoreError as exc:
            return {"ok": False, "error": "store", "message": str(exc), "reason": exc.reason}
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": "refused", "message": str(exc)}
        except Exception as exc:  # told to the controller, which retries it as it does a database error
            log.exception("sample writer: writing a batch failed")
            return {"ok": False, "error": "store", "message": f"sample writer: {exc}", "reason": type(exc).__name__}
        samples = sum(len(getattr(item.body, "samples", ())) for item in self.items)
        return {"ok": True, "samples": samples, "refused": list(self.refused.items()),
                "seconds": time.perf_counter() - started}


def _flush(store: IngestCore, *, everything: bool) -> int:
    try:
        return store.flush_latest(everything=everything)
    except FleetStoreError as exc:  # the next batch writes newer ones
        log.error("sample writer: writing the latest samples that waited failed: %s", exc)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m cloud.sample_writer",
        description="The controller's telemetry writer, started by `kgpu cloud run` (sample_process): it reads "
                    "its settings and then batches from stdin and answers on stdout (cloud/sample_writer.py).",
    ).parse_args(argv)
    # Its life is the controller's: it leaves when told to ("stop") or when its input ends (the
    # controller is gone). A Ctrl-C or SIGTERM sent to the whole process group is the controller's
    # to handle: it drains its ingest and then stops this process, so that nothing held is lost.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # unbuffered: select() on the pipe must see every byte the controller sent
    requests = os.fdopen(sys.stdin.fileno(), "rb", buffering=0)
    answers = os.fdopen(sys.stdout.fileno(), "wb", buffering=0)
    sys.stdout = sys.stderr  # nothing else may write into the answers
    first = _receive(requests)
    if first is None or first.get("op") != "open" or not isinstance(first.get("settings"), dict):
        print("python -m cloud.sample_writer: the controller starts this process and sends its settings first",
              file=sys.stderr)
        return 2
    settings = WriterSettings(**first["settings"])
    setup_logging(settings.log_level, settings.log_json)
    shared = first.get("area")
    area = AreaReader(int(shared["fd"]), int(shared["bytes"])) if isinstance(shared, dict) else None
    return serve(settings, requests, answers, area)


if __name__ == "__main__":
    raise SystemExit(main())
