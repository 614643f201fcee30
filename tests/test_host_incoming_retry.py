"""A client that retries ``migrate-incoming`` as soon as ``query-migrate`` says ``failed``.

Found by fuzzing (issue 12): after ``migrate-incoming file:`` failed on a corrupt
stream, query-migrate already said ``failed`` while the runner was still closing
its file, and a new migrate-incoming in that window was refused with "an incoming
migration is already listening".  Once query-migrate reports a final status the
host must accept the retry.
"""

from __future__ import annotations

import threading
import time

import pytest

from virtio_lm.errors import QmpError
from virtio_lm.host.host import Host, HostConfig
from virtio_lm.migration import transport
from virtio_lm.vm.machine import VmSpec

MAC = "52:54:00:12:34:56"
FINAL = ("completed", "failed", "cancelled")
WAIT = 30.0


@pytest.fixture
def incoming(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    corrupt = tmp_path / "corrupt.stream"
    corrupt.write_bytes(b"\xde\xad" * 100)  # no stream header: refused at offset 0
    host = Host(HostConfig(name="dst", qmp=f"unix:{tmp_path}/dst.qmp", incoming=True, calibrate=False,
                           vms=[VmSpec(name="vm0", memory_mib=32, blk_image=str(image), blk_blocks=16, net_mac=MAC)]))
    yield host, corrupt
    host.close()


def wait_final(host: Host) -> dict:
    deadline = time.monotonic() + WAIT
    while (info := host.table.call("query-migrate")).get("status") not in FINAL:
        assert time.monotonic() < deadline, info
    return info


class SlowClose:
    """A stream file whose close() takes a while (a busy disk, an NFS close): the
    runner is still finishing after the session is final."""

    def __init__(self, f, closing: threading.Event, release: threading.Event) -> None:
        self.f, self.closing, self.release = f, closing, release

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        self.closing.set()
        self.release.wait(1.0)
        self.f.close()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_retry_is_accepted_while_the_failed_runner_still_closes_its_file(incoming, monkeypatch):
    host, corrupt = incoming
    closing, release = threading.Event(), threading.Event()
    real_open = open
    monkeypatch.setattr(transport, "open",
                        lambda path, mode: SlowClose(real_open(path, mode), closing, release), raising=False)
    try:
        host.table.call("migrate-incoming", {"uri": f"file:{corrupt}"})
        info = wait_final(host)
        assert info["status"] == "failed" and "offset 0" in info["error-desc"], info
        monkeypatch.undo()
        host.table.call("migrate-incoming", {"uri": f"file:{corrupt}"})  # refused before the fix
        assert wait_final(host)["status"] == "failed"
        assert closing.is_set()
    finally:
        release.set()


@pytest.mark.slow  # over 0.4 s: out of the one-minute fast subset (CI runs it)
def test_fifty_immediate_retries_after_failed_are_all_accepted(incoming):
    host, corrupt = incoming
    host.table.call("migrate-incoming", {"uri": f"file:{corrupt}"})
    for i in range(50):
        assert wait_final(host)["status"] == "failed"
        try:
            host.table.call("migrate-incoming", {"uri": f"file:{corrupt}"})
        except QmpError as exc:
            pytest.fail(f"retry {i} refused: {exc}")
    assert wait_final(host)["status"] == "failed"
    assert host.table.call("query-status")["status"] == "inmigrate"


@pytest.mark.slow  # 0.3 s or more: out of the one-minute fast subset (CI runs it)
def test_cancel_of_a_listening_incoming_frees_its_port_for_an_immediate_retry(incoming):
    """migrate_cancel while migrate-incoming waits for its source: once query-migrate says
    'cancelled' the listener is closed, so a retry on the very same port is accepted."""
    host, _ = incoming
    host.table.call("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = int(host.table.call("query-migrate")["socket-address"][0]["port"])
    for _ in range(5):
        host.table.call("migrate_cancel")
        assert wait_final(host)["status"] == "cancelled"
        host.table.call("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})  # same port, at once
        assert int(host.table.call("query-migrate")["socket-address"][0]["port"]) == port
    host.table.call("migrate_cancel")
    assert wait_final(host)["status"] == "cancelled"
    assert host.table.call("query-status")["status"] == "inmigrate"
