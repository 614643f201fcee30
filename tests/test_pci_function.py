"""VirtioPciFunction: common_cfg registers, status machine, features, queues, notify, ISR, config."""

from __future__ import annotations

import itertools

import pytest

from virtio_lm.errors import (
    QueueSetupError,
    RegisterAccessError,
    StatusTransitionError,
    TransportError,
)
from virtio_lm.memory import Memory
from virtio_lm.pci import CONFIG_INTERRUPT, STATUS_TRANSITIONS, VirtioDevice, VirtioPciFunction
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator, DriverQueue
from virtio_lm.wire.ring import DescFlags, VirtqDesc

# ---------------------------------------------------------------- spec facts (virtio 1.x 4.1.4.3)
# name: (offset, width, read-only)
SPEC_COMMON_CFG = {
    "device_feature_select": (0x00, 4, False),
    "device_feature": (0x04, 4, True),
    "driver_feature_select": (0x08, 4, False),
    "driver_feature": (0x0C, 4, False),
    "config_msix_vector": (0x10, 2, False),
    "num_queues": (0x12, 2, True),
    "device_status": (0x14, 1, False),
    "config_generation": (0x15, 1, True),
    "queue_select": (0x16, 2, False),
    "queue_size": (0x18, 2, False),
    "queue_msix_vector": (0x1A, 2, False),
    "queue_enable": (0x1C, 2, False),
    "queue_notify_off": (0x1E, 2, True),
    "queue_desc": (0x20, 8, False),
    "queue_driver": (0x28, 8, False),
    "queue_device": (0x30, 8, False),
    "queue_notif_config_data": (0x38, 2, True),
    "queue_reset": (0x3A, 2, False),
    "admin_queue_index": (0x3C, 2, True),
    "admin_queue_num": (0x3E, 2, True),
}
OFF = {name: off for name, (off, _w, _ro) in SPEC_COMMON_CFG.items()}
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
F_INDIRECT, F_EVENT_IDX, F_VERSION_1, F_SR_IOV = 1 << 28, 1 << 29, 1 << 32, 1 << 37
F_BIT39, F_BIT40 = 1 << 39, 1 << 40
NO_VECTOR = 0xFFFF


# ---------------------------------------------------------------- a tiny device for the tests
class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable part.

    Config space: 8 bytes; offset 0 a read-only u32 'magic', offset 4 a
    writable u32 'scratch'.  validate_features refuses bit 40 without bit 39.
    """

    device_id = 0x7E
    num_queues = 2
    queue_max_size = 64

    def __init__(self, features: int = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT | F_BIT39 | F_BIT40 | 1) -> None:
        super().__init__()
        self.features = features
        self.config = bytearray(b"\xef\xbe\xad\xde" + bytes(4))
        self.resets = 0
        self.activations = 0
        self.notified: list[int] = []
        self.echoed = 0

    def offered_features(self) -> int:
        return self.features

    def validate_features(self, features: int) -> str | None:
        if features & F_BIT40 and not features & F_BIT39:
            return "bit 40 needs bit 39"
        return None

    @property
    def config_size(self) -> int:
        return len(self.config)

    def config_read(self, offset: int, length: int) -> bytes:
        return bytes(self.config[offset : offset + length])

    def config_write(self, offset: int, data: bytes) -> None:
        if offset < 4:
            raise RegisterAccessError("magic is read-only")
        self.config[offset : offset + len(data)] = data
        self.config_changed()

    def activate(self, fn: VirtioPciFunction) -> None:
        self.activations += 1

    def queue_notify(self, fn: VirtioPciFunction, queue: int) -> None:
        self.notified.append(queue)
        q = fn.queues[queue]
        while (chain := q.pop(fn.port)) is not None:
            data = chain.read(fn.port)
            n = chain.write(fn.port, data[: chain.writable_len])
            q.push(fn.port, chain.head, n)
            self.echoed += 1
        q.notify_driver(fn.port)

    def reset(self) -> None:
        self.resets += 1


MEM_SIZE = 1 << 20


@pytest.fixture
def mem():
    with Memory(MEM_SIZE, name="guest") as m:
        yield m


def make_fn(mem: Memory, device: VirtioDevice | None = None) -> tuple[VirtioPciFunction, EchoDevice]:
    dev = device if device is not None else EchoDevice()
    fn = VirtioPciFunction(dev, mem.device_port("fn"), name="fn")
    return fn, dev  # type: ignore[return-value]


def w(fn, name, value, width=None):
    off, wd, _ = SPEC_COMMON_CFG[name]
    fn.common_write(off, width or wd, value)


def r(fn, name, width=None):
    off, wd, _ = SPEC_COMMON_CFG[name]
    return fn.common_read(off, width or wd)


def write_features(fn, features):
    for sel in (0, 1):
        w(fn, "driver_feature_select", sel)
        w(fn, "driver_feature", (features >> (32 * sel)) & 0xFFFFFFFF)


def to_features_ok(fn, features=F_VERSION_1):
    w(fn, "device_status", ACK | DRIVER)
    write_features(fn, features)
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK)
    assert r(fn, "device_status") == ACK | DRIVER | FEATURES_OK


def setup_queue(fn, mem, index, alloc, size=16, event_idx=False):
    w(fn, "queue_select", index)
    w(fn, "queue_size", size)
    dq = DriverQueue.allocate(mem.cpu, alloc, size, event_idx=event_idx)
    w(fn, "queue_desc", dq.desc_addr)
    w(fn, "queue_driver", dq.avail_addr)
    w(fn, "queue_device", dq.used_addr)
    w(fn, "queue_enable", 1)
    return dq


def running(mem, features=F_VERSION_1):
    fn, dev = make_fn(mem)
    to_features_ok(fn, features)
    alloc = Allocator(0x1000, 0x40000)
    dq = setup_queue(fn, mem, 0, alloc, event_idx=bool(features & F_EVENT_IDX))
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    return fn, dev, dq, alloc


# ================================================================ register layout
@pytest.mark.parametrize("name", list(SPEC_COMMON_CFG))
def test_register_readable_at_spec_offset_and_width(mem, name):
    fn, _ = make_fn(mem)
    off, width, _ = SPEC_COMMON_CFG[name]
    value = fn.common_read(off, width)
    assert 0 <= value < (1 << (8 * width))
    for other in (1, 2, 4, 8):
        if other != width and not (width == 8 and other == 4):
            with pytest.raises(RegisterAccessError):
                fn.common_read(off, other)
            with pytest.raises(RegisterAccessError):
                fn.common_write(off, other, 0)


def test_register_reset_values(mem):
    fn, dev = make_fn(mem)
    assert r(fn, "num_queues") == 2
    assert r(fn, "device_status") == 0
    assert r(fn, "config_msix_vector") == NO_VECTOR
    assert r(fn, "queue_select") == 0
    assert r(fn, "queue_size") == 64  # max size until the driver writes a smaller one
    assert r(fn, "queue_msix_vector") == NO_VECTOR
    assert r(fn, "queue_enable") == 0
    assert r(fn, "queue_notif_config_data") == 0
    assert r(fn, "queue_reset") == 0
    assert r(fn, "admin_queue_index") == 0 and r(fn, "admin_queue_num") == 0  # no VIRTIO_F_ADMIN_VQ
    w(fn, "queue_select", 1)
    assert r(fn, "queue_notify_off") == 1


@pytest.mark.parametrize("offset", [0x01, 0x02, 0x03, 0x05, 0x11, 0x13, 0x17, 0x19, 0x21, 0x3D, 0x40, 0x1000, -4])
def test_unknown_offset_refused(mem, offset):
    fn, _ = make_fn(mem)
    for width in (1, 2, 4):
        with pytest.raises(RegisterAccessError):
            fn.common_read(offset, width)
        with pytest.raises(RegisterAccessError):
            fn.common_write(offset, width, 0)


@pytest.mark.parametrize("width", [0, 3, 5, 16, -1])
def test_impossible_width_refused(mem, width):
    fn, _ = make_fn(mem)
    with pytest.raises(RegisterAccessError):
        fn.common_read(0x00, width)


@pytest.mark.parametrize("name", [n for n, (_o, _w, ro) in SPEC_COMMON_CFG.items() if ro])
def test_read_only_register_write_refused(mem, name):
    fn, _ = make_fn(mem)
    before = r(fn, name)
    with pytest.raises(RegisterAccessError, match="read-only"):
        w(fn, name, 1)
    assert r(fn, name) == before


def test_queue_reset_write_refused(mem):
    fn, _ = make_fn(mem)
    with pytest.raises(RegisterAccessError, match="RING_RESET"):
        w(fn, "queue_reset", 1)


@pytest.mark.parametrize("name,value", [("queue_select", 1 << 16), ("device_status", 0x100), ("device_feature_select", 1 << 32), ("queue_select", -1)])
def test_value_wider_than_register_refused(mem, name, value):
    fn, _ = make_fn(mem)
    with pytest.raises(RegisterAccessError, match="does not fit"):
        w(fn, name, value)
    assert r(fn, name) == 0


def test_64bit_queue_address_as_halves_and_whole(mem):
    fn, _ = make_fn(mem)
    for name in ("queue_desc", "queue_driver", "queue_device"):
        off = OFF[name]
        fn.common_write(off, 4, 0x89ABC000)
        fn.common_write(off + 4, 4, 0x01234567)
        assert fn.common_read(off, 8) == 0x01234567_89ABC000
        assert fn.common_read(off, 4) == 0x89ABC000
        assert fn.common_read(off + 4, 4) == 0x01234567
        fn.common_write(off + 4, 4, 0)  # the high half alone leaves the low half
        assert fn.common_read(off, 8) == 0x89ABC000
        fn.common_write(off, 8, 0x0000_0002_0000_1000)
        assert (fn.common_read(off, 4), fn.common_read(off + 4, 4)) == (0x1000, 2)
        with pytest.raises(RegisterAccessError):
            fn.common_write(off + 4, 8, 0)
        with pytest.raises(RegisterAccessError):
            fn.common_read(off + 2, 2)
    q = fn.queues[0]
    assert (q.desc_addr, q.avail_addr, q.used_addr) == (0x2_0000_1000,) * 3


def test_msix_vectors_stored_per_source(mem):
    fn, _ = make_fn(mem)
    w(fn, "config_msix_vector", 0)
    w(fn, "queue_select", 0)
    w(fn, "queue_msix_vector", 1)
    w(fn, "queue_select", 1)
    w(fn, "queue_msix_vector", 2)
    assert r(fn, "queue_msix_vector") == 2
    w(fn, "queue_select", 0)
    assert r(fn, "queue_msix_vector") == 1
    assert r(fn, "config_msix_vector") == 0
    assert (fn.msix_vector(CONFIG_INTERRUPT), fn.msix_vector(0), fn.msix_vector(1)) == (0, 1, 2)


# ================================================================ features
def read_offered(fn):
    value = 0
    for sel in (0, 1):
        w(fn, "device_feature_select", sel)
        value |= r(fn, "device_feature") << (32 * sel)
    return value


def test_device_features_through_both_selects(mem):
    fn, dev = make_fn(mem)
    assert read_offered(fn) == dev.features
    w(fn, "device_feature_select", 1)
    assert r(fn, "device_feature") == (F_VERSION_1 | F_BIT39 | F_BIT40) >> 32
    for sel in (2, 3, 0xFFFFFFFF):
        w(fn, "device_feature_select", sel)
        assert r(fn, "device_feature") == 0


def test_sr_iov_never_offered_by_a_plain_function(mem):
    dev = EchoDevice(F_VERSION_1 | F_SR_IOV)
    fn, _ = make_fn(mem, dev)
    assert read_offered(fn) == F_VERSION_1
    w(fn, "device_status", ACK | DRIVER)
    write_features(fn, F_VERSION_1 | F_SR_IOV)
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK)
    assert not r(fn, "device_status") & FEATURES_OK


def test_negotiate_high_bits_37_39_40(mem):
    fn, _ = make_fn(mem)
    wanted = F_VERSION_1 | F_BIT39 | F_BIT40 | F_EVENT_IDX
    w(fn, "device_status", ACK | DRIVER)
    write_features(fn, wanted)
    w(fn, "driver_feature_select", 1)
    assert r(fn, "driver_feature") == (F_VERSION_1 | F_BIT39 | F_BIT40) >> 32
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK)
    assert r(fn, "device_status") & FEATURES_OK
    assert fn.negotiated == wanted
    assert fn.has_feature(F_BIT39 | F_BIT40)
    assert not fn.has_feature(F_INDIRECT)


def test_driver_feature_select_beyond_1(mem):
    fn, _ = make_fn(mem)
    w(fn, "driver_feature_select", 2)
    w(fn, "driver_feature", 0)  # zero is harmless
    assert r(fn, "driver_feature") == 0
    with pytest.raises(RegisterAccessError, match="no feature bits"):
        w(fn, "driver_feature", 1)
    assert fn.driver_features == 0


def test_driver_features_frozen_after_features_ok(mem):
    fn, _ = make_fn(mem)
    to_features_ok(fn)
    w(fn, "driver_feature_select", 0)
    with pytest.raises(RegisterAccessError, match="after FEATURES_OK"):
        w(fn, "driver_feature", F_EVENT_IDX)
    assert fn.driver_features == F_VERSION_1


@pytest.mark.parametrize(
    "features,reason",
    [
        (F_VERSION_1 | (1 << 5), "does not offer: 5"),
        (F_VERSION_1 | F_SR_IOV, "does not offer: 37"),
        (F_EVENT_IDX, "VERSION_1"),
        (0, "VERSION_1"),
        (F_VERSION_1 | F_BIT40, "bit 40 needs bit 39"),  # the device's validate_features hook
    ],
)
def test_features_ok_refused(mem, features, reason):
    fn, dev = make_fn(mem)
    w(fn, "device_status", ACK | DRIVER)
    write_features(fn, features)
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK)  # no exception: the bit just does not stick
    assert r(fn, "device_status") == ACK | DRIVER
    assert reason in fn.features_refusal
    assert fn.negotiated == 0
    with pytest.raises(StatusTransitionError):
        w(fn, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert dev.activations == 0
    # the driver may fix its features and try again
    write_features(fn, F_VERSION_1)
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK)
    assert r(fn, "device_status") == ACK | DRIVER | FEATURES_OK
    assert fn.features_refusal is None


def test_ring_features_applied_to_queues_at_features_ok(mem):
    fn, _ = make_fn(mem)
    to_features_ok(fn, F_VERSION_1 | F_EVENT_IDX)
    assert all(q.event_idx and not q.indirect_desc for q in fn.queues)
    w(fn, "device_status", 0)
    to_features_ok(fn, F_VERSION_1 | F_INDIRECT)
    assert all(q.indirect_desc and not q.event_idx for q in fn.queues)


# ================================================================ device status
LADDER = [0, ACK, ACK | DRIVER, ACK | DRIVER | FEATURES_OK, ACK | DRIVER | FEATURES_OK | DRIVER_OK]
STATES = LADDER + [s | FAILED for s in LADDER]


def expected_transition(cur: int, written: int) -> int | None:
    """Oracle from the spec's prose: the status after the write, or None if refused."""
    new = written & ~NEEDS_RESET
    if new == 0:
        return 0
    if new == cur:
        return cur
    if cur & FAILED:
        return None  # after FAILED only a reset
    if new == cur | FAILED:
        return new
    if new & FAILED or new & cur != cur or new not in LADDER:
        return None
    step = LADDER.index(new) - LADDER.index(cur)
    if step == 1 or (cur == 0 and new == ACK | DRIVER):
        return new
    return None


def drive_to(fn, state):
    for s in LADDER[1:]:
        if s & ~state & ~FAILED:
            break
        if s == ACK | DRIVER | FEATURES_OK:
            write_features(fn, F_VERSION_1)
        w(fn, "device_status", s)
    if state & FAILED:
        w(fn, "device_status", state)
    assert r(fn, "device_status") == state


def test_status_table_matches_spec_oracle_for_every_pair():
    for cur, written in itertools.product(STATES, range(256)):
        new = written & ~NEEDS_RESET
        got = STATUS_TRANSITIONS.get((cur, new))
        exp = expected_transition(cur, written)
        assert (got is not None) == (exp is not None), (hex(cur), hex(written))


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_status_transitions_on_a_function_for_every_pair(mem):
    for cur in STATES:
        for written in range(256):
            dev = EchoDevice()
            fn = VirtioPciFunction(dev, mem.device_port("t"), name="t")
            drive_to(fn, cur)
            if not cur & FEATURES_OK:
                write_features(fn, F_VERSION_1)  # acceptable features, so FEATURES_OK can stick
            activations = dev.activations
            exp = expected_transition(cur, written)
            if exp is None:
                with pytest.raises(StatusTransitionError):
                    w(fn, "device_status", written)
                assert r(fn, "device_status") == cur, (hex(cur), hex(written))
            else:
                w(fn, "device_status", written)
                assert r(fn, "device_status") == exp, (hex(cur), hex(written))
                newly_ok = exp & DRIVER_OK and not cur & DRIVER_OK
                assert dev.activations == activations + (1 if newly_ok else 0)


def test_needs_reset_is_device_owned(mem):
    fn, dev, dq, _ = running(mem)
    full = ACK | DRIVER | FEATURES_OK | DRIVER_OK
    # a driver cannot set it ...
    w(fn, "device_status", full | NEEDS_RESET)
    assert r(fn, "device_status") == full
    fn.set_needs_reset("test")
    # ... nor clear it, except by a reset
    w(fn, "device_status", full)
    assert r(fn, "device_status") == full | NEEDS_RESET
    w(fn, "device_status", full | NEEDS_RESET | FAILED)
    assert r(fn, "device_status") == full | NEEDS_RESET | FAILED
    w(fn, "device_status", 0)
    assert r(fn, "device_status") == 0


def test_status_reset_clears_everything(mem):
    fn, dev, dq, _ = running(mem, F_VERSION_1 | F_EVENT_IDX)
    w(fn, "config_msix_vector", 3)
    w(fn, "queue_select", 0)
    w(fn, "queue_msix_vector", 4)
    w(fn, "device_feature_select", 1)
    fn.queue_interrupt(0)
    resets = dev.resets
    w(fn, "device_status", 0)
    assert dev.resets == resets + 1
    assert r(fn, "device_status") == 0
    assert fn.driver_features == 0 and fn.negotiated == 0
    assert r(fn, "device_feature_select") == 0
    w(fn, "driver_feature_select", 1)
    assert r(fn, "driver_feature") == 0
    assert r(fn, "config_msix_vector") == NO_VECTOR
    assert fn.isr_read() == 0
    for i, q in enumerate(fn.queues):
        w(fn, "queue_select", i)
        assert r(fn, "queue_enable") == 0
        assert r(fn, "queue_size") == 64
        assert r(fn, "queue_desc") == r(fn, "queue_driver") == r(fn, "queue_device") == 0
        assert r(fn, "queue_msix_vector") == NO_VECTOR
        assert q.last_avail_idx == 0 and q.used_idx == 0 and not q.event_idx
    # and the function comes up again
    to_features_ok(fn)
    alloc = Allocator(0x50000, 0x10000)
    setup_queue(fn, mem, 0, alloc)


# ================================================================ queue setup rules
@pytest.mark.parametrize("size", [0, 3, 48, 65, 128, 0x8000])
def test_queue_size_refused(mem, size):
    fn, _ = make_fn(mem)
    w(fn, "queue_size", 16)
    with pytest.raises(QueueSetupError, match="power of two"):
        w(fn, "queue_size", size)
    assert r(fn, "queue_size") == 16


@pytest.mark.parametrize("size", [1, 2, 32, 64])
def test_queue_size_accepted(mem, size):
    fn, _ = make_fn(mem)
    w(fn, "queue_size", size)
    assert r(fn, "queue_size") == size


def test_queue_enable_before_features_ok_refused(mem):
    fn, _ = make_fn(mem)
    w(fn, "device_status", ACK | DRIVER)
    alloc = Allocator(0x1000, 0x40000)
    with pytest.raises(QueueSetupError, match="before FEATURES_OK"):
        setup_queue(fn, mem, 0, alloc)
    assert r(fn, "queue_enable") == 0


@pytest.mark.parametrize(
    "name,addr",
    [
        ("queue_desc", 0x1008),  # desc table needs 16-byte alignment
        ("queue_driver", 0x3001),  # avail ring needs 2
        ("queue_device", 0x4002),  # used ring needs 4
        ("queue_desc", MEM_SIZE - 16),  # runs off the end of memory
        ("queue_device", MEM_SIZE),
        ("queue_driver", 1 << 40),
    ],
)
def test_queue_enable_with_invalid_ring_refused(mem, name, addr):
    fn, _ = make_fn(mem)
    to_features_ok(fn)
    w(fn, "queue_size", 16)
    w(fn, "queue_desc", 0x1000)
    w(fn, "queue_driver", 0x3000)
    w(fn, "queue_device", 0x4000)
    w(fn, name, addr)
    with pytest.raises(QueueSetupError, match="invalid ring") as ei:
        w(fn, "queue_enable", 1)
    assert ei.value.__cause__ is not None
    assert r(fn, "queue_enable") == 0
    w(fn, name, {"queue_desc": 0x1000, "queue_driver": 0x3000, "queue_device": 0x4000}[name])
    w(fn, "queue_enable", 1)  # the same queue, fixed, enables
    assert r(fn, "queue_enable") == 1


@pytest.mark.parametrize("name", ["queue_size", "queue_desc", "queue_driver", "queue_device"])
def test_queue_registers_frozen_once_enabled(mem, name):
    fn, _ = make_fn(mem)
    to_features_ok(fn)
    setup_queue(fn, mem, 0, Allocator(0x1000, 0x40000))
    before = r(fn, name)
    with pytest.raises(QueueSetupError, match="frozen"):
        w(fn, name, 0x8000 if name != "queue_size" else 8)
    if SPEC_COMMON_CFG[name][1] == 8:
        with pytest.raises(QueueSetupError, match="frozen"):
            fn.common_write(OFF[name] + 4, 4, 1)
    assert r(fn, name) == before


def test_queue_enable_zero_refused(mem):
    fn, _ = make_fn(mem)
    with pytest.raises(QueueSetupError, match="queue_enable 0"):
        w(fn, "queue_enable", 0)
    to_features_ok(fn)
    setup_queue(fn, mem, 0, Allocator(0x1000, 0x40000))
    with pytest.raises(QueueSetupError, match="queue_enable 0"):
        w(fn, "queue_enable", 0)
    assert r(fn, "queue_enable") == 1
    with pytest.raises(QueueSetupError):
        w(fn, "queue_enable", 2)
    w(fn, "queue_enable", 1)  # re-enabling an enabled queue is harmless
    assert r(fn, "queue_enable") == 1


def test_nonexistent_queue(mem):
    fn, _ = make_fn(mem)
    w(fn, "queue_select", 2)
    assert r(fn, "queue_select") == 2
    for name in ("queue_size", "queue_enable", "queue_desc", "queue_driver", "queue_device", "queue_notify_off"):
        assert r(fn, name) == 0
    for name, value in (("queue_size", 16), ("queue_desc", 0x1000), ("queue_msix_vector", 1), ("queue_enable", 1)):
        with pytest.raises(QueueSetupError, match="queue_select 2"):
            w(fn, name, value)
    w(fn, "queue_select", 0xFFFF)
    assert r(fn, "queue_size") == 0


# ================================================================ notify, ISR, interrupts
def test_notify_before_driver_ok_ignored(mem):
    fn, dev = make_fn(mem)
    to_features_ok(fn)
    dq = setup_queue(fn, mem, 0, Allocator(0x1000, 0x40000))
    buf = 0x60000
    mem.cpu.write(buf, b"ping")
    dq.add([Segment(buf, 4)], [Segment(buf + 0x100, 4)])
    dq.publish()
    fn.notify(0)
    assert dev.notified == [] and fn.notifies_ignored == 1
    assert dq.get_used() is None
    w(fn, "device_status", ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    fn.notify(1)  # queue 1 is not enabled: ignored too
    assert dev.notified == [] and fn.notifies_ignored == 2
    fn.notify(0)
    assert dev.notified == [0]
    assert dq.get_used() == (None, 4)
    assert mem.read(buf + 0x100, 4) == b"ping"


def test_notify_after_failed_ignored(mem):
    fn, dev, dq, _ = running(mem)
    w(fn, "device_status", r(fn, "device_status") | FAILED)
    fn.notify(0)
    assert dev.notified == []


@pytest.mark.parametrize("queue", [-1, 2, 100, "0", None])
def test_notify_nonexistent_queue_refused(mem, queue):
    fn, dev, _, _ = running(mem)
    with pytest.raises(RegisterAccessError):
        fn.notify(queue)
    assert dev.notified == []


def test_isr_read_to_clear_and_queue_interrupt(mem):
    fn, dev, dq, _ = running(mem)
    seen: list[int] = []
    fn.on_interrupt = seen.append
    assert fn.isr_read() == 0
    mem.cpu.write(0x60000, b"abc")
    dq.add([Segment(0x60000, 3)], [Segment(0x61000, 8)])
    dq.publish()
    fn.notify(0)
    assert seen == [0]
    assert fn.isr_read() == 0x1
    assert fn.isr_read() == 0  # cleared by the read
    assert fn.interrupt_counts[0] == 1


def test_config_change_bumps_generation_and_raises_config_interrupt(mem):
    fn, dev, _, _ = running(mem)
    seen: list[int] = []
    fn.on_interrupt = seen.append
    gen = r(fn, "config_generation")
    fn.device_config_write(4, 4, 0x1234)
    assert r(fn, "config_generation") == (gen + 1) & 0xFF
    assert seen == [CONFIG_INTERRUPT]
    assert fn.isr_read() == 0x2
    assert fn.isr_read() == 0


def test_config_generation_wraps_at_u8(mem):
    fn, dev, _, _ = running(mem)
    for _ in range(256):
        dev.config_changed()
    assert r(fn, "config_generation") == 0
    assert fn.interrupt_counts[CONFIG_INTERRUPT] == 256


def test_no_config_interrupt_before_driver_ok(mem):
    fn, dev = make_fn(mem)
    seen: list[int] = []
    fn.on_interrupt = seen.append
    dev.config_changed()
    assert r(fn, "config_generation") == 1  # generation still moves
    assert seen == [] and fn.isr_read() == 0


def test_hostile_chain_sets_needs_reset_and_config_interrupt(mem):
    fn, dev, dq, _ = running(mem)
    seen: list[int] = []
    fn.on_interrupt = seen.append
    # a descriptor whose next index is past the queue size
    dq.write_desc(0, VirtqDesc(0x60000, 16, DescFlags.NEXT, 200))
    dq.put_avail(0)
    fn.notify(0)
    st = r(fn, "device_status")
    assert st & NEEDS_RESET and st & DRIVER_OK
    assert seen == [CONFIG_INTERRUPT]
    assert fn.isr_read() == 0x2
    assert fn.needs_reset_reason is not None
    assert fn.queues[0].broken and dev.echoed == 0
    # a second error does not raise a second interrupt
    fn.set_needs_reset("again")
    assert seen == [CONFIG_INTERRUPT]
    # reset recovers the function
    w(fn, "device_status", 0)
    assert r(fn, "device_status") == 0 and not fn.queues[0].broken


def test_set_needs_reset_control(mem):
    """Negative control: a well-formed chain does not set NEEDS_RESET."""
    fn, dev, dq, _ = running(mem)
    mem.cpu.write(0x60000, b"x" * 16)
    dq.add([Segment(0x60000, 16)], [Segment(0x61000, 16)])
    dq.publish()
    fn.notify(0)
    assert not r(fn, "device_status") & NEEDS_RESET
    assert dev.echoed == 1


# ================================================================ device config
def test_device_config_read_write(mem):
    fn, dev = make_fn(mem)
    assert fn.device_config_read(0, 4) == 0xDEADBEEF
    assert fn.device_config_read(0, 2) == 0xBEEF
    assert fn.device_config_read(3, 1) == 0xDE
    assert fn.device_config_read(0, 8) == 0xDEADBEEF
    fn.device_config_write(4, 4, 0xCAFEF00D)
    assert fn.device_config_read(4, 4) == 0xCAFEF00D
    assert fn.device_config_read(6, 2) == 0xCAFE


@pytest.mark.parametrize(
    "offset,width",
    [(0, 3), (0, 16), (1, 2), (2, 4), (4, 8), (8, 1), (6, 4), (-1, 1), (0, 0)],
)
def test_device_config_bad_access_refused(mem, offset, width):
    fn, dev = make_fn(mem)
    with pytest.raises(RegisterAccessError):
        fn.device_config_read(offset, width)
    with pytest.raises(RegisterAccessError):
        fn.device_config_write(offset, width, 0)
    assert dev.config[4:] == bytes(4)


def test_device_config_value_too_wide_and_read_only(mem):
    fn, dev = make_fn(mem)
    with pytest.raises(RegisterAccessError, match="does not fit"):
        fn.device_config_write(4, 2, 0x10000)
    with pytest.raises(RegisterAccessError, match="read-only"):
        fn.device_config_write(0, 4, 0)
    assert fn.device_config_read(0, 4) == 0xDEADBEEF


def test_device_without_config_space(mem):
    fn = VirtioPciFunction(VirtioDevice(), mem.device_port("bare"), name="bare")
    with pytest.raises(RegisterAccessError):
        fn.device_config_read(0, 1)


# ================================================================ FLR, binding
def test_flr_resets_function(mem):
    fn, dev, dq, _ = running(mem)
    dev.config_changed()
    fn.flr()
    assert r(fn, "device_status") == 0
    assert r(fn, "config_generation") == 0
    assert not fn.queues[0].enabled and dev.resets == 1 and fn.flr_count == 1


def test_device_bound_to_one_function(mem):
    fn, dev = make_fn(mem)
    assert dev.function is fn
    with pytest.raises(TransportError):
        VirtioPciFunction(dev, mem.device_port("other"), name="other")


def test_non_device_refused(mem):
    with pytest.raises(TypeError):
        VirtioPciFunction(object(), mem.device_port("x"), name="x")  # type: ignore[arg-type]
