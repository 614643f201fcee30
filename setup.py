"""The one C extension: virtio_lm.devices.blkfast (the virtio-blk read/write fast path; see
its source's header).  Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "virtio_lm.devices.blkfast",
            ["src/virtio_lm/devices/blkfast.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
