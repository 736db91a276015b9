"""cloud/payload_area.py: the ring of telemetry payloads the controller shares with its sample writer
process (a real memfd, mapped twice as the two processes map it), and the real child reading its
payloads there, a batch larger than the ring included."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from cloud.payload_area import AreaReader, PayloadArea, create_area
from cloud.sample_writer import SampleWriterProcess, decode_batch
from cloud.store import FleetStore
from tests.test_fleet_store import NODE, db_url, open_store  # noqa: F401 (fixtures)
from tests.test_sample_writer import _a_child_that_wrote, _write_while_stopped, gpu_rows, raw, writer  # noqa: F401


def _area(size: int) -> tuple[PayloadArea, AreaReader]:
    area = create_area(size)
    if area is None:
        pytest.skip("this system gives no memfd (os.memfd_create): payloads go in the frames")
    return area, AreaReader(os.dup(area.fd), size)


def test_payloads_go_round_the_ring_and_only_what_the_child_is_done_with_is_reused() -> None:
    area, reader = _area(100)
    try:
        first = area.place([b"a" * 30, b"b" * 30])
        assert first == [[0, 30], [30, 30]]
        done = area.mark()  # the batch of those two, answered later
        ahead = area.place([b"c" * 30, b"d" * 30])  # the next batch's head: 10 bytes left at the end
        assert ahead[0] == [60, 30] and ahead[1] == b"d" * 30  # no room: it goes in its frame
        assert area.inline == 1
        area.free_to(done)  # the child answered the first batch: 0..60 free, 60..90 still read
        wrapped = area.place([b"e" * 50, b"f" * 20])
        assert wrapped[0] == [0, 50]  # past the end: at the start
        assert wrapped[1] == b"f" * 20  # 50..60 left only 10: it goes in its frame
        assert [reader.payload(r) for r in (ahead[0], wrapped[0])] == [b"c" * 30, b"e" * 50]
        area.clear()  # the child dropped or died: all of it free again
        assert area.place([b"g" * 100]) == [[0, 100]] and area.used == 100
        assert area.place([b"h"]) == [b"h"]  # full
        assert area.place([b"x" * 101]) == [b"x" * 101]  # larger than the ring: always in its frame
    finally:
        area.close()


@pytest.mark.parametrize("reference", [[90, 20], [-1, 5], [0, -1], "0,5", [1.0, 5], [True, 5], [1, 2, 3]])
def test_the_child_refuses_a_reference_out_of_the_ring_or_out_of_shape(reference: object) -> None:
    area, reader = _area(100)
    try:
        with pytest.raises(ValueError, match="payload reference"):
            reader.payload(reference)
        with pytest.raises(ValueError, match="payload reference"):  # in a frame: the batch is out of shape
            decode_batch([("kgpu/v1/edge/n/telemetry", reference, 1.0, 0.0, None)], area=reader)
        with pytest.raises(ValueError, match="no shared area"):
            decode_batch([("kgpu/v1/edge/n/telemetry", [0, 5], 1.0, 0.0, None)], area=None)
    finally:
        area.close()


def test_a_batch_larger_than_the_ring_goes_part_in_it_part_in_its_frames(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    now = time.time()
    batch = [raw(f"node-{i}", now, (0,)) for i in range(12)]
    process = writer(area_bytes=5 * max(len(r.payload) for r in batch))  # five payloads at least
    assert process.write(batch).samples == 12
    assert process.area is not None and (process.area.placed, process.area.inline) == (5, 7)
    assert process.write([raw(f"node-{i}", now + 1, (0,)) for i in range(12)]).samples == 12  # round again
    store = open_store()
    assert all(gpu_rows(store, f"node-{i}")["GPU-0"]["sample_ts"] == now + 1 for i in range(12))
    assert process.area.used == 0  # answered: nothing of it is read any more


def test_a_failed_batch_keeps_what_went_ahead_in_the_ring_until_the_child_answers_again(
    writer: Callable[..., SampleWriterProcess], open_store: Callable[..., FleetStore],  # noqa: F811
) -> None:
    """The child may still be reading the dropped frames' payloads (they come before the "drop" in
    its pipe): the ring does not give their place to the batch sent again; the next answer frees it."""
    process, _pid, now = _a_child_that_wrote(writer)
    following = [raw(f"node-{i}", now, (0, 1)) for i in range(3)]
    out_of_shape = raw(NODE, now)._replace(kept=7)  # type: ignore[arg-type]  # not a tuple of uuids
    refused = _write_while_stopped(process, [out_of_shape], following[:2])
    assert isinstance(refused, ValueError)
    area = process.area
    assert area is not None
    assert area.used == sum(len(r.payload) for r in following[:2])  # the two sent ahead, still held
    held_from, held_to = area.tail, area.head
    assert process.write(following).samples == 6
    assert area.used == 0 and held_from < held_to <= area.head  # placed after them, then all freed
    assert all(len(open_store().samples(f"node-{i}")) == 2 for i in range(3))
