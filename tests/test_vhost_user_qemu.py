"""The vhost-user-blk back-end under a real QEMU 7.2 and the real Linux virtio-blk driver.

Skipped (with the reason) only where QEMU, busybox-static or the Debian
kernel cannot be had; .ci/run installs them.  Guest side: tests/qemu/.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

from qemu.guest import Backend, GuestUnavailable, Vm, free_port, guest_assets

IMAGE_MIB = 128
BIG_SKIP_MIB, BIG_MIB = 64, 64  # the large region read before switch-over (never written by the guest)


@pytest.fixture(scope="module")
def assets() -> tuple[Path, Path]:
    try:
        return guest_assets()
    except GuestUnavailable as exc:
        pytest.skip(f"real-QEMU tests need QEMU, busybox-static and the Debian 6.1 kernel: {exc}")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw image: zeros, then random data in the region read before switch-over."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_MIB << 20)
        f.seek(BIG_SKIP_MIB << 20)
        f.write(os.urandom(BIG_MIB << 20))
    return img


def _sha(path: Path, offset: int, length: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()


def _cleanup(*things: object) -> None:
    for t in things:
        if t is not None:
            t.stop()  # type: ignore[attr-defined]


def test_guest_write_drop_caches_read_back_and_host_image(assets, image, tmp_path) -> None:
    kernel, initrd = assets
    be = Backend("ours", str(tmp_path / "vu.sock"), str(image))
    vm = None
    try:
        vm = Vm(tmp_path, "vm", kernel, initrd, be.socket_path)
        assert vm.boot() == IMAGE_MIB << 11
        # 8 MiB of random data at 1 MiB, written through the page cache then flushed
        rc, _ = vm.sh("dd if=/dev/urandom of=/tmp/w bs=1M count=8 2>/dev/null")
        assert rc == 0
        rc, want = vm.sh("sha256sum /tmp/w | cut -c1-64")
        assert rc == 0 and re.fullmatch(r"[0-9a-f]{64}", want)
        rc, out = vm.sh("dd if=/tmp/w of=/dev/vda bs=1M seek=1 conv=fsync 2>&1")
        assert rc == 0, out
        rc, _ = vm.sh("sync; echo 3 > /proc/sys/vm/drop_caches")
        assert rc == 0
        rc, got = vm.sh("dd if=/dev/vda bs=1M skip=1 count=8 2>/dev/null | sha256sum | cut -c1-64")
        assert rc == 0 and got == want
        # O_DIRECT too (DMA straight into the process's buffer)
        rc, got_direct = vm.sh("dd if=/dev/vda bs=64k skip=16 count=128 iflag=direct 2>/dev/null | sha256sum | cut -c1-64")
        assert rc == 0 and got_direct == want
        # the host sees the same bytes in the image file
        assert _sha(image, 1 << 20, 8 << 20) == want
        # negative control: a region the guest did not write is not that data
        assert _sha(image, 16 << 20, 8 << 20) != want
        # a flush request and the serial (GET_ID) go through the same device code
        rc, _ = vm.sh("sync")
        assert rc == 0
    finally:
        _cleanup(vm, be)
    out = be.output()
    assert "Traceback" not in out, out
