"""The MAST twin as one handle: catalog + HTTP server + S3 server + faults + stats, on loopback.

``Twin.start(...)`` runs both servers in daemon threads of the calling process (what tests use);
``serve(...)`` is the body of ``mastfs twin serve``: it prints one JSON line (:meth:`Twin.info`) and
serves until SIGTERM/SIGINT. See docs/twin.md.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from types import TracebackType

from mastfs.twin.catalog import Catalog
from mastfs.twin.connections import ResetRegistry
from mastfs.twin.faults import FaultController, TwinStats
from mastfs.twin.http_api import DEFAULT_MAX_URL_LENGTH, MastHttpServer
from mastfs.twin.link import Link
from mastfs.twin.s3 import ADMIN_PING_PATH, BUCKET, S3Gateway, S3Server

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 30.0
SECOND_HOST = "127.0.0.2"
"""Loopback address of the twin's second HTTP listener, where the ``redirect`` fault sends downloads (a
host other than the MAST host, as a download mirror would be)."""


class Twin:
    """A running twin. Build it with :meth:`start`; stop it with :meth:`stop` or a ``with`` block.

    Attributes: ``mast_url`` ("http://127.0.0.1:P"), ``resolver_url`` (mast_url + "/Santa-war/query"),
    ``s3_endpoint`` ("http://127.0.0.1:Q"), ``bucket`` ("stpubdata"), ``catalog`` (the Catalog served),
    ``faults`` (the FaultController), ``link`` (the :class:`~mastfs.twin.link.Link` product bodies are
    paced by; loopback unless set), ``second_url`` ("http://127.0.0.2:R": the second listener serving
    downloads redirected by the ``redirect`` fault; it checks tokens like the first).
    """

    def __init__(
        self,
        catalog: Catalog,
        http_server: MastHttpServer,
        second_server: MastHttpServer,
        s3_server: S3Server,
        gateway: S3Gateway,
        faults: FaultController,
        stats: TwinStats,
        link: Link,
    ) -> None:
        self.catalog = catalog
        self.faults = faults
        self.link = link
        self._stats = stats
        self._http_server = http_server
        self._second_server = second_server
        self._s3_server = s3_server
        self._gateway = gateway
        http_host, http_port = http_server.server_address[:2]
        s3_host, s3_port = s3_server.server_address[:2]
        self.mast_url = f"http://{http_host}:{http_port}"
        self.resolver_url = self.mast_url + "/Santa-war/query"
        self.s3_endpoint = f"http://{s3_host}:{s3_port}"
        second_host, second_port = second_server.server_address[:2]
        self.second_url = f"http://{second_host}:{second_port}"
        for server in (http_server, second_server):
            server.peer_urls.update(second=self.second_url, mast=self.mast_url)
        self.bucket = BUCKET
        self._threads: list[threading.Thread] = []
        self._stopped = False

    @classmethod
    def start(cls, host: str = "127.0.0.1", port: int = 0, s3_port: int = 0, scale: float = 1.0,
              link: Link | None = None, max_url_length: int = DEFAULT_MAX_URL_LENGTH,
              query_seconds: float = 0.0, query_shape: str = "executing") -> Twin:
        """Build the catalog at ``scale``, start the HTTP server on ``port`` and the S3 server on
        ``s3_port`` (0 = any free port) in background threads, and return once both answer. ``link``
        paces product bodies (default: loopback, no pacing); request targets longer than
        ``max_url_length`` get 414 (0: no limit); ``query_seconds`` > 0 arms a ``slow_query`` fault of
        that many seconds and ``query_shape`` ("executing" or "first_byte") for every query.

        Raises OSError when a port cannot be bound, TimeoutError when a server does not come up,
        FaultError for a bad ``query_shape``.
        """
        catalog = Catalog(scale=scale)
        faults = FaultController()
        if query_seconds > 0:
            faults.add("invoke", "slow_query", seconds=query_seconds, shape=query_shape)
        stats = TwinStats()
        resets = ResetRegistry()
        link = link if link is not None else Link()
        http_server = MastHttpServer((host, port), catalog, faults, stats, link, max_url_length)
        second_server = None
        try:
            second_server = MastHttpServer((SECOND_HOST, 0), catalog, faults, stats, link, max_url_length)
            gateway = S3Gateway(catalog, faults, stats, resets, link)
            s3_server = S3Server(host, s3_port, gateway, resets)
        except BaseException:
            http_server.server_close()
            if second_server is not None:
                second_server.server_close()
            raise
        twin = cls(catalog, http_server, second_server, s3_server, gateway, faults, stats, link)
        for name, server in (("twin-http", http_server), ("twin-http-second", second_server),
                             ("twin-s3", s3_server)):
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=name, daemon=True
            )
            thread.start()
            twin._threads.append(thread)
        try:
            twin._wait_ready()
        except BaseException:
            twin.stop()
            raise
        logger.info("twin up: %s (scale %s)", twin.info(), scale)
        return twin

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for url in (self.mast_url + "/__twin__/stats", self.second_url + "/__twin__/stats",
                    self.s3_endpoint + ADMIN_PING_PATH):
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        response.read()
                    break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"twin server at {url} did not answer") from None
                    time.sleep(0.05)

    def info(self) -> dict[str, str]:
        """Exactly {"mast_url", "resolver_url", "s3_endpoint", "bucket"}: what clients need to connect."""
        return {
            "mast_url": self.mast_url,
            "resolver_url": self.resolver_url,
            "s3_endpoint": self.s3_endpoint,
            "bucket": self.bucket,
        }

    def stats(self) -> dict:
        """Request and body-byte counters, same JSON as ``GET /__twin__/stats`` (see docs/twin.md)."""
        return self._stats.snapshot()

    @property
    def max_url_length(self) -> int:
        """Longest request target the HTTP server answers (longer: 414); 0 means no limit."""
        return self._http_server.max_url_length

    @max_url_length.setter
    def max_url_length(self, length: int) -> None:
        self._http_server.max_url_length = length

    def reset_stats(self) -> None:
        """Zero the counters."""
        self._stats.reset()

    def stop(self) -> None:
        """Release stalled requests, stop both servers, close their connections and free the S3
        bucket. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.faults.shutdown()
        for server in (self._http_server, self._second_server, self._s3_server):
            server.shutdown()
            server.close_connections()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._gateway.dispose()
        logger.info("twin stopped: %s", self.mast_url)

    def __enter__(self) -> Twin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 0, s3_port: int = 0, scale: float = 1.0,
          link: Link | None = None, max_url_length: int = DEFAULT_MAX_URL_LENGTH, query_seconds: float = 0.0,
          query_shape: str = "executing") -> None:
    """Run a twin in the foreground: print one JSON line (:meth:`Twin.info`) to stdout, then serve
    until SIGTERM or SIGINT, then stop cleanly and return (the CLI exits 0)."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("twin: signal %d, stopping", signum)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with Twin.start(host=host, port=port, s3_port=s3_port, scale=scale, link=link,
                        max_url_length=max_url_length, query_seconds=query_seconds,
                        query_shape=query_shape) as twin:
            sys.stdout.write(json.dumps(twin.info()) + "\n")
            sys.stdout.flush()
            while not stop_requested.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
