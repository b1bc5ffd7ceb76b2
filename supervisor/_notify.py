"""sd_notify, client side: tell *our* supervisor (systemd, a test) we are ready."""

from __future__ import annotations

import os
import socket

__all__ = ["sd_notify"]


def sd_notify(message: str) -> bool:
    """Send `message` to $NOTIFY_SOCKET; False when unset or unreachable."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), path)
        return True
    except OSError:
        return False
