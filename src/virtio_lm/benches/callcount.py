"""Run a ``virtio-lm`` command with every function call counted, in every thread.

    python -m virtio_lm.benches.callcount OUT vhost-user-blk --socket ... --image ...

Calls are counted through the interpreter's profiling hook (``sys.setprofile`` /
``threading.setprofile``): Python functions and C functions apart.  On SIGUSR1 the process
writes ``SEQ PYTHON_CALLS C_CALLS`` (SEQ counting the signals) to OUT, atomically (a temporary
file renamed over it).  A bench reads the counts before and after a workload: the difference
divided by the requests is the interpreter's work per request, a figure that does not depend
on the machine's speed or load (the hook makes the process several times slower: never time
a counted process).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["Counter", "main"]


class Counter:
    """The profiling hook: ``py`` and ``c`` call counts (approximate across threads: ``+=`` on
    an attribute is not atomic, and a lost increment in a million does not change a figure)."""

    def __init__(self) -> None:
        self.py = 0
        self.c = 0
        self.seq = 0

    def hook(self, frame, event, arg) -> None:  # type: ignore[no-untyped-def]
        if event == "call":
            self.py += 1
        elif event == "c_call":
            self.c += 1

    def dump(self, path: str) -> None:
        self.seq += 1
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{self.seq} {self.py} {self.c}\n")
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        raise SystemExit("usage: python -m virtio_lm.benches.callcount OUT COMMAND [ARGS...]")
    out, rest = args[0], args[1:]
    counter = Counter()
    signal.signal(signal.SIGUSR1, lambda signum, frame: counter.dump(out))
    counter.dump(out)  # seq 1: the process is up and counting
    threading.setprofile(counter.hook)
    sys.setprofile(counter.hook)
    from virtio_lm.cli import main as cli_main

    cli_main(args=rest, prog_name="virtio-lm")


if __name__ == "__main__":
    main()
