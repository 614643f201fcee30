"""Every fuzz harness in fuzz/ runs its whole seed corpus (and the crash inputs it once
found) through its TestOneInput once -- no atheris needed -- so the harnesses cannot rot;
and each harness's invariant checks are shown to fire on a planted fault (negative
controls)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzzlib  # noqa: E402

MAX_SEED = 64 << 10


def harness(name: str):
    return importlib.import_module(name)


@pytest.mark.parametrize("name", fuzzlib.HARNESSES)
def test_harness_runs_its_corpus(name: str) -> None:
    mod = harness(name)
    assert "Invariants:" in (mod.__doc__ or ""), f"{name} states no invariants"
    files = fuzzlib.corpus(name)
    assert any(p.name.startswith("seed-") for p in files), f"{name} has no seeds"
    for p in files:
        data = p.read_bytes()
        assert len(data) <= MAX_SEED, f"{p} is not a small seed"
        mod.TestOneInput(data)


def test_every_harness_file_is_listed() -> None:
    found = {p.stem for p in FUZZ.glob("*.py")} - {"fuzzlib", "make_corpus"}
    assert found == set(fuzzlib.HARNESSES)
    assert {p.name for p in (FUZZ / "corpus").iterdir()} == set(fuzzlib.HARNESSES)


def seed(name: str, which: str) -> bytes:
    return (fuzzlib.CORPUS_DIR / name / f"seed-{which}").read_bytes()


# ----------------------------------------------------------------- negative controls
def test_ctrl_queue_catches_an_err_with_side_effects(monkeypatch) -> None:
    from virtio_lm.errors import CommandRefusedError
    from virtio_lm.pf.controller import VfMigrationController

    real = VfMigrationController.set_state

    def set_then_refuse(self, func_id, state):
        real(self, func_id, state)
        raise CommandRefusedError("SET_STATE", func_id, None, "planted: refused after changing the VF")

    monkeypatch.setattr(VfMigrationController, "set_state", set_then_refuse)
    with pytest.raises(AssertionError, match="ERR changed the VFs"):
        harness("ctrl_queue").TestOneInput(seed("ctrl_queue", "save-lifecycle"))


def test_state_image_catches_a_field_dropped_on_save(monkeypatch) -> None:
    from virtio_lm.devices.net import NetDevice
    from virtio_lm.wire.netstate import NetRecordType

    real = NetDevice.save_device_records

    def drop_vlans(self):
        return [(t, b"" if t == NetRecordType.NET_VLANS else p) for t, p in real(self)]

    from virtio_lm.wire.state import Record, decode_image, encode_image

    mod = harness("state_image")
    img = decode_image(seed("state_image", "net")[2:])  # a running net VF's image, one VLAN planted
    img.records = [Record(r.type, (5).to_bytes(2, "little")) if r.type == NetRecordType.NET_VLANS else r
                   for r in img.records]
    planted = b"\0\0" + encode_image(img)
    mod.TestOneInput(planted)  # sound: a VLAN filter entry round-trips (CTRL_VLAN negotiated)
    monkeypatch.setattr(NetDevice, "save_device_records", drop_vlans)
    with pytest.raises(AssertionError, match="did not save back byte-identical"):
        mod.TestOneInput(planted)


def test_virtqueue_chain_catches_a_pop_that_writes(monkeypatch) -> None:
    from virtio_lm.virtqueue import Virtqueue

    real = Virtqueue.pop

    def pop_and_scribble(self, port):
        chain = real(self, port)
        port.write(0x9000, b"\xff")
        return chain

    monkeypatch.setattr(Virtqueue, "pop", pop_and_scribble)
    with pytest.raises(AssertionError, match="pop wrote to guest memory"):
        harness("virtqueue_chain").TestOneInput(seed("virtqueue_chain", "two-descriptor-chain"))


def test_stream_sections_catches_a_failed_migration_left_half_written(monkeypatch) -> None:
    from fakes import MemoryVmShell

    data = seed("stream_sections", "file-stream")
    truncated = data[: len(data) * 3 // 4]  # pages written, then the file ends: fails, rolls back
    mod = harness("stream_sections")
    mod.TestOneInput(truncated)
    monkeypatch.setattr(MemoryVmShell, "abort", lambda self: None)
    with pytest.raises(AssertionError, match="half-written"):
        mod.TestOneInput(truncated)


def test_vhost_user_catches_a_leaked_fd(monkeypatch) -> None:
    from virtio_lm.vhost.protocol import Message

    data = seed("vhost_user", "mem-table-and-ring")
    mod = harness("vhost_user")
    mod.TestOneInput(data)
    monkeypatch.setattr(Message, "close_fds", lambda self: None)
    monkeypatch.setattr(Message, "take_fds", lambda self: [])
    with pytest.raises(AssertionError, match="fds leaked"):
        mod.TestOneInput(data)


def test_qmp_input_catches_a_malformed_answer(monkeypatch) -> None:
    from virtio_lm.host.qmp import framing

    real = framing.encode
    monkeypatch.setattr(framing, "encode", lambda m: real(m)[:-2] + b"\n")
    with pytest.raises(AssertionError):
        harness("qmp_input").TestOneInput(seed("qmp_input", "negotiate-and-query"))


def test_vfio_user_catches_a_reply_to_a_posted_write(monkeypatch) -> None:
    from virtio_lm.vfio_user.protocol import VfioUserDevice
    from virtio_lm.wire import vfio_user as W

    data = seed("vfio_user", "vf-dma-irq-status")
    mod = harness("vfio_user")
    mod.TestOneInput(data)
    real = VfioUserDevice.handle

    def answers_everything(self, msg):
        out = real(self, msg)
        return out if out is not None else W.Header(msg.header.id, msg.header.command, 16, W.MsgFlags.REPLY, 0).encode()

    monkeypatch.setattr(VfioUserDevice, "handle", answers_everything)
    with pytest.raises(AssertionError, match="REGION_WRITE"):
        mod.TestOneInput(data)


def test_vfio_user_catches_a_function_left_unserviceable(monkeypatch) -> None:
    from virtio_lm.vfio_user.protocol import VfioUserDevice

    data = seed("vfio_user", "pf-discover-and-reset")
    mod = harness("vfio_user")
    real = VfioUserDevice.disconnect

    def forgets_version(self):
        real(self)
        self.version_done = True  # the next client's VERSION is then "a second VERSION"

    monkeypatch.setattr(VfioUserDevice, "disconnect", forgets_version)
    with pytest.raises(Exception, match="second VERSION"):
        mod.TestOneInput(data)


def test_blk_fast_path_catches_a_write_it_was_not_told_of(monkeypatch) -> None:
    from virtio_lm.devices import blkfast

    mod = harness("blk_fast_path")
    real = blkfast.run

    def run_and_write_unreported(regions, queue, dev, journal):
        out = real(regions, queue, dev, journal)
        regions[1][1][0x3000] ^= 0xFF  # a byte of region B no reported write covers
        return out

    monkeypatch.setattr(mod.blkfast, "run", run_and_write_unreported)
    with pytest.raises(AssertionError, match="was not reported"):
        mod.TestOneInput(seed("blk_fast_path", "read-and-write"))


def test_net_fast_path_catches_a_write_it_was_not_told_of(monkeypatch) -> None:
    from virtio_lm.devices import netfast

    mod = harness("net_fast_path")
    real = netfast.tx

    def tx_and_write_unreported(regions, queue, max_frame, max_chains):
        out = real(regions, queue, max_frame, max_chains)
        regions[1][1][0x3000] ^= 0xFF  # a byte of region B no reported write covers
        return out

    monkeypatch.setattr(mod.netfast, "tx", tx_and_write_unreported)
    with pytest.raises(AssertionError, match="was not reported"):
        mod.TestOneInput(seed("net_fast_path", "two-frames"))
