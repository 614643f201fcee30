"""Operations owners offer instead of having their internals reached into (issue 10 item 4):
``locked()`` on a function and a device, ``vf_status`` / ``vf_commands`` on a PF."""

from __future__ import annotations

import threading

import pytest

from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.errors import CommandRefusedError, VirtioLmError
from virtio_lm.memory import PAGE_SIZE, Memory
from virtio_lm.pci.function import VirtioPciFunction
from virtio_lm.pci.sriov import SriovPF
from virtio_lm.pf.device import build_pf, vf_commands, vf_status
from virtio_lm.wire.ctrl import TrackMode, VfState

BLOCKED = 0.2  # long enough for an unblocked call to have finished many times over


def _runs_while(held, call) -> bool:
    """Whether ``call`` completes on another thread while ``held`` is entered."""
    done = threading.Event()
    t = threading.Thread(target=lambda: (call(), done.set()), daemon=True)
    with held:
        t.start()
        finished_inside = done.wait(BLOCKED)
    t.join(10)
    assert done.is_set()  # it did run once the lock was let go
    return finished_inside


@pytest.fixture
def fn():
    mem = Memory(1 << 20, name="owner-ops")
    f = VirtioPciFunction(DmaTestDevice(), mem.device_port("vf"), name="vf")
    yield f
    f.device.close()
    mem.close()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_function_locked_holds_register_access(fn):
    read = lambda: fn.common_read(0, 4)  # noqa: E731 - device_feature_select
    assert _runs_while(_Nothing(), read)  # the control: nothing held, the read goes through
    assert not _runs_while(fn.locked(), read)
    with fn.locked(), fn.locked():  # re-entrant, as mig_restore needs (apply_function inside)
        pass


def test_device_locked_holds_the_in_flight_table(fn):
    dev = fn.device
    assert _runs_while(_Nothing(), lambda: dev.in_flight)
    assert not _runs_while(dev.locked(), lambda: dev.in_flight)


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_vhost_function_offers_both_locks():
    from virtio_lm.vhost.backend import VhostFunction

    vf = VhostFunction(DmaTestDevice(), name="vh")
    try:
        assert not _runs_while(vf.fds_locked(), lambda: vf.signal_call(0))
        assert _runs_while(_Nothing(), lambda: vf.signal_call(0))
        def take_transport_lock() -> None:
            with vf.locked():
                pass

        assert _runs_while(_Nothing(), take_transport_lock)
        assert not _runs_while(vf.locked(), take_transport_lock)
    finally:
        vf.device.close()


@pytest.fixture
def pf():
    host = Memory(1 << 20, name="owner-pf")
    guest = Memory(4 << 20, name="owner-guest")
    p = build_pf(host.device_port("pf"), total_vfs=2, name="pf", threaded=False)
    devs = []

    def factory(n):
        devs.append(DmaTestDevice())
        return devs[-1], guest.device_port(f"vf{n}")

    p.enable_vfs(2, factory)
    yield p
    for d in devs:
        d.close()
    p.device.close()
    host.close()
    guest.close()


def test_vf_status_follows_the_controller(pf):
    st = vf_status(pf, 1)
    assert (st.number, st.state, st.mode, st.tracked_marks, st.overflow_events) == (1, VfState.INIT, None, 0, 0)
    vf_commands(pf).start_dirty_page_track(2, TrackMode.PULL_BITMAP, [])
    pf.vf(2).port.write(3 * PAGE_SIZE, b"x" * (2 * PAGE_SIZE))  # a VF DMA: two pages marked
    st2 = vf_status(pf, 2)
    assert (st2.mode, st2.tracked_marks) == (TrackMode.PULL_BITMAP, 2)
    assert vf_status(pf, 1).mode is None  # per VF
    vf_commands(pf).stop_dirty_page_track(2)
    assert vf_status(pf, 2).mode is None and vf_status(pf, 2).tracked_marks == 0


def test_vf_status_refuses_what_is_not_a_vf(pf):
    with pytest.raises(CommandRefusedError):
        vf_status(pf, 3)
    with pytest.raises(CommandRefusedError):
        vf_status(pf, 0)


def test_a_pf_without_a_controller_is_refused():
    mem = Memory(1 << 20, name="owner-plain")
    plain = SriovPF(DmaTestDevice(), mem.device_port("p"), name="plain", total_vfs=1)
    try:
        with pytest.raises(VirtioLmError, match="not built by build_pf"):
            vf_status(plain, 1)
        with pytest.raises(VirtioLmError, match="not built by build_pf"):
            vf_commands(plain)
    finally:
        plain.device.close()
        mem.close()


# --------------------------------------------------------------------------- injected back-end
def _unmet(protocol: type, cls: type) -> list[str]:
    """The protocol's methods ``cls`` lacks or takes different parameters for."""
    import inspect

    out = []
    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        impl = getattr(cls, name, None)
        if impl is None or list(inspect.signature(member).parameters) != list(inspect.signature(impl).parameters):
            out.append(name)
    return out


def test_the_net_back_ends_are_what_the_net_device_is_given():
    """devices.net takes a FramePort instead of importing net.backends: the back-ends must
    still be one."""
    from virtio_lm.devices.net import FramePort
    from virtio_lm.net.backends import NetBackend, TapBackend, UdpSwitchPort

    assert _unmet(FramePort, object) == ["attach", "wait_tx_ready", "try_tx_ready", "send", "tx_unmetered", "send_many",
                                         "wake_tx", "close"]
    for cls in (NetBackend, UdpSwitchPort, TapBackend):
        assert _unmet(FramePort, cls) == [], cls

    class Partial:  # negative control: one method missing, one with other parameters
        def attach(self, deliver): ...
        def wait_tx_ready(self, abort): ...
        def try_tx_ready(self, abort): ...
        def send(self, data, flags): ...
        def close(self): ...

    assert _unmet(FramePort, Partial) == ["send", "tx_unmetered", "send_many", "wake_tx"]
