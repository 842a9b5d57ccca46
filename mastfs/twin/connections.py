"""Connection bookkeeping shared by the twin's HTTP and S3 servers: shutting every client connection down
when the twin stops, and closing chosen ones with a reset (the "reset" fault)."""

from __future__ import annotations

import socket
import struct
import threading


def abort_socket(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer sees a connection reset (RST), not an orderly close."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class ResetRegistry:
    """Sockets to close with an RST instead of an orderly FIN once their request is done (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def mark(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def is_marked(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._sockets

    def pop(self, sock: socket.socket) -> bool:
        """True (and forgotten) when ``sock`` was marked."""
        with self._lock:
            if sock in self._sockets:
                self._sockets.discard(sock)
                return True
            return False


class TrackedConnections:
    """Mixin for a ``socketserver`` server (put it first in the bases; call :meth:`track_connections` in
    ``__init__``): remembers open client connections so :meth:`close_connections` can shut them all down,
    and closes the connections marked in ``resets`` with an RST."""

    def track_connections(self, resets: ResetRegistry) -> None:
        self.resets = resets
        self._connections_lock = threading.Lock()
        self._connections: set[socket.socket] = set()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        if self.resets.pop(request):
            abort_socket(request)
            return
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open client connection (used when the twin stops)."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
