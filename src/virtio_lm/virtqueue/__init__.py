"""virtqueue."""
