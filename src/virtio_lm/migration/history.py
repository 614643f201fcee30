"""What a host process knows of a switch-over's fixed cost before the next one: the
start-up calibration and what completed migrations measured (:class:`SwitchoverHistory`),
and the constants the estimate is built with.
"""

from __future__ import annotations

import math

from virtio_lm.wire.stream import (
    StreamConfig,
)


class SwitchoverHistory:
    """What a host process knows of a switch-over's fixed cost (everything but the final
    pages), per kind of VM (workload and VF device types):

    * **calibrated** -- the latest timed scratch switch-over on the host's spare VFs
      (:mod:`virtio_lm.host.calibrate`: at start-up, and again at a migration's start
      when it leaves the pages little room), which leaves out the network and the
      final dirty collection; with the part of it the destination's restore took;
    * **ratio** -- how completed migrations compared with the calibration they used:
      (their fixed cost less the final collection and ``ROUND_TRIPS`` round trips) /
      calibration, averaged; 1 until a migration completed;
    * **learned** -- the whole fixed cost completed migrations measured, averaged.  A
      source learns it from its downtime phases; a destination from what it saw (the
      source's part as COMPLETE reports it, its own restore after COMPLETE, the
      COMMIT round trip and its start), so a host that received a VM knows it too.

    A source estimates ``calibrated x ratio + final collection + ROUND_TRIPS round trips``
    (the last two measured live), or ``learned`` when it has no calibration; the
    policy adds that to the expected downtime (:mod:`~virtio_lm.migration.policy`).
    """

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight  # of a new measurement against what was known
        self._costs: dict[tuple, float] = {}
        self._calibrated: dict[tuple, tuple[float, float]] = {}
        self._ratios: dict[tuple, float] = {}

    @staticmethod
    def key(cfg: StreamConfig) -> tuple:
        return (cfg.workload, tuple(sorted((vf.index, vf.device_id) for vf in cfg.vfs)))

    def _blend(self, table: dict[tuple, float], cfg: StreamConfig, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            return
        k = self.key(cfg)
        old = table.get(k)
        table[k] = value if old is None else (1 - self.weight) * old + self.weight * value

    def get(self, cfg: StreamConfig) -> float | None:
        """The learned whole fixed cost, if a migration of this kind completed here."""
        return self._costs.get(self.key(cfg))

    def record(self, cfg: StreamConfig, seconds: float) -> None:
        self._blend(self._costs, cfg, seconds)

    def calibrated(self, cfg: StreamConfig) -> tuple[float, float] | None:
        """(seconds, of which the destination's restore) of the latest calibration."""
        return self._calibrated.get(self.key(cfg))

    def calibrate(self, cfg: StreamConfig, seconds: float, restore: float = 0.0) -> None:
        if math.isfinite(seconds) and seconds > 0 and math.isfinite(restore) and 0 <= restore <= seconds:
            self._calibrated[self.key(cfg)] = (seconds, restore)

    def ratio(self, cfg: StreamConfig) -> float | None:
        return self._ratios.get(self.key(cfg))

    def record_ratio(self, cfg: StreamConfig, ratio: float) -> None:
        if math.isfinite(ratio) and 0.05 <= ratio <= 20:  # outside: a broken sample, not a trend
            self._blend(self._ratios, cfg, ratio)


SWITCHOVER_HISTORY = SwitchoverHistory()  # a host process's memory of its migrations



RECALIBRATE = 0.5  # a calibration at or above this share of downtime-limit is measured again at the start
# what a calibration cannot see: READY -> COMMIT -> RUNNING is two round trips, the final data's
# last bytes half of one
ROUND_TRIPS = 2.5
