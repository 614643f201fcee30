"""The C extensions: virtio_lm.devices.blkfast (the virtio-blk read/write fast path) and
virtio_lm.devices.netfast (the virtio-net transmit fast path), sharing vring.h; see their
sources' headers.  Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            f"virtio_lm.devices.{name}",
            [f"src/virtio_lm/devices/{name}.c"],
            depends=["src/virtio_lm/devices/vring.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
        for name in ("blkfast", "netfast")
    ]
)
