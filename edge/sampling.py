"""One cycle's samples of every GPU, read through the driver runner (the daemon's first step).

A steady cycle hands every GPU's sample to the driver's thread in one job
(`DriverRunner.call_each`): one thread hop for the node instead of one per GPU, which is most of
what a cycle costs beyond the NVML calls themselves (issue 17, bench/edge_overhead.py). A cycle
in which a lost GPU is due a probe goes GPU by GPU, probing it first. Either way a GPU lost and
not yet due is reported lost without a call, and a call that times out ends the round: the GPUs
after it get no sample (None) rather than one more wait each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from edge.cycle import GpuView
from edge.devices.base import DriverError, DriverTimeout, DriverUnavailable
from edge.driver.runner import DriverRunner
from shared.gpu import GpuSample, Health
from shared.logs import get_logger

log = get_logger("edge.daemon")


class Sampler:
    """Reads the samples; tells the daemon whether the driver answered (`note_reachable`) and
    when a lost GPU came back (`on_back`, so that it is watched for XIDs again)."""

    def __init__(self, runner: DriverRunner, lost_probe_interval: float, *,
                 note_reachable: Callable[[bool], None], on_back: Callable[[], None]) -> None:
        self.runner = runner
        self.lost_probe_interval = lost_probe_interval
        self.note_reachable = note_reachable
        self.on_back = on_back

    async def sample_all(self, views: Mapping[int, GpuView], now: float) -> dict[int, GpuSample | None]:
        """Every GPU's sample (None: not read this cycle), in the views' order; each view keeps
        its newest sample."""
        lost = {index for index, view in views.items() if view.health.health is Health.LOST}
        if any(now >= views[index].next_probe_at for index in lost):
            return await self.sample_each(views, now)
        due = [index for index in views if index not in lost]
        driver = self.runner.driver
        results = await self.runner.call_each(driver.sample, [(index,) for index in due]) if due else []
        position = {index: at for at, index in enumerate(due)}
        samples: dict[int, GpuSample | None] = {}
        for index, view in views.items():
            if index in lost:
                samples[index] = _lost(index, view, now)
                continue
            if position[index] >= len(results):  # after a call that timed out: not made
                samples[index] = None
                continue
            result = results[position[index]]
            if isinstance(result, DriverError):
                self._cannot_sample(index, view, result)
                sample = None
            elif isinstance(result, Exception):
                raise result  # not the driver's refusal: the cycle fails, as a call would fail it
            else:
                sample = result
                self.note_reachable(True)
            samples[index] = self._keep(view, sample, now)
        return samples

    async def sample_each(self, views: Mapping[int, GpuView], now: float) -> dict[int, GpuSample | None]:
        """GPU by GPU, probing first the lost ones that are due."""
        samples: dict[int, GpuSample | None] = {}
        stuck = False  # a call timed out: the driver is not answering, do not wait once per GPU
        driver = self.runner.driver
        for index, view in views.items():
            if stuck:
                samples[index] = None
                continue
            if view.health.health is Health.LOST and now < view.next_probe_at:
                samples[index] = _lost(index, view, now)
                continue
            try:
                if view.health.health is Health.LOST:
                    log.info("probing lost GPU %d again", index, extra={"gpu": view.inventory.uuid})
                    back = await self.runner.call(driver.probe, index)
                    if not back:
                        view.next_probe_at = now + self.lost_probe_interval
                        samples[index] = _lost(index, view, now)
                        continue
                    self.on_back()
                sample = await self.runner.call(driver.sample, index)
                self.note_reachable(True)
            except DriverError as exc:
                self._cannot_sample(index, view, exc)
                stuck = isinstance(exc, DriverTimeout)
                sample = None
            samples[index] = self._keep(view, sample, now)
        return samples

    def _cannot_sample(self, index: int, view: GpuView, error: DriverError) -> None:
        log.warning("cannot sample GPU %d: %s", index, error, extra={"gpu": view.inventory.uuid})
        if isinstance(error, (DriverUnavailable, DriverTimeout)):
            self.note_reachable(False)

    def _keep(self, view: GpuView, sample: GpuSample | None, now: float) -> GpuSample | None:
        if sample is not None and sample.lost:
            view.next_probe_at = now + self.lost_probe_interval
        view.sample = sample or view.sample
        return sample


def _lost(index: int, view: GpuView, now: float) -> GpuSample:
    """The sample of a GPU known lost and not read this cycle."""
    return GpuSample(index=index, uuid=view.inventory.uuid, ts=now, lost=True)
