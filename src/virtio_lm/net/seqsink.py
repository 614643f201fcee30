"""A switch port that counts the sequence-numbered frames one MAC sends: the devices bench's peer.

:class:`SeqSink` takes every frame the switch sends it (one FRAME or a FRAMES burst per
datagram), keeps those from ``src`` that are sequence frames of ``stream``
(:func:`virtio_lm.net.peer.seq_frame`) and counts them, the duplicates (a number seen before)
and the reorderings (a number below the highest seen), decoding a burst of equal frames in one
array step (:func:`virtio_lm.wire.switch.frames_array`).  As a process --
``python -m virtio_lm.net.seqsink --switch HOST:PORT --src MAC`` -- it prints ``ready``, counts
until stdin closes (and 50 ms pass without a datagram) or none came for ``--quiet`` seconds, then
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
from typing import Sequence

import numpy as np

from virtio_lm.errors import WireError
from virtio_lm.net.switch import Addr, big_buffers
from virtio_lm.wire.net import ETH_HLEN, announce_frame, parse_mac
from virtio_lm.wire.netstate import ETHERTYPE_SEQ, SEQ_MAGIC, SEQ_PAYLOAD_DTYPE
from virtio_lm.wire.switch import (
    CAP_BATCHES,
    KIND_FRAME,
    KIND_FRAMES,
    decode_frames,
    frame_message,
    frames_array,
    hello_message,
)

__all__ = ["SeqSink", "main"]

_SEQ_AT = ETH_HLEN  # the SeqPayload follows the Ethernet header


class SeqSink:
    """See the module docstring.  Sans-socket core: :meth:`datagram`; :meth:`serve` feeds it."""

    def __init__(self, src: bytes, stream: int = 9, *, mac: bytes | None = None) -> None:
        self.mac = None if mac is None else bytes(mac)
        self.ready = threading.Event()  # attached (and announced)
        self.src = np.frombuffer(bytes(src), dtype=np.uint8)
        self.stream = stream
        self.count = 0
        self.duplicates = 0
        self.reordered = 0
        self.other = 0
        self.datagrams = 0
        self.highest = -1
        self._seen = np.zeros(1 << 16, dtype=bool)  # grows as numbers come

    def datagram(self, data: bytes) -> None:
        """One datagram the switch sent."""
        self.datagrams += 1
        if not data or data[0] not in (KIND_FRAME, KIND_FRAMES):
            self.other += 1
            return
        body = memoryview(data)[1:]
        if data[0] == KIND_FRAME:
            frames = [bytes(body)]
            arr = None
        else:
            arr = None
            if len(body) >= 2:
                arr = frames_array(body, int.from_bytes(body[:2], "little"))
            if arr is None:
                try:
                    frames = decode_frames(body)
                except WireError:
                    self.other += 1
                    return
        if arr is None:
            size = min((len(f) for f in frames), default=0)
            if size < ETH_HLEN + SEQ_PAYLOAD_DTYPE.itemsize:
                self.other += len(frames)
                return
            arr = np.frombuffer(b"".join(f[:size] for f in frames), dtype=np.uint8).reshape(len(frames), size)
        self._frames(arr)

    def _frames(self, arr: np.ndarray) -> None:
        if arr.shape[1] < ETH_HLEN + SEQ_PAYLOAD_DTYPE.itemsize:
            self.other += len(arr)
            return
        pay = np.ascontiguousarray(arr[:, _SEQ_AT : _SEQ_AT + SEQ_PAYLOAD_DTYPE.itemsize]).view(SEQ_PAYLOAD_DTYPE).ravel()
        ethertype = arr[:, 12].astype(np.uint16) << 8 | arr[:, 13]
        ok = ((arr[:, 6:12] == self.src).all(axis=1) & (ethertype == ETHERTYPE_SEQ)
              & (pay["magic"] == SEQ_MAGIC) & (pay["stream"] == self.stream))
        self.other += int(len(arr) - ok.sum())
        seqs = pay["seq"][ok].astype(np.int64)
        if not len(seqs):
            return
        top = int(seqs.max())
        if top >= len(self._seen):
            grown = np.zeros(max(top + 1, 2 * len(self._seen)), dtype=bool)
            grown[: len(self._seen)] = self._seen
            self._seen = grown
        uniq, first = np.unique(seqs, return_index=True)
        dup = int(len(seqs) - len(uniq)) + int(self._seen[uniq].sum())
        self.duplicates += dup
        self._seen[uniq] = True
        order = np.maximum.accumulate(np.concatenate(([self.highest], seqs)))[:-1]
        self.reordered += int((seqs < order).sum())
        self.count += len(seqs) - dup
        self.highest = max(self.highest, top)

    def report(self) -> dict[str, int]:
        return {"frames": self.count, "duplicates": self.duplicates, "reordered": self.reordered,
                "other": self.other, "datagrams": self.datagrams, "highest": self.highest}

    def serve(self, switch: Addr, stop: threading.Event, quiet: float) -> None:
        """Attach to ``switch`` (bursts welcome; announcing :attr:`mac`, if any) and count until
        ``quiet`` s pass without a datagram (once one came), or ``stop`` is set and 50 ms pass
        without one."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            big_buffers(s)
            s.bind(("127.0.0.1" if switch[0].startswith("127.") else "0.0.0.0", 0))
            s.sendto(hello_message(CAP_BATCHES), switch)
            if self.mac is not None:  # the switch learns where this MAC is
                s.sendto(frame_message(announce_frame(self.mac)), switch)
            self.address = s.getsockname()
            self.ready.set()
            s.settimeout(0.05)
            idle = 0.0
            while True:
                try:
                    data, src = s.recvfrom(65536)
                except socket.timeout:
                    idle += 0.05
                    if stop.is_set() or (self.datagrams and idle >= quiet):
                        return  # (after stop: once 50 ms passed with nothing more in flight)
                    continue
                idle = 0.0
                if src == switch:
                    self.datagram(data)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m virtio_lm.net.seqsink", description=__doc__.splitlines()[0])
    ap.add_argument("--switch", required=True, help="HOST:PORT")
    ap.add_argument("--src", required=True, help="the sender's MAC")
    ap.add_argument("--mac", help="this port's MAC, announced so the switch forwards to it")
    ap.add_argument("--stream", type=int, default=9)
    ap.add_argument("--quiet", type=float, default=1.0, help="stop after this many seconds without a datagram")
    args = ap.parse_args(argv)
    host, _, port = args.switch.rpartition(":")
    sink = SeqSink(parse_mac(args.src), args.stream, mac=None if args.mac is None else parse_mac(args.mac))
    stop = threading.Event()

    def stdin_closed() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    t = threading.Thread(target=sink.serve, args=((host, int(port)), stop, args.quiet))
    t.start()
    while not sink.ready.wait(0.1):
        if not t.is_alive():  # it failed before attaching
            return 1
    print("ready", flush=True)
    t.join()
    print(json.dumps(sink.report()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
