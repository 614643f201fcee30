"""Every byte layout of virtio-lm.  The only package that calls :mod:`struct`.

Little-endian everywhere.  Modules: :mod:`.codec` (the declarative layout
helper), :mod:`.ring` (split virtqueue), :mod:`.ctrl` (generic v1 control
buffers and the VF migration commands), :mod:`.blk`, :mod:`.net`,
:mod:`.pci` (virtio_pci_common_cfg register layout).
"""
