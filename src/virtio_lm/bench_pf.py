"""PF control-path measurements: a threaded PF with idle VFs, and what one dirty collection costs.

Shared by ``virtio_lm.benches.pf`` (which prints them) and ``virtio-lm report``
(which plots them).  Everything goes through the real control queue of a PF
whose device processes it on a thread of its own, as in a host.

* :func:`setup` / :func:`teardown` -- a PF in its own host memory, its driver
  brought up, ``num_vfs`` idle VFs on a guest memory.
* :func:`mark_pages` -- make pages dirty the way a VF's DMA write does: the
  VF port's tracker records them (``tracker.mark``, what the memory calls
  after a device write lands), without writing the bytes, so a 4 GiB guest is
  never touched.
* :func:`collection_sample` -- one ``collect_dirty`` of a VF: wall time, the
  collecting thread's CPU time (the host's: in pull modes the device's work is
  on the PF's thread), control commands and bytes moved into the driver,
  pages found, and the memory the map takes (push: the map in host memory the
  PF writes; pull: the map the device keeps).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from virtio_lm.devices.base import QueueDevice
from virtio_lm.drivers import PfDriver
from virtio_lm.memory import Memory
from virtio_lm.pf.device import build_pf
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.ctrl import TrackMode
from virtio_lm.wire.features import Feature, bit

GiB = 1 << 30
HOST = 64 << 20


class IdleVf(QueueDevice):
    """A VF device with one queue; the measurements drive its port directly."""

    device_id = 0x3F
    num_queues = 1

    def offered_features(self) -> int:
        return bit(Feature.VERSION_1)

    def handle(self, fn, queue, chain):  # pragma: no cover - no requests are sent
        return b""


def timed(fn: Callable[[], int], seconds: float) -> tuple[int, float]:
    """Call ``fn`` (which returns units done) for ``seconds`` after one warm-up call: (units, seconds)."""
    fn()
    units, start = 0, time.perf_counter()
    while True:
        units += fn()
        now = time.perf_counter()
        if now - start >= seconds:
            return units, now - start


def setup(guest: Memory, *, threaded: bool = True, num_vfs: int = 1,
          device: Callable[[], QueueDevice] = IdleVf) -> tuple[Memory, PfDriver]:
    """A PF on a fresh host memory, its driver brought up, ``num_vfs`` VFs on ``guest``
    (each a fresh ``device()``, by default an :class:`IdleVf`)."""
    host = Memory(HOST, name="host")
    pf = build_pf(host.device_port("pf0"), total_vfs=max(2, num_vfs), threaded=threaded)
    drv = PfDriver(pf, host.cpu, Allocator(0x10000, HOST - 0x10000))
    drv.bring_up()
    drv.enable_vfs(num_vfs, lambda n: (device(), guest.device_port(f"vf{n}")))
    return host, drv


def teardown(host: Memory, drv: PfDriver) -> None:
    drv.close()
    drv.pf.flr()
    host.close()


def dirty_pattern(num_pages: int, density: float, seed: int = 1) -> np.ndarray | None:
    """Sorted page numbers, ``density`` of ``num_pages`` spread at random; None for 100 %."""
    if density >= 1.0:
        return None
    n = max(1, int(round(num_pages * density)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_pages, size=n, replace=False))


def mark_pages(drv: PfDriver, vf: int, pages: np.ndarray | None) -> None:
    """Record ``pages`` (None: every page) in VF ``vf``'s tracker, as its DMA writes would."""
    port = drv.pf.vf(vf).port
    tracker = port.writer.tracker
    if tracker is None:
        raise RuntimeError(f"VF {vf} is not being tracked")
    if pages is None:
        tracker.mark(0, port.size // 4096 - 1)
        return
    mark = tracker.mark
    for p in pages.tolist():
        mark(p, p)


def map_bytes(drv: PfDriver, vf: int) -> int:
    """Bytes the VF's dirty map takes now: the push map in host memory, or the device's pull map."""
    tracker = drv.pf.vf(vf).port.writer.tracker
    return int(getattr(tracker, "map_bytes", 0))


def collection_sample(drv: PfDriver, vf: int, dirty: Callable[[], None]) -> dict[str, Any]:
    """``dirty()``, then one timed ``collect_dirty(vf)``; see the module docstring."""
    dirty()
    held = map_bytes(drv, vf)
    b0, c0 = drv.stats.collect_bytes, drv.stats.collect_commands
    u0 = time.thread_time()
    t0 = time.perf_counter()
    got = drv.collect_dirty(vf)
    wall = time.perf_counter() - t0
    cpu = time.thread_time() - u0
    return {
        "ms": wall * 1e3,
        "cpu-ms": cpu * 1e3,
        "bytes": drv.stats.collect_bytes - b0,
        "commands": drv.stats.collect_commands - c0,
        "found": int(np.count_nonzero(got)),
        "map-bytes": held,
    }


def collection_cost(drv: PfDriver, vf: int, mode: TrackMode, pages: np.ndarray | None, samples: int,
                    *, map_segments: int = 4, on_sample: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Track VF ``vf`` in ``mode``; ``samples`` collections of ``pages`` (None: all) marked dirty."""
    drv.start_tracking(vf, mode, map_segments=map_segments)
    try:
        drv.collect_dirty(vf)  # a first, empty collection: what follows is steady state
        out = []
        for _ in range(samples):
            out.append(collection_sample(drv, vf, lambda: mark_pages(drv, vf, pages)))
            if on_sample is not None:
                on_sample()
        return out
    finally:
        drv.stop_tracking(vf)
