"""Run-time controls of the MAST twin: fault injection and traffic counters.

Both servers of the twin (HTTP in :mod:`mastfs.twin.http_api`, S3 in :mod:`mastfs.twin.s3`) consult one
:class:`FaultController` before answering and report every request and every body byte they write to one
:class:`TwinStats`. Tests drive them through the Python handle (``twin.faults.add(...)``, ``twin.stats()``)
or, from another process, through the admin endpoints ``/__twin__/faults`` and ``/__twin__/stats``.

Thread-safety: every public method may be called from any server thread; state is guarded by one lock
per object.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ENDPOINTS = ("invoke", "columnsconfig", "download", "path_lookup", "whoami", "resolver", "s3")
KINDS = (
    "latency",
    "status",
    "html_504",
    "reset",
    "truncate",
    "wrong_range",
    "wrong_body",
    "stall",
    "executing",
    "unauthorized",
    "ignore_range",
    "html_200",
    "mutate_rows",
    "endless_paging",
    "crafted_names",
    "drip",
    "redirect",
    "slow_query",
    "error_timeout",
    "page_shift",
)
# Kinds that need a response body to act on (they change how the body is written).
BODY_KINDS = frozenset({"reset", "truncate", "drip"})
# Kinds that only make sense for a GET carrying a single satisfiable Range header.
RANGE_KINDS = frozenset({"wrong_range", "wrong_body", "ignore_range"})
# Kinds every request of an endpoint can suffer (answer replaced or delayed before any work is done).
GENERIC_KINDS = frozenset({"latency", "status", "html_504", "stall", "unauthorized"})
# Hostile-server kinds: the answer is built, then made hostile (see the functions at the end of this module).
# html_200 hits every HTTP endpoint; the others rewrite JSON answers of the endpoints listed here.
HOSTILE_KINDS = frozenset({"html_200", "mutate_rows", "endless_paging", "crafted_names"})
KIND_ENDPOINTS: dict[str, frozenset[str]] = {
    "executing": frozenset({"invoke"}),
    "html_200": frozenset(set(ENDPOINTS) - {"s3"}),
    "mutate_rows": frozenset({"invoke"}),
    "endless_paging": frozenset({"invoke"}),
    "crafted_names": frozenset({"invoke", "path_lookup"}),
    "drip": frozenset({"download", "s3"}),
    "redirect": frozenset({"download"}),
    "slow_query": frozenset({"invoke"}),
    "error_timeout": frozenset({"invoke"}),
    "page_shift": frozenset({"invoke"}),
}
DRIP_BYTES_PER_SECOND = 1024
"""How fast a ``drip`` fault sends a body by default: a server that never stalls long enough for a read
timeout but would take an hour for a 4 MiB block."""
REDIRECT_HOPS_MAX = 20
"""Most redirects one ``redirect`` fault chains (its ``hops`` parameter)."""
MUTATE_MODES = ("mixed", "types", "missing")
NUMERIC_PARAMS = ("seconds", "code", "after_bytes", "polls", "retry_after", "shift", "pages", "bytes_per_second",
                  "hops")
REDIRECT_TARGETS = ("second", "mast")
SLOW_QUERY_SHAPES = ("executing", "first_byte")
SLOW_QUERY_SERVICES = frozenset({"Mast.Caom.Products", "Mast.Caom.Filtered", "Mast.Caom.Filtered.Position"})
"""The services a ``slow_query`` fault slows (MAST's large JWST queries are product and CAOM searches)."""
PAGE_SHIFT_MODES = ("insert", "drop")
TIMEOUT_MESSAGE = "Query timed out: the server did not finish in time. Please try again later."
"""Default ``msg`` of an ``error_timeout`` answer (MAST reports its server-side timeouts as ERROR)."""
CRAFTED_FIELDS = ("productFilename", "dataURI", "obs_id")
ENDLESS_PAGES = 1_000_000
"""Pages an ``endless_paging`` answer claims by default."""
REQUEST_LOG_SIZE = 1000
"""Most recent requests kept by :class:`TwinStats` for ``GET /__twin__/requests``."""

HTML_200_PAGE = (
    b"<!DOCTYPE html>\r\n<html><head><title>MAST Portal</title></head>\r\n<body>\r\n"
    b"<h1>Scheduled maintenance</h1>\r\n<p>The MAST services are down for maintenance and will be back "
    b"shortly.</p>\r\n</body></html>\r\n"
)
"""What a captive portal or a maintenance front end answers with status 200 (kind ``html_200``)."""

CRAFTED_NAMES: tuple[str, ...] = (
    "../../x",
    "a/b",
    "",
    ".",
    "..",
    "nul\0byte.fits",
    "line\nbreak.fits",
    "/etc/passwd",
    "..\\..\\win.fits",
    "../" * 20 + "escape.fits",
    "x" * 300 + ".fits",
    ".hidden.fits",
    "-rf",
    " leading-space.fits",
    "rtl\u202egnp.fits",
    "%2e%2e%2fenc.fits",
    "semi;colon.fits",
    "tab\tname.fits",
)
"""Hostile values the ``crafted_names`` kind writes into product names, dataURIs, obs_ids and S3 paths."""

NGINX_504_PAGE = (
    b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


class FaultError(ValueError):
    """A fault specification that cannot be honoured (unknown endpoint or kind, bad parameter)."""


@dataclass
class Fault:
    """One armed fault. ``remaining`` is None for "until cleared", else how many more requests it hits."""

    fault_id: int
    endpoint: str
    kind: str
    remaining: int | None
    match: str | None
    params: dict[str, object] = field(default_factory=dict)
    hits: int = 0

    def applies_to(self, endpoint: str, subject: str, kinds: Iterable[str]) -> bool:
        """True when this fault is armed for ``endpoint``, its ``match`` occurs in ``subject`` and its
        kind is one of ``kinds`` (the kinds meaningful for the request at hand)."""
        return (
            self.endpoint == endpoint
            and self.kind in kinds
            and (self.remaining is None or self.remaining > 0)
            and (not self.match or self.match in subject)
        )

    def to_json(self) -> dict[str, object]:
        """The fault as the admin endpoint lists it."""
        return {
            "id": self.fault_id,
            "endpoint": self.endpoint,
            "kind": self.kind,
            "count": self.remaining,
            "match": self.match,
            "params": dict(self.params),
            "hits": self.hits,
        }

    def number(self, name: str, default: float) -> float:
        """Numeric parameter ``name`` (``default`` when absent)."""
        value = self.params.get(name, default)
        return float(value)  # type: ignore[arg-type]


class FaultController:
    """The set of armed faults, switchable at run time.

    ``add`` arms a fault, ``clear`` disarms all (and releases every stalled request), ``take`` is what a
    server calls per request: it returns the faults that hit that request (every matching ``latency``
    fault plus at most one other fault, first armed first) and counts them down. A fault whose count
    reaches zero stays listed (with ``count`` 0) until cleared so tests can read its ``hits``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)
        self._released = threading.Condition(self._lock)
        self._generation = 0
        self._stopped = False
        self._executing: dict[str, int] = {}
        self._slow_queries: dict[str, tuple[float, str]] = {}

    def add(
        self,
        endpoint: str,
        kind: str,
        count: int | None = None,
        match: str | None = None,
        **params: object,
    ) -> Fault:
        """Arm a fault and return it.

        Raises FaultError for an unknown endpoint or kind, a negative count, or a kind the endpoint
        cannot suffer ("executing" is for "invoke" only).
        """
        if endpoint not in ENDPOINTS:
            raise FaultError(f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
        if kind not in KINDS:
            raise FaultError(f"unknown fault kind {kind!r}; known: {', '.join(KINDS)}")
        allowed = KIND_ENDPOINTS.get(kind)
        if allowed is not None and endpoint not in allowed:
            raise FaultError(f"fault kind {kind!r} applies to endpoint(s) {', '.join(sorted(allowed))} only")
        if kind == "mutate_rows" and params.get("mode", "mixed") not in MUTATE_MODES:
            raise FaultError(f"mutate_rows mode must be one of {', '.join(MUTATE_MODES)}")
        if kind == "crafted_names" and params.get("field", "productFilename") not in CRAFTED_FIELDS:
            raise FaultError(f"crafted_names field must be one of {', '.join(CRAFTED_FIELDS)}")
        if kind == "redirect" and params.get("to", "second") not in REDIRECT_TARGETS:
            raise FaultError(f"redirect target must be one of {', '.join(REDIRECT_TARGETS)}")
        if kind == "redirect" and not 1 <= int(params.get("hops", 1)) <= REDIRECT_HOPS_MAX:  # type: ignore[call-overload]
            raise FaultError(f"redirect hops must be 1..{REDIRECT_HOPS_MAX}")
        if kind == "drip" and not float(params.get("bytes_per_second", 1)) > 0:  # type: ignore[arg-type]
            raise FaultError("drip bytes_per_second must be > 0")
        if kind == "slow_query" and params.get("shape", "executing") not in SLOW_QUERY_SHAPES:
            raise FaultError(f"slow_query shape must be one of {', '.join(SLOW_QUERY_SHAPES)}")
        if kind == "page_shift" and params.get("mode", "insert") not in PAGE_SHIFT_MODES:
            raise FaultError(f"page_shift mode must be one of {', '.join(PAGE_SHIFT_MODES)}")
        if kind == "error_timeout" and not isinstance(params.get("msg", ""), str):
            raise FaultError("error_timeout msg must be a string")
        if count is not None and (not isinstance(count, int) or count < 0):
            raise FaultError(f"count must be a non-negative integer or None, not {count!r}")
        for name, value in params.items():
            if name in NUMERIC_PARAMS and not isinstance(
                value, (int, float)
            ):
                raise FaultError(f"fault parameter {name} must be a number, not {value!r}")
        with self._lock:
            fault = Fault(next(self._ids), endpoint, kind, count, match or None, dict(params))
            self._faults.append(fault)
        logger.info("twin fault armed: %s", fault.to_json())
        return fault

    def add_from_json(self, spec: Mapping[str, object]) -> Fault:
        """Arm a fault described by the admin endpoint's JSON object
        ``{"endpoint", "kind", "count"?, "match"?, <params>...}``; raises FaultError when malformed."""
        if not isinstance(spec, Mapping):
            raise FaultError("a fault is a JSON object")
        params = dict(spec)
        try:
            endpoint = params.pop("endpoint")
            kind = params.pop("kind")
        except KeyError as missing:
            raise FaultError(f"fault needs {missing.args[0]!r}") from None
        count = params.pop("count", None)
        match = params.pop("match", None)
        nested = params.pop("params", None)
        if isinstance(nested, Mapping):
            params.update(nested)
        if not isinstance(endpoint, str) or not isinstance(kind, str):
            raise FaultError("endpoint and kind are strings")
        if match is not None and not isinstance(match, str):
            raise FaultError("match is a string")
        return self.add(endpoint, kind, count=count, match=match, **params)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Disarm every fault, forget EXECUTING progress and release every stalled request."""
        with self._lock:
            self._faults.clear()
            self._executing.clear()
            self._slow_queries.clear()
            self._generation += 1
            self._released.notify_all()
        logger.info("twin faults cleared")

    def shutdown(self) -> None:
        """Release every stalled request for good (the servers are stopping)."""
        with self._lock:
            self._stopped = True
            self._released.notify_all()

    def list(self) -> list[dict[str, object]]:
        """Every armed fault as JSON (see :meth:`Fault.to_json`)."""
        with self._lock:
            return [fault.to_json() for fault in self._faults]

    def take(self, endpoint: str, subject: str, kinds: Iterable[str]) -> list[Fault]:
        """Faults hitting one request of ``endpoint`` about ``subject`` (uri, key, service name...).

        ``kinds`` are the kinds meaningful for this request (a Range fault does not hit a HEAD). Returns
        every matching latency fault followed by at most one other fault; each returned fault is counted
        down by one.
        """
        kinds = frozenset(kinds)
        hit: list[Fault] = []
        with self._lock:
            terminal_taken = False
            for fault in self._faults:
                if not fault.applies_to(endpoint, subject, kinds):
                    continue
                if fault.kind != "latency":
                    if terminal_taken:
                        continue
                    terminal_taken = True
                if fault.remaining is not None:
                    fault.remaining -= 1
                fault.hits += 1
                hit.append(fault)
        hit.sort(key=lambda fault: fault.kind != "latency")
        return hit

    def executing_polls_left(self, request_key: str) -> int | None:
        """For a request already answered EXECUTING: count one more poll and return how many EXECUTING
        replies are still owed before this poll (0 means answer COMPLETE now; the key is then forgotten).
        None when the request is not being held in EXECUTING."""
        with self._lock:
            left = self._executing.get(request_key)
            if left is None:
                return None
            if left <= 0:
                del self._executing[request_key]
                return 0
            self._executing[request_key] = left - 1
            return left

    def start_executing(self, request_key: str, polls: int) -> None:
        """Hold ``request_key`` in EXECUTING: the caller answers EXECUTING now, and the next ``polls - 1``
        identical requests get EXECUTING too before one gets COMPLETE."""
        with self._lock:
            self._executing[request_key] = max(0, polls - 1)

    def slow_query(self, query_key: str, service: str) -> tuple[str, float] | None:
        """For one invoke request of the query ``query_key`` (its body without ``page``): the shape
        ("executing" or "first_byte") and the seconds left before MAST has the answer, when a
        ``slow_query`` fault holds the query; None otherwise. The first request of a query takes (and
        counts down) a matching fault and starts its clock; every later request of it (polls, other pages)
        reads that clock, 0 seconds left once it has run out."""
        now = time.monotonic()
        with self._lock:
            started = self._slow_queries.get(query_key)
        if started is None:
            hit = self.take("invoke", service, {"slow_query"})
            if not hit:
                return None
            fault = hit[0]
            started = (now + fault.number("seconds", 90.0), str(fault.params.get("shape", "executing")))
            with self._lock:
                started = self._slow_queries.setdefault(query_key, started)
        ready_at, shape = started
        return shape, max(0.0, ready_at - now)

    def hold(self, seconds: float) -> None:
        """Block the calling server thread for ``seconds``, or less if :meth:`clear` or :meth:`shutdown`
        is called meanwhile."""
        deadline = time.monotonic() + seconds
        with self._lock:
            generation = self._generation
            while not self._stopped and self._generation == generation:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._released.wait(min(left, 0.2))

    def stall(self, poll_seconds: float = 0.2) -> None:
        """Block the calling server thread until :meth:`clear` or :meth:`shutdown` is called."""
        with self._lock:
            generation = self._generation
            while not self._stopped and self._generation == generation:
                self._released.wait(poll_seconds)


class TwinStats:
    """Per-endpoint request and body-byte counters.

    Keys are endpoint names ("invoke", "download", "s3", ...) and their refinements
    ("invoke:Mast.Caom.Products", "s3:GetObject"). ``snapshot`` returns exactly
    ``{"endpoints": {key: {"requests": n, "bytes_sent": b}}, "total_requests": N, "total_bytes_sent": B}``
    where the totals sum the plain endpoint keys only (no double counting of refinements).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._log: deque[dict[str, object]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._sequence = itertools.count(1)

    def count_request(self, keys: Iterable[str]) -> None:
        """Count one request against every key in ``keys`` (an endpoint and its refinement)."""
        with self._lock:
            for key in keys:
                self._requests[key] = self._requests.get(key, 0) + 1
                self._bytes.setdefault(key, 0)

    def count_bytes(self, keys: Iterable[str], sent: int) -> None:
        """Add ``sent`` body bytes written to the socket to every key in ``keys`` (negative ``sent`` takes
        back bytes counted for a write that then failed)."""
        if not sent:
            return
        with self._lock:
            for key in keys:
                self._bytes[key] = self._bytes.get(key, 0) + sent
                self._requests.setdefault(key, 0)

    def reset(self) -> None:
        """Zero every counter and empty the request log."""
        with self._lock:
            self._requests.clear()
            self._bytes.clear()
            self._log.clear()

    def log_request(self, entry: Mapping[str, object]) -> None:
        """Remember what one request asked for (``{"endpoint", ...}``, as decoded by the server), keeping
        the last :data:`REQUEST_LOG_SIZE`; each entry gets a increasing ``seq`` number."""
        with self._lock:
            self._log.append({"seq": next(self._sequence), **entry})

    def requests(self) -> list[dict[str, object]]:
        """The logged requests, oldest first (copies): what ``GET /__twin__/requests`` returns."""
        with self._lock:
            return copy.deepcopy(list(self._log))

    def snapshot(self) -> dict[str, object]:
        """The counters in the documented JSON shape (a fresh dict the caller may keep)."""
        with self._lock:
            endpoints = {
                key: {"requests": self._requests.get(key, 0), "bytes_sent": self._bytes.get(key, 0)}
                for key in sorted(set(self._requests) | set(self._bytes))
            }
        plain = [value for key, value in endpoints.items() if ":" not in key]
        return {
            "endpoints": endpoints,
            "total_requests": sum(value["requests"] for value in plain),
            "total_bytes_sent": sum(value["bytes_sent"] for value in plain),
        }


# ---- hostile answers ---------------------------------------------------------------------------------------
# Pure functions turning a correct JSON answer into the hostile one a fault asks for. They never modify
# their argument.


_ID_FIELDS = ("obsid", "obsID", "parent_obsid")


def _ids_as_objects(row: dict) -> None:
    row.update({name: {"$numberLong": str(row[name])} for name in _ID_FIELDS if name in row})


def _numbers_as_text(row: dict) -> None:
    row.update({name: str(row[name]) for name in ("size", "calib_level", "t_obs_release", "s_ra") if name in row})


def _nonsense_values(row: dict) -> None:
    row.update({name: value for name, value in (("size", "12 MB"), ("calib_level", "three"), ("s_dec", [1, 2]))
                if name in row})


def _absurd_numbers(row: dict) -> None:
    row.update({name: value for name, value in (("size", 2**70), ("t_obs_release", 1e308), ("s_ra", "NaN"))
                if name in row})


def _booleans(row: dict) -> None:
    row.update({name: True for name in ("size", "calib_level", "productFilename", "obs_id") if name in row})


def _drop(*names: str):
    def drop(row: dict) -> None:
        for name in names:
            row.pop(name, None)

    return drop


def _nulls_but_identity(row: dict) -> None:
    row.update({name: None for name in row if name not in ("obs_id", "obsid", "dataURI")})


_TYPE_MUTATIONS = (_ids_as_objects, _numbers_as_text, _nonsense_values, _absurd_numbers, _booleans)
_MISSING_MUTATIONS = (
    _drop("obs_id", "dataURI"),
    _drop("obsid", "size", "productFilename"),
    _drop("calib_level", "productType", "dataRights", "t_obs_release"),
    _nulls_but_identity,
)
_MUTATIONS = {"types": _TYPE_MUTATIONS, "missing": _MISSING_MUTATIONS,
              "mixed": _TYPE_MUTATIONS + _MISSING_MUTATIONS}


def _mutated_row(row: dict, index: int, mode: str) -> dict:
    """Row ``index`` of an answer made hostile: wrong types (ids as objects, sizes and levels as text,
    absurd sizes, booleans) and/or missing or null fields, cycling through the mutations of ``mode`` so
    every one occurs in any answer of a few rows."""
    row = dict(row)
    mutations = _MUTATIONS[mode]
    mutations[index % len(mutations)](row)
    return row


def mutate_rows(payload: dict, mode: str = "mixed") -> dict:
    """``payload`` (an invoke answer) with every data row mutated by :func:`_mutated_row`; the ``fields``
    list keeps declaring the original types (as a confused server would)."""
    hostile = dict(payload)
    data = payload.get("data")
    if isinstance(data, list):
        hostile["data"] = [_mutated_row(row, index, mode) if isinstance(row, dict) else row
                           for index, row in enumerate(data)]
    return hostile


def endless_paging(payload: dict, pages: int = ENDLESS_PAGES) -> dict:
    """``payload`` (one COMPLETE page) claiming ``pages`` pages of ``pageSize`` rows each."""
    hostile = dict(payload)
    paging = dict(payload.get("paging") or {})
    page_size = int(paging.get("pageSize") or max(1, len(payload.get("data") or ())))
    paging.update(pagesFiltered=pages, rowsFiltered=pages * page_size, rowsTotal=pages * page_size)
    hostile["paging"] = paging
    return hostile


def crafted_rows(payload: dict, field_name: str = "productFilename") -> dict:
    """``payload`` (an invoke answer) whose first rows carry :data:`CRAFTED_NAMES` in ``field_name``
    (productFilename, dataURI or obs_id; a dataURI keeps its ``mast:`` prefix on half of them)."""
    hostile = dict(payload)
    data = payload.get("data")
    if not isinstance(data, list):
        return hostile
    rows = []
    for index, row in enumerate(data):
        if isinstance(row, dict) and index < len(CRAFTED_NAMES) and field_name in row:
            row = dict(row)
            name = CRAFTED_NAMES[index]
            row[field_name] = f"mast:JWST/product/{name}" if field_name == "dataURI" and index % 2 else name
        rows.append(row)
    hostile["data"] = rows
    return hostile


def crafted_paths(answer: dict) -> dict:
    """A path_lookup answer whose found entries point at hostile S3 paths (``/../../x`` ...)."""
    hostile = {}
    for index, (uri, entry) in enumerate(answer.items()):
        if isinstance(entry, dict) and entry.get("path"):
            entry = dict(entry, path="/" + CRAFTED_NAMES[index % len(CRAFTED_NAMES)])
        hostile[uri] = entry
    return hostile


def drip(pieces: Iterable[bytes | memoryview], bytes_per_second: float) -> Iterator[bytes]:
    """``pieces`` re-cut into ``bytes`` slices sent at ``bytes_per_second`` (the ``drip`` fault): ten
    slices a second, so a client always sees bytes arrive well within any read timeout."""
    step = max(1, int(bytes_per_second / 10))
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), step):
            time.sleep(min(step, len(view) - start) / bytes_per_second)
            yield bytes(view[start:start + step])
