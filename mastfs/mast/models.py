"""Tolerant parsing of MAST answers into plain, typed records.

MAST rows are loose: id columns arrive as JSON numbers or strings, any value may be null, newer columns
(``calib_level``, ``dataRights``) are missing from older answers and unknown columns come and go. Every
record keeps *all* raw fields (ids normalised to ``str``) in ``fields`` so the tree can show them as
xattrs and sidecars, and exposes typed properties for the columns mastfs relies on. ``fields`` holds
only JSON values, so records round-trip through the metadata cache via ``from_row(record.fields)``.

Every parser raises :class:`~mastfs.errors.BadResponse` on an answer of the wrong shape and nothing else.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..errors import BadResponse

log = logging.getLogger(__name__)

#: Columns holding identifiers: declared ``string`` by MAST but serialised as numbers by older services.
ID_COLUMNS = frozenset({"obsid", "obsID", "parent_obsid", "objID", "objID1", "proposal_id"})

#: ``status`` values of ``/api/v0/invoke`` answers.
INVOKE_STATUSES = frozenset({"COMPLETE", "EXECUTING", "ERROR"})

_PUBLIC = "PUBLIC"
#: Largest file size taken from a row: integers are exact in a float (the JSON number) up to 2**53, and
#: no archive file comes near it (the largest MAST files are tens of GB).
MAX_SIZE = 2**53

# JWST file names (see MAST_API.md "JWST file names and levels").
_JWST_LEVEL3_NAME = re.compile(r"^jw\d{5}-[a-z]\d+_")
_JWST_EXPOSURE_NAME = re.compile(r"^jw\d{11}_\d{5}_\d{5}_")
_EXPOSURE_SUFFIX_LEVEL = {
    "uncal": 1,
    "rate": 2, "rateints": 2, "cal": 2, "calints": 2, "i2d": 2, "s2d": 2, "x1d": 2, "x1dints": 2,
    "crf": 3, "crfints": 3,
}
_LEVEL3_SUFFIXES = frozenset({"crf", "i2d", "s2d", "s3d", "x1d", "x1dints", "c1d", "segm", "cat"})
_DATA_EXTENSIONS = (".fits", ".ecsv")


def normalise_id(value: Any) -> str | None:
    """Return an identifier as text: ``2003738726`` and ``"2003738726"`` both give ``"2003738726"``;
    integral floats lose their ``.0``; null, blank and non-scalar values (objects, lists) give None."""
    if value is None or isinstance(value, (bool, Mapping, list)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    return text or None


def normalise_row(row: Any) -> dict[str, Any]:
    """Copy a raw row with its id columns normalised to str (or None). Raises BadResponse if not a dict."""
    if not isinstance(row, Mapping):
        raise BadResponse(f"expected a row object, got {type(row).__name__}")
    return {str(key): (normalise_id(value) if key in ID_COLUMNS else value) for key, value in row.items()}


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _float(fields: Mapping[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(fields: Mapping[str, Any], name: str) -> int | None:
    number = _float(fields, name)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _exclusive(data_rights: str | None) -> bool:
    # Older answers have no dataRights column: their data are public.
    return data_rights is not None and data_rights != _PUBLIC


R = TypeVar("R", bound="Row")


@dataclass(frozen=True)
class Row:
    """A MAST row: ``fields`` holds every raw column. Subclasses name the columns a row must have
    (``REQUIRED``) and the one that identifies it (``KEY``: rows are hashed by it)."""

    REQUIRED: ClassVar[tuple[str, ...]]
    KEY: ClassVar[str]

    fields: dict[str, Any]

    @classmethod
    def from_row(cls: type[R], row: Any) -> R:
        """Parse a raw row. Raises BadResponse if it is not an object or lacks a ``REQUIRED`` column."""
        fields = normalise_row(row)
        if any(_text(fields, name) is None for name in cls.REQUIRED):
            raise BadResponse(f"{cls.__name__.lower()} row without {'/'.join(cls.REQUIRED)}: {sorted(fields)[:8]}...")
        return cls(fields)

    def __hash__(self) -> int:
        return hash(self.fields[self.KEY])

    @property
    def proposal_id(self) -> str | None:
        return self.fields.get("proposal_id")

    @property
    def data_rights(self) -> str | None:
        """``PUBLIC``, ``EXCLUSIVE_ACCESS``, ... (upper-case), or None when the column is absent."""
        text = _text(self.fields, "dataRights")
        return text.upper() if text else None

    @property
    def is_exclusive(self) -> bool:
        return _exclusive(self.data_rights)


class Observation(Row):
    """One CAOM observation row. Build with :meth:`from_row`: it needs ``obs_id`` and ``obsid`` (the
    directory name and the key of its product list)."""

    REQUIRED = ("obs_id", "obsid")
    KEY = "obsid"

    @property
    def obs_id(self) -> str:
        return str(self.fields["obs_id"]).strip()

    @property
    def obsid(self) -> str:
        return str(self.fields["obsid"])

    @property
    def obs_collection(self) -> str | None:
        return _text(self.fields, "obs_collection")

    @property
    def instrument_name(self) -> str | None:
        return _text(self.fields, "instrument_name")

    @property
    def target_name(self) -> str | None:
        return _text(self.fields, "target_name")

    @property
    def filters(self) -> str | None:
        return _text(self.fields, "filters")

    @property
    def dataproduct_type(self) -> str | None:
        return _text(self.fields, "dataproduct_type")

    @property
    def t_min(self) -> float | None:
        """Start of the observation (MJD)."""
        return _float(self.fields, "t_min")

    @property
    def t_max(self) -> float | None:
        """End of the observation (MJD)."""
        return _float(self.fields, "t_max")

    @property
    def t_obs_release(self) -> float | None:
        """Public release date (MJD); in the future while the data are exclusive-access."""
        return _float(self.fields, "t_obs_release")

    @property
    def calib_level(self) -> int | None:
        return _int(self.fields, "calib_level")

    @property
    def s_ra(self) -> float | None:
        return _float(self.fields, "s_ra")

    @property
    def s_dec(self) -> float | None:
        return _float(self.fields, "s_dec")



class Product(Row):
    """One ``Mast.Caom.Products`` row. Build with :meth:`from_row`: it needs ``dataURI``."""

    REQUIRED = ("dataURI",)
    KEY = "dataURI"

    @property
    def data_uri(self) -> str:
        return str(self.fields["dataURI"]).strip()

    @property
    def filename(self) -> str:
        """``productFilename``, or the last part of ``dataURI`` when that is null."""
        return _text(self.fields, "productFilename") or self.data_uri.rsplit("/", 1)[-1]

    @property
    def size(self) -> int | None:
        """Size in bytes, or None when MAST does not say (null, negative, past :data:`MAX_SIZE` or
        nonsense)."""
        size = _int(self.fields, "size")
        return size if size is not None and 0 <= size <= MAX_SIZE else None

    @property
    def product_type(self) -> str:
        """``SCIENCE``, ``AUXILIARY``, ``INFO``, ``PREVIEW``, ... upper-case; ``UNKNOWN`` when null."""
        text = _text(self.fields, "productType")
        return text.upper() if text else "UNKNOWN"

    @property
    def subgroup(self) -> str | None:
        """``productSubGroupDescription`` (UNCAL, CAL, I2D, ...)."""
        return _text(self.fields, "productSubGroupDescription")

    @property
    def calib_level(self) -> int | None:
        """The row's ``calib_level`` as given (None when null or absent)."""
        return _int(self.fields, "calib_level")

    @property
    def level(self) -> int | None:
        """``calib_level``, or when null the level implied by a JWST file name suffix; None if unknown."""
        level = self.calib_level
        return level if level is not None else level_from_filename(self.filename)

    @property
    def obsid(self) -> str | None:
        """The ``obsID`` of the observation this row was listed under."""
        return self.fields.get("obsID")

    @property
    def parent_obsid(self) -> str | None:
        return self.fields.get("parent_obsid")

    @property
    def obs_id(self) -> str | None:
        return _text(self.fields, "obs_id")


def level_from_filename(filename: str) -> int | None:
    """Calibration level implied by a JWST product file name, None for anything else.

    ``jw02733002001_02103_00001_mirimage_uncal.fits`` -> 1, ``..._cal.fits`` -> 2,
    ``jw02733-o002_t001_miri_f1130w_i2d.fits`` -> 3; previews, association and pool files -> None.
    """
    name = filename.lower()
    extension = next((ext for ext in _DATA_EXTENSIONS if name.endswith(ext)), None)
    if extension is None:
        return None
    suffix = name[: -len(extension)].rsplit("_", 1)[-1]
    if _JWST_LEVEL3_NAME.match(name):
        return 3 if suffix in _LEVEL3_SUFFIXES else None
    if _JWST_EXPOSURE_NAME.match(name):
        return _EXPOSURE_SUFFIX_LEVEL.get(suffix)
    return None


@dataclass(frozen=True)
class Paging:
    """The ``paging`` object of an invoke answer (a single page when the answer has none)."""

    page: int = 1
    page_size: int | None = None
    pages_filtered: int = 1
    rows_filtered: int | None = None


def _paging(raw: Any) -> Paging:
    if raw is None:
        return Paging()
    if not isinstance(raw, Mapping):
        raise BadResponse(f"paging is a {type(raw).__name__}, not an object")
    page = _int(raw, "page")
    pages = _int(raw, "pagesFiltered")
    if page is None or pages is None or page < 1 or pages < 0:
        raise BadResponse(f"paging without sane page/pagesFiltered: {dict(raw)}")
    return Paging(page=page, page_size=_int(raw, "pageSize"), pages_filtered=pages,
                  rows_filtered=_int(raw, "rowsFiltered"))


def parse_invoke_response(payload: Any) -> tuple[list[dict[str, Any]], Paging, str, str]:
    """Split an ``/api/v0/invoke`` answer into ``(rows, paging, status, msg)``.

    rows are the raw ``data`` objects (empty while EXECUTING or on ERROR); status is one of
    :data:`INVOKE_STATUSES`. Raises BadResponse when the payload is not an invoke answer (no known
    status, a COMPLETE answer without a ``data`` list, rows that are not objects, broken paging).
    """
    if not isinstance(payload, Mapping):
        raise BadResponse(f"invoke answer is a {type(payload).__name__}, not an object")
    status = payload.get("status")
    if status not in INVOKE_STATUSES:
        raise BadResponse(f"invoke answer with status {status!r}")
    msg = payload.get("msg") or ""
    if not isinstance(msg, str):
        msg = str(msg)
    data = payload.get("data")
    if status != "COMPLETE":
        return [], _paging(None), status, msg
    if not isinstance(data, list):
        raise BadResponse(f"COMPLETE invoke answer whose data is {type(data).__name__}, not a list")
    if not all(isinstance(row, Mapping) for row in data):
        raise BadResponse("invoke answer with rows that are not objects")
    return list(data), _paging(payload.get("paging")), status, msg


def parse_rows(rows: Iterable[Any], record: type[Observation] | type[Product]) -> list[Any]:
    """Parse rows into records of type ``record``, dropping (and logging) rows without an identity.

    One malformed row must not hide a whole listing; an answer that is not a list of rows raises
    BadResponse before it gets here (see :func:`parse_invoke_response`).
    """
    records = []
    dropped = 0
    for row in rows:
        try:
            records.append(record.from_row(row))
        except BadResponse:
            dropped += 1
    if dropped:
        log.warning("dropped %d %s row(s) without an identity", dropped, record.__name__)
    return records


def parse_count(rows: list[dict[str, Any]]) -> int:
    """The count of a ``COUNT_BIG(*)`` query: one row ``{"Column1": N}``. Raises BadResponse otherwise."""
    if len(rows) != 1:
        raise BadResponse(f"count answer with {len(rows)} rows")
    count = _int(rows[0], "Column1")
    if count is None or count < 0:
        raise BadResponse(f"count answer without a count: {rows[0]}")
    return count


def parse_resolver_response(payload: Any) -> tuple[float, float] | None:
    """``(ra, dec)`` of the first ``resolvedCoordinate`` of a SANTA answer, None if nothing resolved.

    Raises BadResponse when the payload is not a SANTA answer.
    """
    if not isinstance(payload, Mapping) or not ({"resolvedCoordinate", "status"} & payload.keys()):
        raise BadResponse("resolver answer is not a SANTA object")
    entries = payload.get("resolvedCoordinate") or []
    if not isinstance(entries, list):
        raise BadResponse(f"resolvedCoordinate is a {type(entries).__name__}, not a list")
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise BadResponse("resolvedCoordinate entry is not an object")
        ra, dec = _float(entry, "ra"), _float(entry, "decl")
        if ra is not None and dec is not None:
            return ra, dec
    return None


def s3_key_from_path(path: str) -> str:
    """The bucket key of a path_lookup ``path``, mapped the way astroquery's ``mast_relative_path`` does."""
    if "galex" in path:
        return path.removeprefix("/mast/").lstrip("/")
    if "/ps1/" in path:
        return path.replace("/ps1/", "panstarrs/ps1/public/").lstrip("/")
    if "hlsp" in path:
        return path.replace("/hlsp_local/public/", "mast/").lstrip("/")
    return path.lstrip("/")


def parse_path_lookup(payload: Any, uris: Iterable[str]) -> dict[str, str | None]:
    """Map each of ``uris`` to its S3 key from a path_lookup answer, None where not in the cloud.

    A uri the answer leaves out counts as not in the cloud (the HTTPS download still works).
    Raises BadResponse when the payload is not a path_lookup object.
    """
    if not isinstance(payload, Mapping):
        raise BadResponse(f"path_lookup answer is a {type(payload).__name__}, not an object")
    keys: dict[str, str | None] = {}
    for uri in uris:
        entry = payload.get(uri)
        if entry is None:
            log.debug("path_lookup answer omits %s", uri)
            keys[uri] = None
            continue
        if not isinstance(entry, Mapping):
            raise BadResponse(f"path_lookup entry for {uri} is not an object")
        path = entry.get("path")
        found = _int(entry, "status_code") == 200 and isinstance(path, str) and path.strip("/")
        keys[uri] = s3_key_from_path(str(path)) if found else None
    return keys


@dataclass(frozen=True)
class Identity:
    """Who MAST thinks we are (``GET /whoami``)."""

    anonymous: bool
    ezid: str
    display_name: str | None = None
    scopes: tuple[str, ...] = ()

    @classmethod
    def from_payload(cls, payload: Any) -> Identity:
        """Parse a /whoami answer. Raises BadResponse on anything but an object with ``anon``."""
        if not isinstance(payload, Mapping) or "anon" not in payload:
            raise BadResponse("whoami answer without 'anon'")
        attrib, listed = payload.get("attrib"), payload.get("scopes")
        attributes: Mapping[str, Any] = attrib if isinstance(attrib, Mapping) else {}
        scopes: list[Any] = listed if isinstance(listed, list) else []
        return cls(
            anonymous=bool(payload["anon"]),
            ezid=str(payload.get("ezid") or "anonymous"),
            display_name=_text(attributes, "display_name"),
            scopes=tuple(str(scope) for scope in scopes),
        )
