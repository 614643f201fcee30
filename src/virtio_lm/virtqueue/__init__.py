"""Split virtqueues: the device side (chain walking, every hostile case rejected) and the driver side.

Functions take the memory as a :class:`~virtio_lm.memory.MemoryPort` parameter, the single DMA path.
"""

from virtio_lm.virtqueue.device import MAX_INDIRECT_ENTRIES, DescriptorChain, Segment, Virtqueue
from virtio_lm.virtqueue.driver import Allocator, DriverQueue

__all__ = ["MAX_INDIRECT_ENTRIES", "Allocator", "DescriptorChain", "DriverQueue", "Segment", "Virtqueue"]
