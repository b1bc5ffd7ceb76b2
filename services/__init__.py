"""Service types from the seed (libvirt, virtlog, qemu-binfmt, hurd-vm, ganeti).

One module per type.  Each defines ``SERVICE_TYPES = [supervisor.ServiceType(...)]``
and is built only on the engine's public API (``supervisor``); the loader
imports every module here, so adding a type needs no engine change.
"""
