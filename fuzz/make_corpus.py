"""Write the seed corpus of every harness (fuzz/corpus/<name>/seed-*), from the real code.

``python fuzz/make_corpus.py`` rewrites the seed-* files (crash-* files, inputs that
once broke an invariant, are kept as they are).  The seeds are small, real inputs:
commands the PF driver sends, images a VF saves, chains a driver adds, a stream a
source session writes, a front-end's opening messages, a QMP session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from fuzzlib import CORPUS_DIR

from virtio_lm.devices.dmatest import DmaTestDevice
from virtio_lm.drivers.net_driver import DEFAULT_WANTED
from virtio_lm.memory import Memory
from fakes import MemoryVm
from virtio_lm.migration.session import SourceSession
from virtio_lm.net.testbed import make_vm, save_image
from virtio_lm.pci import PciDriverTransport, VirtioPciFunction
from virtio_lm.virtqueue.driver import Allocator
from virtio_lm.wire.ctrl import (
    CLASS_VF_MIGRATION,
    FuncId,
    FuncOffset,
    MigrationCommand,
    SetState,
    StartDirtyTrack,
    TrackMode,
    VfState,
)
from virtio_lm.wire.features import Feature, bit
from virtio_lm.wire.blk import BlkOutHdr, BlkReqType
from virtio_lm.wire.ring import DescFlags, VirtqDesc
from virtio_lm.wire.state import InflightHeader, QueueRecord, Record, RecordType, decode_image, encode_image
from virtio_lm.wire import vfio_user as VW
from virtio_lm.wire.pcicfg import BAR0, PCI_SRIOV_CTRL, PCI_SRIOV_CTRL_VFE
from virtio_lm.wire.pci import COMMON_CFG_BY_NAME
from virtio_lm.wire.vhost_user import Header, Inflight, MemRegion, Request, VringState, encode_mem_table

MC = MigrationCommand


def u16(v: int) -> bytes:
    return v.to_bytes(2, "little")


# ------------------------------------------------------------------ ctrl_queue
def cmd(command: int, data: bytes = b"", space: int = 64, cls: int = CLASS_VF_MIGRATION) -> bytes:
    return bytes([cls, command]) + u16(space) + bytes([len(data)]) + data


def ctrl_queue() -> dict[str, bytes]:
    return {
        "identify": cmd(MC.IDENTIFY),
        "save-lifecycle": b"".join([
            cmd(MC.GET_STATE_ATTRS, FuncId(1).encode()),
            cmd(MC.SET_STATE, SetState(1, VfState.QUIESCED).encode(), 0),
            cmd(MC.SET_STATE, SetState(1, VfState.FREEZED).encode(), 0),
            cmd(MC.GET_STATE_ATTRS, FuncId(1).encode()),
            cmd(MC.SAVE_STATE, FuncOffset(1, 0, 0).encode(), 255),
            cmd(MC.SET_STATE, SetState(1, VfState.QUIESCED).encode(), 0),
            cmd(MC.SET_STATE, SetState(1, VfState.RUNNING).encode(), 0),
        ]),
        "pull-tracking": b"".join([
            cmd(MC.START_DIRTY_PAGE_TRACK, StartDirtyTrack(1, TrackMode.PULL_BITMAP).encode(), 0),
            cmd(MC.GET_DIRTY_REPORT_SIZE, FuncId(1).encode(), 4),
            cmd(MC.REPORT_DIRTY_PAGES, FuncOffset(1, 0, 0).encode(), 128),
            cmd(MC.STOP_DIRTY_PAGE_TRACK, FuncId(1).encode(), 0),
        ]),
        "restore-into-init-vf": b"".join([
            cmd(MC.SET_STATE, SetState(2, VfState.FREEZED).encode(), 0),
            cmd(MC.RESTORE_STATE, FuncOffset(2, 0, 0).encode() + b"VLMS", 0),
        ]),
        "device-class": cmd(0, b"\x01", 1, cls=2),
    }


# ------------------------------------------------------------------ state_image
def with_two_in_flight(blob: bytes, queue: int) -> bytes:
    img = decode_image(blob)
    out, used = [], 0
    for r in img.records:
        if r.type == RecordType.QUEUE and QueueRecord.decode(r.payload).index == queue:
            q = QueueRecord.decode(r.payload)
            used = q.used_idx
            r = Record(r.type, dataclasses.replace(q, last_avail_idx=(used + 2) & 0xFFFF).encode())
        out.append(r)
    out.append(Record(RecordType.INFLIGHT, InflightHeader(queue, 0, used, 0, 0).encode()))
    out.append(Record(RecordType.INFLIGHT, InflightHeader(queue, 1, (used + 1) & 0xFFFF, 1, 4).encode() + b"\0\1\2\3"))
    img.records = out
    return encode_image(img)


def state_image() -> dict[str, bytes]:
    net = make_vm(None, name="seed-net")
    net.bring_up(DEFAULT_WANTED, queue_size=64)
    net.controller.set_state(1, VfState.QUIESCED)
    net.controller.set_state(1, VfState.FREEZED)
    net_img = save_image(net)
    net.close()
    mem = Memory(1 << 20, name="seed-dma")
    fn = VirtioPciFunction(DmaTestDevice(), mem.device_port("seed-dma-vf"), name="seed-dma-vf")
    feats = bit(Feature.VERSION_1) | bit(Feature.EVENT_IDX) | bit(Feature.INDIRECT_DESC)
    PciDriverTransport(fn, mem.cpu, Allocator(0x1000, 0x80000)).bring_up(feats, 1, size=16)
    dma_img = fn.device.mig_save()
    fn.device.close()
    mem.close()
    return {
        "net": b"\0\0" + net_img,
        "net-two-in-flight": b"\0\0" + with_two_in_flight(net_img, 1),
        "dmatest": b"\1\0" + dma_img,
        "dmatest-two-in-flight-fix": b"\1\1" + with_two_in_flight(dma_img, 0),
    }


# ------------------------------------------------------------------ virtqueue_chain
def chain_input(descs: list[VirtqDesc], scratch: bytes, heads: list[int], event_idx: int = 0) -> bytes:
    out = bytes([event_idx, len(descs)]) + b"".join(d.encode() for d in descs)
    out += bytes([len(scratch)]) + scratch + bytes([len(heads)]) + b"".join(u16(h) for h in heads)
    return out + b"\0"


def virtqueue_chain() -> dict[str, bytes]:
    N, W, I = DescFlags.NEXT, DescFlags.WRITE, DescFlags.INDIRECT
    buf = 0x9000
    table = VirtqDesc(buf, 16, N, 1).encode() + VirtqDesc(buf + 16, 32, W, 0).encode()
    return {
        "two-descriptor-chain": chain_input([VirtqDesc(buf, 16, N, 1), VirtqDesc(buf + 16, 32, W, 0)], b"", [0]),
        "indirect-chain": chain_input([VirtqDesc(0x8000, len(table), I, 0)], table, [0, 0], 1),
        "loop": chain_input([VirtqDesc(buf, 16, N, 1), VirtqDesc(buf, 16, N, 0)], b"", [0]),
    }


# ------------------------------------------------------------------ blk_fast_path
def blk_region(descs: list[VirtqDesc], heads: list[int], extra: dict[int, bytes]) -> bytes:
    """Region A of blk_fast_path: descriptor table at 0, avail ring at 0x1000 (heads, idx), and
    ``extra`` bytes at their offsets (headers, indirect tables)."""
    mem = bytearray(0x4000)
    for i, d in enumerate(descs):
        mem[16 * i : 16 * i + 16] = d.encode()
    mem[0x1002:0x1004] = u16(len(heads))
    for k, h in enumerate(heads):
        mem[0x1004 + 2 * k : 0x1006 + 2 * k] = u16(h)
    for at, data in extra.items():
        mem[at : at + len(data)] = data
    return bytes(mem)


def blk_fast_path() -> dict[str, bytes]:
    N, W, I = DescFlags.NEXT, DescFlags.WRITE, DescFlags.INDIRECT
    head = bytes([0b0100_0111, 4]) + u16(0) + u16(0) + u16(0) + bytes([0]) + u16(0)  # EVENT_IDX, FLUSH, size 16
    rd = BlkOutHdr(BlkReqType.IN, 0, 8).encode()
    wr = BlkOutHdr(BlkReqType.OUT, 0, 16).encode()
    read = [VirtqDesc(0x3000, 16, N, 1), VirtqDesc(0x10000, 4096, W | N, 2), VirtqDesc(0x3020, 1, W, 0)]
    write = [VirtqDesc(0x3040, 16, N, 5), VirtqDesc(0x11000, 1024, N, 6), VirtqDesc(0x3060, 1, W, 0)]
    table = b"".join(d.encode() for d in read)
    return {
        "read-and-write": head + blk_region(read + [VirtqDesc(0, 0, 0, 0)] + write, [0, 4], {0x3000: rd, 0x3040: wr}),
        "indirect-read": head + blk_region([VirtqDesc(0x3400, len(table), I, 0)], [0], {0x3000: rd, 0x3400: table}),
        "loop": head + blk_region([VirtqDesc(0x3000, 16, N, 1), VirtqDesc(0x10000, 512, W | N, 0)], [0], {0x3000: rd}),
    }


# ------------------------------------------------------------------ net_fast_path
def net_fast_path() -> dict[str, bytes]:
    N, I = DescFlags.NEXT, DescFlags.INDIRECT
    head = bytes([0b0000_0111, 4]) + u16(0) + u16(0) + u16(0) + u16(2048) + bytes([255])  # EVENT_IDX, size 16
    frame = bytes(12) + bytes.fromhex("02aabbccdd01525400123456") + b"\x88\xb5" + bytes(50)
    two = [VirtqDesc(0x3000, len(frame), 0, 0), VirtqDesc(0x3100, 12, N, 2), VirtqDesc(0x10000, 100, 0, 0)]
    table = VirtqDesc(0x3000, 12, N, 1).encode() + VirtqDesc(0x300C, len(frame) - 12, 0, 0).encode()
    offload = bytes([1]) + frame[1:]
    return {
        "two-frames": head + blk_region(two, [0, 1], {0x3000: frame}),
        "indirect-frame": head + blk_region([VirtqDesc(0x3400, len(table), I, 0)], [0], {0x3000: frame, 0x3400: table}),
        "offload-then-frame": head + blk_region([VirtqDesc(0x3200, len(offload), 0, 0), VirtqDesc(0x3000, len(frame), 0, 0)],
                                                [1, 0], {0x3000: frame, 0x3200: offload}),
        "loop": head + blk_region([VirtqDesc(0x3000, 12, N, 1), VirtqDesc(0x3000, 64, N, 0)], [0], {0x3000: frame}),
    }


# ------------------------------------------------------------------ stream_sections
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def source_stream(to_file: bool) -> bytes:
    vm = MemoryVm(256 << 10, seed=3)
    vm.cpu_write(3)  # three non-zero pages: RAM sections next to ZERO runs
    s = SourceSession(vm, clock=Clock(), to_file=to_file)
    s.start()
    out = bytearray()
    while not s.finished:
        data = b"".join(bytes(c) for c in s.produce(1 << 20))
        if not data:
            break
        out += data
        s.on_sent(len(data))
        if not to_file:
            break  # over a socket the source waits for the destination: the first part only
    return bytes(out)


def stream_sections() -> dict[str, bytes]:
    return {
        "file-stream": bytes([4]) + u16(0) + source_stream(True),
        "file-stream-chunked-repaired": bytes([4 | 3]) + u16(997) + source_stream(True),
        "socket-stream-start": bytes([0]) + u16(4096) + source_stream(False),
    }


# ------------------------------------------------------------------ vhost_user
def message(req: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return Header(int(req), flags, len(payload)).encode() + payload


def vhost_chunk(data: bytes, nfds: int = 0, kinds: int = 0) -> bytes:
    return bytes([nfds, kinds]) + u16(len(data)) + data


def vhost_user() -> dict[str, bytes]:
    feats = (bit(Feature.VERSION_1) | (1 << 30)).to_bytes(8, "little")
    return {
        "negotiate": vhost_chunk(message(Request.GET_FEATURES) + message(Request.SET_FEATURES, feats)
                                 + message(Request.SET_OWNER) + message(Request.GET_PROTOCOL_FEATURES)
                                 + message(Request.GET_QUEUE_NUM)),
        "mem-table-and-ring": vhost_chunk(message(Request.SET_MEM_TABLE, encode_mem_table(
            [MemRegion(0, 1 << 20, 0x7F00_0000_0000, 0)])), 1)
            + vhost_chunk(message(Request.SET_VRING_NUM, VringState(0, 16).encode())
                          + message(Request.SET_VRING_BASE, VringState(0, 0).encode()))
            + vhost_chunk(message(Request.SET_VRING_KICK, bytes(8)), 1, 1),
        "need-reply": vhost_chunk(message(Request.SET_OWNER, flags=1 | 8)),
        # INFLIGHT_SHMFD (bit 12): a region given out, then a 1 MiB memfd offered as one
        "inflight": vhost_chunk(message(Request.SET_PROTOCOL_FEATURES, (1 << 12).to_bytes(8, "little"))
                                + message(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 16).encode()))
            + vhost_chunk(message(Request.SET_INFLIGHT_FD, Inflight(4096, 0, 1, 16).encode()), 1),
        "send-rarp-to-blk": vhost_chunk(message(Request.SEND_RARP, bytes.fromhex("525400123456") + bytes(2))),
    }


# ------------------------------------------------------------------ qmp_input
def qmp_input() -> dict[str, bytes]:
    return {
        "negotiate-and-query": b"\0\0" + b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}',
        "set-parameters-cut": b"\1\2" + u16(7) + u16(30)
        + b'{"execute":"migrate-set-parameters","arguments":{"downtime-limit":100,"x-tracking-mode":"push-bitmap"}}',
        "garbage-then-command": b"\1\0" + b'[] 1 "x" {"execute":"migrate","arguments":{"uri":"tcp:h:1"},"id":"a"}',
        "deep-nesting": b"\1\0" + b"[" * 12 + b"]" * 12,
    }


# ------------------------------------------------------------------ vfio_user
def vfio_msg(cmd: int, payload: bytes = b"", mid: int = 1, flags: int = 0) -> bytes:
    return VW.Header(mid, int(cmd), VW.HEADER_SIZE + len(payload), flags, 0).encode() + payload


def vfio_hello() -> bytes:
    caps = json.dumps({"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}}).encode() + b"\0"
    return vfio_msg(VW.Command.VERSION, VW.VersionHead(0, 0).encode() + caps)


def vfio_user() -> dict[str, bytes]:
    C_ = VW.Command
    cfg = int(VW.PciRegion.CONFIG)
    sriov_ctrl = 0x100 + PCI_SRIOV_CTRL  # the PF's SR-IOV extended capability sits at 0x100
    status = BAR0.common + COMMON_CFG_BY_NAME["device_status"].offset
    return {
        # PF (selector 0): discovery, a configuration-space walk, VF Enable by register, FLR
        "pf-discover-and-reset": b"\0" + vhost_chunk(
            vfio_hello()
            + vfio_msg(C_.DEVICE_GET_INFO, VW.DeviceInfo().encode(), 2)
            + vfio_msg(C_.DEVICE_GET_REGION_INFO, VW.RegionInfo(index=cfg).encode(), 3)
            + vfio_msg(C_.DEVICE_GET_IRQ_INFO, VW.IrqInfo(index=int(VW.PciIrq.MSIX)).encode(), 4)
            + vfio_msg(C_.REGION_READ, VW.RegionAccess(0, cfg, 64).encode(), 5)
            + vfio_msg(C_.REGION_READ, VW.RegionAccess(0x100, cfg, 64).encode(), 6)
            + vfio_msg(C_.REGION_WRITE, VW.RegionAccess(sriov_ctrl, cfg, 2).encode() + u16(PCI_SRIOV_CTRL_VFE), 7)
            + vfio_msg(C_.DEVICE_RESET, b"", 8)),
        # VF (selector 1): a DMA window (a memfd), an MSI-X eventfd, a status write posted and not
        "vf-dma-irq-status": b"\1" + vhost_chunk(vfio_hello()) + vhost_chunk(
            vfio_msg(C_.DMA_MAP, VW.DmaMap(flags=3, offset=0, address=0, size=1 << 20).encode(), 2), 1, 0)
            + vhost_chunk(vfio_msg(C_.DEVICE_SET_IRQS, VW.IrqSet(
                flags=VW.VFIO_IRQ_SET_DATA_EVENTFD | VW.VFIO_IRQ_SET_ACTION_TRIGGER,
                index=int(VW.PciIrq.MSIX), start=0, count=1).encode(), 3), 1, 1)
            + vhost_chunk(
                vfio_msg(C_.REGION_WRITE, VW.RegionAccess(status, 0, 1).encode() + b"\x01", 4)
                + vfio_msg(C_.REGION_WRITE, VW.RegionAccess(status, 0, 1).encode() + b"\x03", 5,
                           int(VW.MsgFlags.NO_REPLY))
                + vfio_msg(C_.REGION_READ, VW.RegionAccess(status, 0, 1).encode(), 6)
                + vfio_msg(C_.DEVICE_FEATURE, VW.DeviceFeature(
                    flags=VW.VFIO_DEVICE_FEATURE_GET | VW.VFIO_DEVICE_FEATURE_MIGRATION).encode(), 7)
                + vfio_msg(C_.DMA_UNMAP, VW.DmaUnmap(address=0, size=1 << 20).encode(), 8)),
        "vf-command-before-version": b"\1" + vhost_chunk(vfio_msg(C_.REGION_READ, VW.RegionAccess(0, cfg, 4).encode())),
    }


SEEDS = {
    "ctrl_queue": ctrl_queue, "state_image": state_image, "virtqueue_chain": virtqueue_chain,
    "stream_sections": stream_sections, "vhost_user": vhost_user, "qmp_input": qmp_input,
    "vfio_user": vfio_user, "blk_fast_path": blk_fast_path, "net_fast_path": net_fast_path,
}


def write_all() -> None:
    for name, make in SEEDS.items():
        d = CORPUS_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for seed, data in make().items():
            (d / f"seed-{seed}").write_bytes(data)
            print(f"{name}/seed-{seed}: {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))
    write_all()
