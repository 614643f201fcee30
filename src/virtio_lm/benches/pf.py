#!/usr/bin/env python3
"""PF control path benchmark: command round trips, dirty collection cost, data-path overhead of tracking.

Not a test: prints figures.  Everything goes through the real control queue
of a threaded PF (host memory) and a VF on a 1 GiB guest memory.  The set-up
and the collection measurement live in :mod:`virtio_lm.bench_pf`
(``virtio-lm report`` uses them too).

* control-command round trips per second (IDENTIFY, GET_STATE_ATTRS), with
  the PF's control queue on its own thread and processed in the kick;
* dirty collection per GiB of tracked memory in each of the four modes, with
  1% and 100% of the pages dirty: bytes moved into the PF driver, commands
  spent, milliseconds per collection;
* device write throughput through the VF's port (4 KiB and 64 KiB writes)
  with tracking off and in each mode, in alternating rounds, and the
  overhead ratio on / off per round (median, min..max).

    python -m virtio_lm.benches.pf [--seconds 0.5] [--guest-gib 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from virtio_lm.bench_pf import GiB, collection_sample, setup, teardown, timed
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.wire.ctrl import TrackMode


def bench_commands(guest: Memory, seconds: float) -> None:
    print("control-command round trips (one chain each, through the control queue)")
    print(f"  {'PF control queue':<26}{'command':<18}{'cmds/s':>10}{'us/cmd':>10}")
    for threaded in (True, False):
        host, drv = setup(guest, threaded=threaded)
        where = "own thread (interrupt)" if threaded else "in the kick"
        for name, call in (("IDENTIFY", lambda: drv.identify()), ("GET_STATE_ATTRS", lambda: drv.get_state_attrs(1))):
            def batch() -> int:
                for _ in range(50):
                    call()
                return 50

            n, dt = timed(batch, seconds)
            print(f"  {where:<26}{name:<18}{n / dt:>10.0f}{dt / n * 1e6:>10.1f}")
        teardown(host, drv)
    print()


def bench_collection(guest: Memory, seconds: float) -> None:
    pages = guest.size // PAGE_SIZE
    gib = guest.size / GiB
    print(f"dirty collection, {pages} pages tracked ({gib:g} GiB), per collection and per GiB")
    print(f"  {'mode':<14}{'dirty':>6}{'bytes moved':>13}{'cmds':>6}{'ms':>9}{'ms/GiB':>9}{'found':>9}")
    host, drv = setup(guest, threaded=True)
    port = drv.pf.vf(1).port
    rng = random.Random(1)
    sample = sorted(rng.sample(range(pages), pages // 100))
    for mode in TrackMode:
        drv.start_tracking(1, mode, map_segments=4)
        for label in ("1%", "100%"):
            def dirty() -> None:
                if label == "1%":
                    for p in sample:
                        port.write(p * PAGE_SIZE, b"\x01")
                else:
                    port.fill(0, guest.size, 0x02)  # one DMA write covering every page

            total_ms, rounds, moved, cmds, found = 0.0, 0, 0, 0, 0
            deadline = time.perf_counter() + seconds
            while rounds < 2 or time.perf_counter() < deadline:
                got = collection_sample(drv, 1, dirty)
                total_ms += got["ms"]
                moved += got["bytes"]
                cmds += got["commands"]
                found = got["found"]
                rounds += 1
            ms = total_ms / rounds
            print(
                f"  {mode.cli_name:<14}{label:>6}{moved // rounds:>13}{cmds // rounds:>6}"
                f"{ms:>9.2f}{ms / gib:>9.2f}{found:>9}"
            )
        drv.stop_tracking(1)
    teardown(host, drv)
    print()


def bench_datapath(guest: Memory, seconds: float, rounds: int = 7) -> None:
    """Device writes through the VF's port, tracking off and in each mode, in ``rounds`` rounds
    that alternate the modes (off, push-bitmap, ..., off, ...) so the noise of a busy machine falls
    on all of them alike.  Every page written is touched once first (no page fault in a figure).
    Times are the writing thread's CPU time (``time.thread_time``: other processes' load does not
    count), including draining what is left in the tracker's dirty ring at the end.  Per mode: the
    GiB/s of that CPU time (median), and the median (min..max) over rounds of the time per write
    with tracking on / off in the same round -- the figure issue 13 sets at <= 1.1x."""
    print(f"device DMA writes through the VF port (random page-aligned; writer's CPU time; "
          f"{rounds} alternating rounds, median)")
    host, drv = setup(guest, threaded=True)
    port = drv.pf.vf(1).port
    rng = random.Random(2)
    modes: list[TrackMode | None] = [None, *TrackMode]
    for size in (4096, 65536):
        addrs = [rng.randrange(0, (guest.size - size) // PAGE_SIZE) * PAGE_SIZE for _ in range(4096)]
        data = b"\xa5" * size
        for a in addrs:
            port.write(a, data)  # fault every page in before measuring
        per_write: dict[TrackMode | None, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                if mode is not None:
                    drv.start_tracking(1, mode, map_segments=4)

                tracker = port.writer.tracker
                n, t0 = 0, time.thread_time()
                deadline = time.perf_counter() + seconds / rounds
                while n == 0 or time.perf_counter() < deadline:
                    for a in addrs[:512]:
                        port.write(a, data)
                    n += 512
                    rng.shuffle(addrs)  # the same cost in every mode
                if tracker is not None and getattr(tracker, "ring", None) is not None:
                    tracker.drain()  # the marks still in the dirty ring are part of the cost
                dt = time.thread_time() - t0
                per_write[mode].append(dt / n)
                if mode is not None:
                    drv.collect_dirty(1)
                    drv.stop_tracking(1)
        print(f"  {size // 1024} KiB writes: {'tracking':<14}{'GiB/s':>8}{'writes/s':>11}{'on/off':>9}  (min..max)")
        off = per_write[None]
        for mode in modes:
            t = statistics.median(per_write[mode])
            ratios = sorted(a / b for a, b in zip(per_write[mode], off))
            name = "off" if mode is None else mode.cli_name
            spread = "" if mode is None else f"  ({ratios[0]:.2f}..{ratios[-1]:.2f})"
            print(f"  {'':<14}{name:<14}{size / t / GiB:>8.2f}{1 / t:>11.0f}"
                  f"{statistics.median(ratios):>8.2f}x{spread}")
    teardown(host, drv)
    print()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--guest-gib", type=float, default=1.0, help="guest memory size (GiB)")
    args = ap.parse_args(argv)
    size = int(args.guest_gib * GiB) // PAGE_SIZE * PAGE_SIZE
    start = time.perf_counter()
    with Memory(size, name="guest") as guest:
        bench_commands(guest, args.seconds)
        bench_collection(guest, args.seconds)
        bench_datapath(guest, args.seconds)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
