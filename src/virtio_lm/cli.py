"""The ``virtio-lm`` command line."""

from __future__ import annotations

import click

from virtio_lm import __version__


@click.group()
@click.version_option(__version__, prog_name="virtio-lm")
def main() -> None:
    """virtio-lm: live migration of virtio devices (VF migration proposal, 2021)."""
