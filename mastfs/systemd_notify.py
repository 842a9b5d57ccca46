"""systemd's readiness protocol (``Type=notify`` units): tell the service manager the mount is ready, or
stopping. See docs/systemd.md."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def sd_notify(state: str) -> None:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to systemd's $NOTIFY_SOCKET, if any; a failure is
    logged, never raised."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state, exc)
