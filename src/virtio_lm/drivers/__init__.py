"""Host-side drivers: the PF driver that runs VF migration over the PF's control queue."""

from virtio_lm.drivers.pf_driver import DEFAULT_FEATURES, MIGRATION_FEATURES, CommandStats, PfDriver, Tracking

__all__ = ["DEFAULT_FEATURES", "MIGRATION_FEATURES", "CommandStats", "PfDriver", "Tracking"]
