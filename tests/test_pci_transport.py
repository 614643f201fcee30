"""PciDriverTransport (registers only) and the runnable example in docs/driver-example.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_pci_function import (
    ACK,
    DRIVER,
    DRIVER_OK,
    F_BIT39,
    F_BIT40,
    F_EVENT_IDX,
    F_INDIRECT,
    F_VERSION_1,
    FEATURES_OK,
    NEEDS_RESET,
    EchoDevice,
)
from virtio_lm.errors import DeviceNeedsResetError, DriverError, FeaturesNotAcceptedError
from virtio_lm.memory import Memory
from virtio_lm.pci import PciDriverTransport, VirtioPciFunction
from virtio_lm.virtqueue.device import Segment
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.ring import DescFlags, VirtqDesc

DOC = Path(__file__).resolve().parent.parent / "docs" / "driver-example.md"


class RegistersOnly:
    """Exposes only the register interface of a function: proves the transport needs nothing else."""

    def __init__(self, fn: VirtioPciFunction) -> None:
        self._fn = fn
        self.calls: list[str] = []

    def common_read(self, offset, width):
        self.calls.append("common_read")
        return self._fn.common_read(offset, width)

    def common_write(self, offset, width, value):
        self.calls.append("common_write")
        self._fn.common_write(offset, width, value)

    def notify(self, queue):
        self.calls.append("notify")
        self._fn.notify(queue)

    def isr_read(self):
        return self._fn.isr_read()

    def device_config_read(self, offset, width):
        self.calls.append("device_config_read")
        return self._fn.device_config_read(offset, width)


@pytest.fixture
def mem():
    with Memory(1 << 20, name="guest") as m:
        yield m


def make(mem, device=None):
    dev = device or EchoDevice()
    fn = VirtioPciFunction(dev, mem.device_port("fn"), name="fn")
    regs = RegistersOnly(fn)
    tr = PciDriverTransport(regs, mem.cpu, Allocator(0x1000, 0x80000))
    return fn, dev, regs, tr


def echo_once(mem, tr, index, dq, payload: bytes, where=0x90000):
    mem.cpu.write(where, payload)
    dq.add([Segment(where, len(payload))], [Segment(where + 0x1000, len(payload))], token=payload)
    tr.kick(index)
    return dq.get_used()


@pytest.mark.parametrize("wanted", [F_VERSION_1, F_VERSION_1 | F_EVENT_IDX | F_INDIRECT | F_BIT39 | F_BIT40])
def test_bring_up_and_echo(mem, wanted):
    fn, dev, regs, tr = make(mem)
    queues = tr.bring_up(wanted)
    assert len(queues) == 2 and [q.size for q in queues] == [64, 64]
    assert tr.features == wanted and fn.negotiated == wanted
    assert fn.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK and dev.activations == 1
    assert queues[0].event_idx == bool(wanted & F_EVENT_IDX)
    for i in range(70):  # wraps the 64-entry ring
        payload = f"payload {i}".encode()
        assert echo_once(mem, tr, 0, queues[0], payload) == (payload, len(payload))
        assert mem.read(0x91000, len(payload)) == payload
    assert set(regs.calls) <= {"common_read", "common_write", "notify", "device_config_read"}
    tr.check()


def test_negotiate_only_offered_features(mem):
    dev = EchoDevice(F_VERSION_1 | F_EVENT_IDX)
    fn, _, _, tr = make(mem, dev)
    assert tr.negotiate(F_EVENT_IDX | F_INDIRECT | F_BIT39) == F_VERSION_1 | F_EVENT_IDX
    assert tr.device_features == F_VERSION_1 | F_EVENT_IDX


def test_features_refused_raises_and_marks_failed(mem):
    fn, _, _, tr = make(mem)
    with pytest.raises(FeaturesNotAcceptedError):
        tr.negotiate(F_VERSION_1 | F_BIT40)  # the echo device wants bit 39 with bit 40
    assert fn.status & 0x80 and not fn.status & FEATURES_OK


def test_device_without_version_1_refused(mem):
    fn, _, _, tr = make(mem, EchoDevice(F_EVENT_IDX))
    with pytest.raises(FeaturesNotAcceptedError, match="VERSION_1"):
        tr.negotiate(F_EVENT_IDX)


def test_setup_queue_errors(mem):
    fn, _, _, tr = make(mem)
    tr.negotiate(F_VERSION_1)
    with pytest.raises(DriverError, match="does not exist"):
        tr.setup_queue(5)
    with pytest.raises(DriverError, match="above"):
        tr.setup_queue(0, 128)
    dq = tr.setup_queue(1, 4)
    assert dq.size == 4 and fn.queues[1].size == 4 and fn.queues[1].enabled


def test_needs_reset_raised_to_the_driver(mem):
    fn, dev, _, tr = make(mem)
    (q0, _q1) = tr.bring_up(F_VERSION_1)
    q0.write_desc(0, VirtqDesc(0x90000, 8, DescFlags.NEXT, 0))  # a loop: desc 0 -> desc 0
    q0.put_avail(0)
    fn.notify(0)
    assert tr.status & NEEDS_RESET
    with pytest.raises(DeviceNeedsResetError):
        tr.check()
    # a fresh bring-up recovers
    (q0, _q1) = tr.bring_up(F_VERSION_1)
    tr.check()
    assert echo_once(mem, tr, 0, q0, b"again") == (b"again", 5)


def test_kick_before_driver_ok_does_nothing(mem):
    """Negative control for the echo path: without DRIVER_OK the device never sees the buffer."""
    fn, dev, _, tr = make(mem)
    tr.negotiate(F_VERSION_1)
    dq = tr.setup_queue(0)
    assert echo_once(mem, tr, 0, dq, b"early") is None
    assert dev.echoed == 0 and fn.notifies_ignored == 1


def test_config_read_through_transport(mem):
    fn, dev, regs, tr = make(mem)
    assert tr.config_read(0, 4) == 0xDEADBEEF
    assert "device_config_read" in regs.calls


def test_reset_through_transport(mem):
    fn, dev, _, tr = make(mem)
    tr.bring_up(F_VERSION_1)
    tr.reset()
    assert fn.status == 0 and dev.resets >= 1 and not tr.queues


# ---------------------------------------------------------------- the documented example
def _doc_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2, "docs/driver-example.md holds two python blocks: bring-up, SR-IOV + FLR"
    return blocks


def _doc_code() -> str:
    return _doc_blocks()[0]


def test_sriov_and_flr_example_in_docs_runs():
    ns: dict = {}
    exec(compile(_doc_blocks()[1], str(DOC), "exec"), ns)
    assert ns["pf"].num_vfs == 0 and ns["vf"].flr_count == 2  # its FLR, then VF Enable cleared


@pytest.mark.parametrize("broken", ["flr", "enable"])
def test_sriov_and_flr_example_fails_when_registers_do_nothing(broken, monkeypatch):
    """Negative control: with the FLR or the VF Enable write doing nothing, the example fails."""
    from virtio_lm.pci import SriovPF, VirtioPciFunction

    if broken == "flr":
        monkeypatch.setattr(VirtioPciFunction, "_devctl_written", lambda self, old, new: new & 0x7FFF)
    else:
        monkeypatch.setattr(SriovPF, "_sriov_ctrl_written", lambda self, old, new: new)
    with pytest.raises(AssertionError):
        exec(compile(_doc_blocks()[1], str(DOC), "exec"), {})


def test_driver_example_in_docs_runs():
    ns: dict = {}
    exec(compile(_doc_code(), str(DOC), "exec"), ns)
    assert ns["used_len"] == 5 and ns["irqs"] == [0]


def test_driver_example_fails_when_device_misbehaves():
    """Negative control: the example's own checks catch a device that does not answer."""
    code = _doc_code().replace("q.push(fn.port, chain.head, n)", "pass")
    with pytest.raises(AssertionError):
        exec(compile(code, str(DOC), "exec"), {})
