"""virtio-lm: live migration of virtio devices, from the 2021 VF migration proposal."""

__version__ = "0.1.0"
