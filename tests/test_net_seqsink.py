"""The bench's peer (virtio_lm.net.seqsink) and the one-step burst decoder it uses."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_lm.net.backends import UdpSwitchPort
from virtio_lm.net.peer import seq_frame
from virtio_lm.net.seqsink import SeqSink
from virtio_lm.net.switch import L2Switch
from virtio_lm.wire.switch import decode_frames, frame_message, frames_array, pack_frames

SRC = bytes.fromhex("525400123456")
DST = bytes.fromhex("02aabbccdd01")


@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=50), st.sampled_from([30, 64, 1514]))
def test_frames_array_is_decode_frames_for_equal_frames(seqs, size):
    frames = [seq_frame(DST, SRC, 9, s, size) for s in seqs]
    body = (pack_frames(frames)[0])[1:] if len(frames) > 1 else None
    if body is None:
        return
    arr = frames_array(body, size)
    assert arr is not None and [bytes(r) for r in arr] == decode_frames(body)


def test_frames_array_declines_unequal_or_broken_bodies():
    a, b = seq_frame(DST, SRC, 9, 0, 64), seq_frame(DST, SRC, 9, 1, 65)
    assert frames_array(pack_frames([a, b])[0][1:], 64) is None
    assert frames_array(pack_frames([a, a])[0][1:-1], 64) is None
    assert frames_array(b"", 64) is None


def feed(sink: SeqSink, seqs: list[int], *, burst: bool = True, src: bytes = SRC, size: int = 64) -> None:
    frames = [seq_frame(DST, src, 9, s, size) for s in seqs]
    msgs = pack_frames(frames) if burst else [frame_message(f) for f in frames]
    for m in msgs:
        sink.datagram(m)


@pytest.mark.parametrize("burst", [True, False])
def test_counts_in_order_frames(burst):
    s = SeqSink(SRC)
    feed(s, list(range(100)), burst=burst)
    assert s.report()["frames"] == 100 and s.duplicates == 0 and s.reordered == 0 and s.highest == 99


def test_duplicates_reorderings_and_other_frames_are_told_apart():
    s = SeqSink(SRC)
    feed(s, [0, 1, 2, 5])
    feed(s, [3, 4, 4])  # two below the highest (5), one of them twice
    feed(s, [2], burst=False)  # a duplicate in a FRAME
    feed(s, [6, 7], src=DST)  # from someone else
    s.datagram(b"\x07junk")
    r = s.report()
    assert r["frames"] == 6 and r["duplicates"] == 2 and r["reordered"] == 4 and r["other"] == 3


def test_a_mixed_burst_is_decoded_frame_by_frame():
    s = SeqSink(SRC)
    frames = [seq_frame(DST, SRC, 9, 0, 64), seq_frame(DST, SRC, 9, 1, 100)]
    s.datagram(pack_frames(frames)[0])
    assert s.count == 2


def test_as_a_process_it_counts_what_a_port_sends_through_the_switch():
    sw = L2Switch(idle_timeout=60).start()
    port = UdpSwitchPort(sw.address, name="tx")
    p = subprocess.Popen([sys.executable, "-m", "virtio_lm.net.seqsink", "--switch", f"{sw.address[0]}:{sw.address[1]}",
                          "--src", "52:54:00:12:34:56", "--mac", "02:aa:bb:cc:dd:01", "--quiet", "5"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while sw.lookup(DST) is None and time.monotonic() < deadline:  # the sink's announce reached it
            time.sleep(0.001)
        for k in range(10):
            port.send_many([seq_frame(DST, SRC, 9, 50 * k + i) for i in range(50)])
        out, _ = p.communicate(timeout=30)  # stdin closes: it reports
        r = json.loads(out.strip().splitlines()[-1])
        assert r["frames"] == 500 and r["duplicates"] == 0 and r["reordered"] == 0 and r["highest"] == 499
        assert sw.stats["forwarded"] == 500  # unicast: the sink's MAC was learned
    finally:
        p.kill()
        port.close()
        sw.stop()
