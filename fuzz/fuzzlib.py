"""What every harness in fuzz/ shares: reading structured values out of the fuzzer's
bytes, running a harness under atheris, and finding its seed corpus.

A harness is a module ``fuzz/<name>.py`` with ``TestOneInput(data: bytes)`` (the
libFuzzer entry point atheris calls) and a docstring stating its invariants.  It
raises (``AssertionError`` for a broken invariant, anything unexpected for a bug)
only when something is wrong: every input the code under test refuses must be
refused with the typed error the harness names.  ``TestOneInput`` needs no atheris:
``tests/test_fuzz_corpus.py`` runs every corpus file through it.

``python fuzz/<name>.py [libFuzzer options] [DIR...]`` fuzzes (``scripts/fuzz``
runs them all); without atheris it says how to install it and exits 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: the migration test fakes (MemoryVm, MemoryVmShell) live with the tests (tests/fakes.py)
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.append(str(TESTS_DIR))

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
HARNESSES = (
    "ctrl_queue",
    "state_image",
    "virtqueue_chain",
    "stream_sections",
    "vhost_user",
    "qmp_input",
    "vfio_user",
    "blk_fast_path",
    "net_fast_path",
)


def corpus(name: str) -> list[Path]:
    """The seed files of harness ``name``, sorted."""
    return sorted(p for p in (CORPUS_DIR / name).iterdir() if p.is_file())


class Reader:
    """Consume the fuzzer's bytes as small typed values; past the end everything is 0/empty
    (so every input, however short, is a valid program for the harness)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + max(0, n)]
        self.pos += len(out)
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.bytes(width), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def rest(self) -> bytes:
        return self.bytes(self.left)


def open_fds() -> int:
    """How many fds this process has open (the harnesses' leak check)."""
    return len(os.listdir("/proc/self/fd"))


def make_fd(eventfd: bool, memfd_size: int = 1 << 20) -> int:
    """An fd a peer could pass: an eventfd (kick, call, MSI-X) or a 1 MiB memfd (memory)."""
    if eventfd:
        return os.eventfd(0, os.EFD_NONBLOCK)
    fd = os.memfd_create("vlm-fuzz-memory")
    os.ftruncate(fd, memfd_size)
    return fd


def serve_connection(
    r: Reader,
    reader: Any,
    handle: Callable[[Any], Any],
    disconnect: Callable[[], None],
    check: Callable[[Any, Any], None],
    feed_refused: type[BaseException],
    handle_refused: type[BaseException],
    max_chunks: int = 24,
) -> None:
    """One client connection of a message-protocol server, fed the fuzzer's chunks.

    Each chunk is ``nfds u8 (mod 3), kind u8 (bit i: fd i is an eventfd), length u16
    (mod 4 KiB), bytes``: the fds (:func:`make_fd`) come with the bytes, as with
    SCM_RIGHTS.  ``reader.feed(bytes, fds)`` frames them into messages (``feed_refused``
    drops the connection); each message goes to ``handle`` and its answer to
    ``check(answer, msg)``; ``handle_refused`` drops the connection, and the messages
    after it only close their fds.  Then the connection ends as the server ends it
    (``reader.eof()``, ``reader.close()``, ``disconnect()``), and every fd the client
    passed must be closed by then (AssertionError "fds leaked" otherwise)."""
    fds_before = open_fds()
    try:
        for _ in range(max_chunks):
            if r.left == 0:
                break
            nfds, kinds = r.u8() % 3, r.u8()
            chunk = r.bytes(r.u16() % 4096)
            fds = [make_fd(bool(kinds >> i & 1)) for i in range(nfds)]
            try:
                msgs: Sequence[Any] = reader.feed(chunk, fds)
            except feed_refused:
                break
            dropped = False
            for msg in msgs:
                if dropped:
                    msg.close_fds()
                    continue
                try:
                    answer = handle(msg)
                except handle_refused:
                    dropped = True  # the server drops the connection here
                    continue
                check(answer, msg)
            if dropped:
                break
        try:
            reader.eof()
        except feed_refused:
            pass
    finally:
        reader.close()
        disconnect()
    assert open_fds() == fds_before, f"{open_fds() - fds_before} fds leaked"


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Fuzz ``test_one_input`` with atheris (coverage-guided, all loaded code instrumented)."""
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        sys.stderr.write("atheris is not installed: pip install -e '.[fuzz]'\n")
        raise SystemExit(2) from None
    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def check_reported_writes(regions: Sequence[tuple[int, Any, Any]], written: bytes, nbytes: int) -> None:
    """The invariant of the C fast paths' harnesses: ``written`` (little-endian u64 ``(addr, len)``
    pairs) adds up to ``nbytes``, every pair lies inside one region, and no byte of a region
    changed outside them -- a write the dirty trackers would not hear of.  ``regions``:
    ``(gpa, bytes now, bytes before)`` per region, numpy uint8 arrays."""
    import numpy as np

    pairs = np.frombuffer(written, "<u8").reshape(-1, 2)
    assert int(pairs[:, 1].sum()) == nbytes, (int(pairs[:, 1].sum()), nbytes)
    covered = [np.zeros(len(now), bool) for _, now, _ in regions]
    for addr, n in pairs.tolist():
        for (gpa, now, _), cov in zip(regions, covered):
            if gpa <= addr and addr + n <= gpa + len(now):
                cov[addr - gpa : addr - gpa + n] = True
                break
        else:
            raise AssertionError(f"a reported write ({addr:#x}, {n}) lies in no region")
    for (_, now, before), cov in zip(regions, covered):
        # numpy calls, not `!=` / `==`: atheris hooks comparison operators, and on large arrays
        # its hook's memory grows with every input
        assert not np.logical_and(np.not_equal(now, before), ~cov).any(), "a guest-memory write was not reported"
