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

import sys
from pathlib import Path
from typing import Callable

#: the migration test fakes (MemoryVm, MemoryVmShell) live with the tests (tests/fakes.py)
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.append(str(TESTS_DIR))

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
HARNESSES = ("ctrl_queue", "state_image", "virtqueue_chain", "stream_sections", "vhost_user", "qmp_input", "vfio_user")


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
