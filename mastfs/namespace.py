"""The namespace grammar of mastfs: pure functions that validate names and lay products out.

Nothing here performs I/O. Every function that rejects a name raises :class:`~mastfs.errors.InvalidName`
(ENOENT) or :class:`~mastfs.errors.NameTooLong` (ENAMETOOLONG), so a name that cannot be valid never
costs a request. The grammar is documented in ``docs/namespace.md``, whose text is :data:`README_TEXT`
(served as the virtual ``/README.txt``); a test keeps the two identical.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import math
import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from .errors import InvalidName, NameTooLong
from .sequences import PackedSequence

NAME_MAX = 255
"""Longest name (in UTF-8 bytes) of one path component, as on local filesystems."""

TOP_DIRECTORIES = ("program", "obs", "target", "cone")
README_NAME = "README.txt"
OBSERVATION_SIDECAR = "observation.json"
PRODUCTS_SIDECAR = "products.csv"
SIDECARS = (OBSERVATION_SIDECAR, PRODUCTS_SIDECAR)
PLANNED_SIDECAR = "planned.csv"
"""In a program, target or cone directory holding planned observations: those left out of it."""

DEFAULT_CONE_RADIUS = 0.2
"""Radius in degrees of ``/cone/<ra>,<dec>/`` (astroquery's default for region queries)."""
MAX_CONE_RADIUS = 1.0
"""Largest accepted cone radius in degrees; wider cones return unbrowsably many observations."""

OTHER_GROUP = "other"
RECOMMENDED_DIR = "recommended"
"""The view, in each observation directory, of its "Minimum Recommended Products" (MAST's default set)."""
MINIMUM_RECOMMENDED = "Minimum Recommended Products"
_TYPE_GROUPS = {
    "AUXILIARY": "auxiliary",
    "CALIBRATION": "calibration",
    "INFO": "info",
    "PREVIEW": "preview",
    "THUMBNAIL": "thumbnail",
}

# Names desktop environments, shells and version-control tools probe for in every directory. None of
# them can be a mastfs name; they are answered ENOENT before anything else happens.
_PROBE_NAMES = frozenset(
    name.lower()
    for name in (
        "autorun.inf", "desktop.ini", "Thumbs.db", "ehthumbs.db", "folder.jpg", "folder.gif",
        "AlbumArtSmall.jpg", "lost+found",
    )
)
_FORBIDDEN_CHARS = frozenset("/\\%*;?\"'`<>|&$=!{}#^")
# Control characters, DEL, undecodable bytes (surrogate escapes) and the forbidden characters: one search
# per name (a listing checks 300,000 names).
_BAD_CHARACTER = re.compile("[\x00-\x1f\x7f\udc80-\udcff" + re.escape("".join(sorted(_FORBIDDEN_CHARS))) + "]")
_PROGRAM_ID = re.compile(r"[1-9][0-9]{0,6}")
_OBS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9 +._()\[\]:,-]{0,99}")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_CONE = re.compile(rf"({_NUMBER}),({_NUMBER})(?:,({_NUMBER}))?")


class ObservationLike(Protocol):
    """What the namespace needs of an observation (``mastfs.mast.models.Observation``)."""

    @property
    def fields(self) -> Mapping[str, Any]: ...
    @property
    def obs_id(self) -> str: ...


class ProductLike(Protocol):
    """What the namespace needs of a product (``mastfs.mast.models.Product``)."""

    @property
    def fields(self) -> Mapping[str, Any]: ...
    @property
    def data_uri(self) -> str: ...
    @property
    def filename(self) -> str: ...
    @property
    def product_type(self) -> str | None: ...
    @property
    def level(self) -> int | None:
        """``calib_level``, or the level the file name implies, or None."""


@dataclass(frozen=True)
class Cone:
    """A cone search: centre in degrees (ICRS) and radius in degrees."""

    ra: float
    dec: float
    radius: float


# --------------------------------------------------------------------------------------------- names


def check_component(name: str) -> None:
    """Reject a path component no mastfs directory can hold, before any I/O.

    Raises NameTooLong when longer than :data:`NAME_MAX` bytes; InvalidName for hidden names (every
    file-manager probe such as ``.Trash-1000``, ``.xdg-volume-info``, ``.git``, ``.DS_Store`` starts with
    a dot), other well-known probes (``autorun.inf``, ``desktop.ini``, ``Thumbs.db`` ...), control
    characters, and characters that never occur in MAST ids (``% * ; ' " \\`` and friends).
    """
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    if not name or name.startswith("."):
        raise InvalidName(f"hidden or empty name {name!r}")
    if name.lower() in _PROBE_NAMES:
        raise InvalidName(f"file-manager probe {name!r}")
    bad = _BAD_CHARACTER.search(name)
    if bad is not None:
        char = bad.group()
        if 0xDC80 <= ord(char) <= 0xDCFF:
            raise InvalidName("name is not valid UTF-8")
        raise InvalidName(f"character {char!r} cannot occur in a mastfs name")


def parse_program_id(name: str) -> str:
    """Return the proposal id written as MAST writes it (decimal, no leading zeros).

    ``02733`` is rejected rather than aliased to ``2733``: two names for one directory would confuse
    the kernel's directory cache. Raises InvalidName (NameTooLong) without any I/O.
    """
    check_component(name)
    if not _PROGRAM_ID.fullmatch(name):
        raise InvalidName(f"program ids are decimal numbers without leading zeros, not {name!r}")
    return name


def parse_obs_id(name: str) -> str:
    """Return ``name`` if it can be a MAST ``obs_id`` (letters, digits, ``. _ + -``; at most 128)."""
    check_component(name)
    if not _OBS_ID.fullmatch(name) or ".." in name:
        raise InvalidName(f"not an observation id: {name!r}")
    return name


def parse_target_name(name: str) -> str:
    """Return ``name`` if it can be an object name for the resolver (e.g. ``NGC 3132``, ``M101``).

    Letters, digits, spaces and ``+ - . _ ( ) [ ] : ,`` only, at most 100 characters; no ``--``.
    """
    check_component(name)
    if not _TARGET.fullmatch(name) or "--" in name or ".." in name or name != name.strip():
        raise InvalidName(f"not a target name: {name!r}")
    return name


def parse_cone(name: str) -> Cone:
    """Parse ``<ra>,<dec>[,<radius_deg>]`` in decimal degrees.

    0 <= ra < 360, -90 <= dec <= 90, 0 < radius <= :data:`MAX_CONE_RADIUS` (default
    :data:`DEFAULT_CONE_RADIUS`). Raises InvalidName on anything else, without any I/O.
    """
    check_component(name)
    match = _CONE.fullmatch(name)
    if not match:
        raise InvalidName(f"cone names are <ra>,<dec>[,<radius_deg>] in decimal degrees, not {name!r}")
    ra, dec = float(match.group(1)), float(match.group(2))
    radius = float(match.group(3)) if match.group(3) is not None else DEFAULT_CONE_RADIUS
    if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0 and 0.0 < radius <= MAX_CONE_RADIUS):
        raise InvalidName(
            f"cone {name!r} out of range (0 <= ra < 360, -90 <= dec <= 90, 0 < radius <= {MAX_CONE_RADIUS:g})"
        )
    return Cone(ra, dec, radius)


# ------------------------------------------------------------------------------------- product layout

_INFO_SUFFIXES = frozenset({"asn", "pool"})
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")


def _type_from_filename(product: ProductLike) -> str:
    """Guess the productType of a row whose productType is null, from its file name."""
    lowered = product.filename.lower()
    stem = lowered.split(".", 1)[0]
    if "_thumb." in lowered:
        return "THUMBNAIL"
    if lowered.endswith(_IMAGE_EXTENSIONS):
        return "PREVIEW"
    if "_" in stem and stem.rsplit("_", 1)[1] in _INFO_SUFFIXES:
        return "INFO"
    if product.level is not None:
        return "SCIENCE"
    return ""


def product_group(product: ProductLike) -> str:
    """Name of the directory of an observation that holds ``product``.

    SCIENCE products go to ``level<N>`` by their ``level`` (``calib_level``, or when that is null the
    level their JWST file name implies; ``other`` when it implies none). Other product types go to ``auxiliary``,
    ``calibration``, ``info``, ``preview`` or ``thumbnail``; a null ``productType`` is guessed from the
    file name; anything else lands in ``other``.
    """
    product_type = (product.product_type or "").strip().upper()
    if product_type in ("", "UNKNOWN"):
        product_type = _type_from_filename(product)
    if product_type == "SCIENCE":
        level = product.level
        return f"level{level}" if level is not None and 0 <= level <= 9 else OTHER_GROUP
    return _TYPE_GROUPS.get(product_type, OTHER_GROUP)


def _group_order(group: str) -> tuple[int, str]:
    return (0 if group.startswith("level") else 2 if group == OTHER_GROUP else 1, group)


def safe_filename(product: ProductLike) -> str | None:
    """The file name ``product`` is shown under: ``productFilename``, else the last part of its
    ``dataURI``; None when neither gives a usable name (then the product is listed only in products.csv).
    """
    for candidate in (product.filename, (product.data_uri or "").rsplit("/", 1)[-1]):
        if not candidate:
            continue
        candidate = candidate.strip()
        try:
            check_component(candidate)
        except InvalidName:
            continue
        return candidate
    return None


class NameList(PackedSequence[str]):
    """The sorted file names of one group directory, packed in one string (a directory may hold 300,000:
    one str object each would cost 100 bytes and fragment the heap), with the index of each name's
    product (``indices[slot]``). Names never contain a newline (:func:`check_component`)."""

    __slots__ = ("_text", "_starts", "indices")

    def __init__(self, names: Sequence[str], indices: Iterable[int]) -> None:
        self._text = "\n".join(names) + "\n"
        starts = array("q", [0])
        for name in names:
            starts.append(starts[-1] + len(name) + 1)
        self._starts = starts
        self.indices = array("q", indices)

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, slot: int) -> str:
        return self._text[self._starts[slot]:self._starts[slot + 1] - 1]

    def find(self, name: str) -> int | None:
        """The slot of ``name``, None when this directory has no such file."""
        slot = bisect.bisect_left(self, name)
        return slot if slot < len(self) and self[slot] == name else None


@dataclass(frozen=True)
class Placement:
    """Where each of a sequence of products (unique by dataURI) is shown, by its index in the sequence.

    groups: group directory name -> its NameList (file names sorted, with their product indices), groups
    in display order (levels, then product types, then ``other``); two different products with one file
    name get ``~2``, ``~3`` ... appended to the later names. ``group_of[i]`` is 1 + the position in
    ``group_names`` of product ``i``'s group (0: not shown as a file) and ``slot_of[i]`` its slot there.
    ``recommended``: file name in ``recommended/`` -> index, for the products MAST marks "Minimum
    Recommended Products" (sorted by name, made unique like the others).
    """

    groups: dict[str, NameList]
    group_of: bytearray
    slot_of: array[int]
    group_names: tuple[str, ...]
    recommended: dict[str, int]

    def path(self, index: int) -> str:
        """Path of product ``index`` relative to the observation directory, "" when not shown."""
        group = self.group_of[index]
        if not group:
            return ""
        name = self.group_names[group - 1]
        return f"{name}/{self.groups[name][self.slot_of[index]]}"


PLACEMENT_FIELDS = ("dataURI", "productFilename", "productType", "calib_level", "productGroupDescription")
"""The product fields :func:`place_products` reads (name, group, level, whether recommended)."""


def place_products(products: Iterable[ProductLike]) -> Placement:
    """Arrange ``products`` (unique by dataURI) into group directories; see :class:`Placement`."""
    by_group: dict[str, dict[str, int]] = {}
    recommended: dict[str, int] = {}
    count = 0
    for index, product in enumerate(products):
        count = index + 1
        name = safe_filename(product)
        if name is None:
            continue
        files = by_group.setdefault(product_group(product), {})
        files[_unique_name(name, files)] = index
        if is_recommended(product):
            recommended[_unique_name(name, recommended)] = index
    order = sorted(by_group, key=_group_order)
    group_of = bytearray(count)
    slot_of = array("q", bytes(8 * count))
    groups: dict[str, NameList] = {}
    for position, group in enumerate(order, start=1):
        # No (name, index) pair per file: a 290,000-file group would cost some 20 MB more at its peak.
        files = by_group.pop(group)
        names = sorted(files)
        indices = array("q", map(files.__getitem__, names))
        del files
        groups[group] = NameList(names, indices)
        del names
        for slot, index in enumerate(indices):
            group_of[index] = position
            slot_of[index] = slot
    return Placement(groups, group_of, slot_of, tuple(order), dict(sorted(recommended.items())))


def _unique_name(name: str, taken: Mapping[str, int]) -> str:
    """``name``, or ``name~2``, ``name~3`` ...: the first not in ``taken``."""
    unique, counter = name, 1
    while unique in taken:
        counter += 1
        unique = f"{name}~{counter}"
    return unique


def is_recommended(product: ProductLike) -> bool:
    """Whether MAST counts ``product`` among the "Minimum Recommended Products" (its
    ``productGroupDescription``; astroquery's ``mrp_only``, the Portal's default download basket)."""
    text = str(product.fields.get("productGroupDescription") or "")
    return text.strip().lower() == MINIMUM_RECOMMENDED.lower()


PRODUCT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("uncal", "rate", "rateints", "cal", "calints", "i2d", "s2d", "crf", "segm",
              "raw", "flt", "flc", "drz", "drc"),
    "table": ("asn", "x1d", "x1dints", "cat", "pool", "jit", "whtlt"),
    "spectrum": ("c1d", "spec"),
    "cube": ("s3d",),
}
"""File-name suffix (after the last ``_``, before the extension) -> what the file holds, for
``user.mastfs.kind``; JPEG/PNG/GIF files are ``preview``, anything else ``other`` (docs/namespace.md)."""
_KIND_OF_SUFFIX = {suffix: kind for kind, suffixes in PRODUCT_KINDS.items() for suffix in suffixes}


def product_kind(product: ProductLike) -> str:
    """``image``, ``table``, ``spectrum``, ``cube``, ``preview`` or ``other``: what a viewer would open
    ``product`` as, from its file name (see :data:`PRODUCT_KINDS`)."""
    return kind_of_filename(product.filename)


def kind_of_filename(filename: str) -> str:
    """:func:`product_kind` of a file name (a ``~2`` suffix of a shown name is ignored)."""
    name = filename.lower()
    if name.split("~", 1)[0].endswith(_IMAGE_EXTENSIONS):
        return "preview"
    stem = name.split(".", 1)[0]
    return _KIND_OF_SUFFIX.get(stem.rsplit("_", 1)[-1], "other") if "_" in stem else "other"


def observation_date(observation: ObservationLike) -> str | None:
    """ISO 8601 UTC date-time of the observation (``2022-06-03T12:01:26Z``): ``t_min``, else ``t_max``,
    else ``t_obs_release``; None when all three are null."""
    for column in ("t_min", "t_max", "t_obs_release"):
        unix = mjd_to_unix(observation.fields.get(column))
        if unix is not None:
            return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


@dataclass(frozen=True)
class Layout:
    """An observation's products arranged into directories (:func:`place_products` with the products
    themselves in place of their indices).

    groups: group directory name -> {file name -> product}; paths: dataURI -> path relative to the
    observation directory (``level2/x_cal.fits``). Products are deduplicated by dataURI first.
    """

    groups: dict[str, dict[str, Any]]
    paths: dict[str, str]


def layout_products(products: Iterable[ProductLike]) -> Layout:
    """Arrange ``products`` into group directories; see :class:`Layout`."""
    first: dict[str, ProductLike] = {}
    for product in products:
        if product.data_uri and product.data_uri not in first:
            first[product.data_uri] = product
    unique = list(first.values())
    placement = place_products(unique)
    groups = {group: {name: unique[index] for name, index in zip(names, names.indices, strict=True)}
              for group, names in placement.groups.items()}
    paths = {product.data_uri: placement.path(index) for index, product in enumerate(unique)
             if placement.group_of[index]}
    return Layout(groups, paths)


# ------------------------------------------------------------------------------------- values, sidecars


def text_value(value: Any) -> str | None:
    """A field value as text for xattrs: None stays None (omitted), booleans as true/false, floats
    without trailing noise (``repr``), everything else ``str``; NaN counts as null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return None if math.isnan(value) else repr(value)
    return str(value)


_XATTR_FIELD = re.compile(r"[A-Za-z0-9_]{1,200}")
OWN_XATTR_PREFIX = "user.mastfs."


def field_xattrs(fields: Mapping[str, Any]) -> dict[str, bytes]:
    """``user.mast_<field>`` -> UTF-8 text for every non-null field whose name is a plain identifier."""
    return {"user." + name: text_value(value).encode("utf-8", "replace")  # type: ignore[union-attr]
            for name, value in mast_fields(fields).items()}


def mast_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``mast_<field>`` -> value (as MAST sent it) for every non-null field whose name is a plain
    identifier: the fields the xattrs show, for callers that keep Python values."""
    return {"mast_" + key: value for key, value in fields.items()
            if text_value(value) is not None and _XATTR_FIELD.fullmatch(key)}


def observation_json(observation: ObservationLike) -> bytes:
    """Content of ``observation.json``: every field of the observation row, nulls included."""
    return (json.dumps(dict(observation.fields), indent=2, default=str, allow_nan=False) + "\n").encode()


def csv_lines(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """CSV text (UTF-8, ``\n`` line ends) of ``rows`` of field values (nulls as empty cells, values as
    :func:`text_value` writes them), headed by ``header`` unless it is empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(header)
    for row in rows:
        writer.writerow([text_value(value) or "" for value in row])
    return buffer.getvalue().encode("utf-8")


def products_csv_header(columns: Sequence[str]) -> bytes:
    """The first line of ``products.csv``: every column of the product rows, then ``mastfs_path``,
    ``mastfs_kind`` and ``mastfs_observation_date``."""
    return csv_lines([*columns, "mastfs_path", "mastfs_kind", "mastfs_observation_date"], [])


def products_csv_rows(columns: Sequence[Sequence[Any]], paths: Sequence[str], date: str | None = None) -> bytes:
    """Lines of ``products.csv`` (no header) from column-wise values (``columns[c][row]``, every column
    of the header in order), each row ended by its path relative to the observation directory
    (``paths[row]``; empty for products not shown), the kind of that file (:func:`kind_of_filename`)
    and ``date``, the observation's (:func:`observation_date`)."""
    cells = [_text_column(values) for values in columns]
    kinds = [kind_of_filename(path.rsplit("/", 1)[-1]) if path else "" for path in paths]
    dates = [date or ""] * len(paths)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(zip(*cells, paths, kinds, dates, strict=True))
    return buffer.getvalue().encode("utf-8")


def _text_column(values: Sequence[Any]) -> list[str]:
    """A column's values as CSV cells (:func:`text_value`, nulls empty); plain text passes as it is."""
    return [value if type(value) is str else (text_value(value) or "") for value in values]


def products_csv(products: Sequence[ProductLike], paths: Mapping[str, str], date: str | None = None) -> bytes:
    """Content of ``products.csv``: one row per product row, every field (union of all rows' columns
    in first-seen order), then ``mastfs_path`` (the file's path relative to the observation directory,
    empty for products not shown as files), ``mastfs_kind`` and ``mastfs_observation_date`` (``date``).
    Nulls are empty cells."""
    columns: dict[str, None] = {}
    for product in products:
        columns.update(dict.fromkeys(product.fields))
    values = [[product.fields.get(column) for product in products] for column in columns]
    return products_csv_header(list(columns)) + products_csv_rows(
        values, [paths.get(product.data_uri, "") for product in products], date)


def planned_csv(observations: Sequence[ObservationLike]) -> bytes:
    """Content of ``planned.csv``: one row per planned observation left out of a listing, every field
    of its row (union of the rows' columns in first-seen order)."""
    columns: dict[str, None] = {}
    for observation in observations:
        columns.update(dict.fromkeys(observation.fields))
    return csv_lines(list(columns), ([observation.fields.get(column) for column in columns]
                                     for observation in observations))


def is_planned(observation: ObservationLike, now_mjd: float) -> bool:
    """Whether an observation row describes an observation not yet executed: ``calib_level`` -1 (how
    CAOM marks planned observations), or no time of observation at all and a release date in the
    future."""
    level = observation.fields.get("calib_level")
    if level is not None and not isinstance(level, bool):
        try:
            if float(level) == -1:
                return True
        except (TypeError, ValueError):
            pass
    fields = observation.fields
    release = fields.get("t_obs_release")
    return (fields.get("t_min") is None and fields.get("t_max") is None
            and isinstance(release, (int, float)) and not isinstance(release, bool) and release > now_mjd)


MJD_UNIX_EPOCH = 40587.0


UNIX_TIME_LIMIT = 2.0**33
"""Unix times beyond +-2**33 s (year 2242) are nonsense from the archive; treated as unknown."""


def mjd_to_unix(mjd: float | None) -> float | None:
    """Unix seconds for a Modified Julian Date (``(mjd - 40587) * 86400``); None for null or nonsense."""
    if mjd is None:
        return None
    try:
        value = float(mjd)
    except (TypeError, ValueError):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    unix = (value - MJD_UNIX_EPOCH) * 86400.0
    return unix if -UNIX_TIME_LIMIT < unix < UNIX_TIME_LIMIT else None


README_TEXT = """\
# The mastfs namespace

mastfs shows the MAST archive as a read-only tree. Directories are filled lazily: nothing is asked of
MAST until you look inside, and what was seen is cached on disk (see "Caching" below).

## The tree

    /README.txt                       this text
    /program/                         programs looked up so far (any program can be looked up)
    /program/<id>/                    one directory per observation of program <id>
    /program/<id>/<obs_id>/           an observation directory (below)
    /obs/<obs_id>/                    the same observation directory, reached directly by its obs_id
    /target/<name>/                   observations around the position the name resolves to
    /cone/<ra>,<dec>[,<radius_deg>]/  observations in that cone
    .../planned.csv                   in a program, target or cone directory holding planned
                                      observations: the ones left out of it (below)

- `<id>` is a proposal id as MAST writes it: decimal digits without leading zeros (`2733`, not
  `02733`). Only observations of the configured collections (`--collection`, JWST by default) appear.
- `ls /program` lists the programs this mount (and the metadata cache) has seen so far: the archive
  holds tens of thousands, so they are looked up by name (`ls /program/2733`) rather than listed.
  `/obs`, `/target` and `/cone` likewise list only what was looked up during this mount.
- `<obs_id>` is MAST's `obs_id`, e.g. `jw02733-o002_t001_miri_f1130w`.
- `<name>` is resolved by MAST's name resolver (e.g. `NGC 3132`, `M101`); the directory holds the
  observations within 0.2 degrees of that position. MAST's own `target_name` spellings, with hyphens
  for blanks (`NGC-3132`, as `user.mast_target_name` shows), work too: a name the resolver does not
  know as written is tried once more with its hyphens as blanks. A name that does not resolve does not exist
  (ENOENT, one log line).
- `<ra>,<dec>[,<radius_deg>]` is in decimal degrees, 0 <= ra < 360, -90 <= dec <= 90,
  0 < radius <= 1 (default 0.2), e.g. `/cone/151.755,-40.437,0.05`.

Planned observations (not executed yet: CAOM's `calib_level` -1, or no observation time at all and a
release date in the future) have no products, so they are not shown as empty directories. A program,
target or cone directory holding some lists them instead in `planned.csv` (one row each, every field
of its row), so nothing is left out silently; `/obs/<planned obs_id>` does not exist (ENOENT, one log
line).

Names that cannot be valid (a non-numeric program id, a malformed cone, hidden names such as `.git`
or `.Trash-1000`, `autorun.inf`, `desktop.ini`, names with control characters or `% * ; ' "`) do not
exist, and never cost a request to MAST.

## An observation directory

    level1/ level2/ level3/    SCIENCE products by calibration level (only the non-empty ones)
    auxiliary/ calibration/ info/ preview/ thumbnail/
                               products of the other productType values (only the non-empty ones)
    other/                     products whose type or level is unknown
    recommended/               MAST's "Minimum Recommended Products" of the observation (when it has any)
    observation.json           every field of the observation row
    products.csv               one row per product, every field, plus mastfs_path (its path here),
                               mastfs_kind and mastfs_observation_date (as the xattrs below)

- A SCIENCE product goes to `level<N>` by its `calib_level` (0 raw ... 4 contributed). When MAST
  gives no level, a JWST file name decides (`uncal` 1; `rate`, `rateints`, `cal`, `calints` 2;
  level-3 names `jw<ppppp>-o<ooo>_..._i2d.fits` and the like 3); otherwise it goes to `other/`.
- A product without a `productType` is placed by its file name too (`_thumb.jpg` thumbnail,
  other images preview, `_asn.json` and `_pool.csv` info).
- A JWST level-3 observation lists its member exposures' products too: thousands of files.
- Observations of any size list completely: a JWST mosaic with about 300,000 products (mostly
  guide-star files in `auxiliary/`) lists every one (`find DIR -type f | wc -l`, `ls -l auxiliary/`).
  Its first listing takes as long as MAST needs to answer (tens of pages of 10,000 rows, minutes on
  the real archive); later ones come from the cache. A listing is all or nothing: when MAST's pages
  do not add up to the number of rows it announced (rows shifting while it pages), mastfs asks again
  and, failing that, answers EIO (with a log line), never a listing with products missing. One answer
  may hold at most 5 million rows (a cap against a server paging forever).
- Products are deduplicated by `dataURI`; if two different products share a file name in one
  directory, the later ones are shown as `<name>~2`, `<name>~3` ...
- The same product under several observations is one file for the cache: reading it through either
  path downloads it once.
- `recommended/` holds the products whose `productGroupDescription` is "Minimum Recommended
  Products": MAST's default set (the Portal's download basket, astroquery's `mrp_only=True`), e.g. a
  JWST level-3 observation's i2d mosaic, source catalog and previews, and its members' cal files. They
  are the same files as in the level and group directories (same inode, one cache entry: reading
  either downloads once). `mastfs prefetch --recommended PATH` fetches only those.

## Attributes

- Directories are mode 0555, files 0444, owned by the mounting user (or `--uid`/`--gid`).
- Exclusive-access products (`dataRights` not PUBLIC) are listed but shown as mode 0000 and opening
  them fails with EACCES until a MAST token is configured (get one at
  https://auth.mast.stsci.edu/token, then set MAST_API_TOKEN or `token_file`); with a token they are
  0400 (the mounting user's only, even with `allow_other`) and MAST decides.
- File size comes from the product row; a missing size is asked of MAST once (HEAD) and cached.
- Modification time is the observation's `t_obs_release` (or `t_max` when null), converted from MJD.
  Files inside an observation directory carry the observation's time.
- `statfs` (df) reports the block cache: its size limit as the total, the cached bytes as used.
- The filesystem is read-only: every change fails with EROFS.

## Extended attributes

    getfattr -d /mnt/mast/program/2733/jw02733-o002_t001_miri_f1130w
    getfattr -d /mnt/mast/program/2733/jw02733-o002_t001_miri_f1130w/level3/<file>

- `user.mast_<field>`: every non-null field of the observation row (on the observation directory)
  or of the product row (on the file), as text, e.g. `user.mast_target_name`,
  `user.mast_dataURI`, `user.mast_calib_level`. Null fields are omitted.
- `user.mastfs.*` are mastfs's own, on product files: `user.mastfs.uri` (the product's dataURI),
  `user.mastfs.cached_bytes` (how many of its bytes the local cache holds), `user.mastfs.kind` (below),
  `user.mastfs.observation_date` and, once the file was opened in this mount, `user.mastfs.source`
  (where its bytes come from: `s3://<bucket>/<key>` or the HTTPS download URL) and `user.mastfs.etag`
  (the ETag of the version the last open read).
- `user.mastfs.observation_date`, on observation directories and their files: when the observation
  was made, ISO 8601 UTC (`2022-06-12T01:12:00Z`), from `t_min`, else `t_max`, else `t_obs_release`
  (planned observations); absent when all three are null.
- `user.mastfs.kind`, on product files: what a viewer opens the file as, from the file name's last
  `_suffix` (what MAST's dashboards show as a column):

  | kind | suffixes |
  |---|---|
  | `image` | `_uncal`, `_rate`, `_rateints`, `_cal`, `_calints`, `_i2d`, `_s2d`, `_crf`, `_segm`; HST `_raw`, `_flt`, `_flc`, `_drz`, `_drc` |
  | `table` | `_asn`, `_x1d`, `_x1dints`, `_cat`, `_pool`; HST `_jit`, `_whtlt` |
  | `spectrum` | `_c1d`, `_spec` (combined one-dimensional spectra) |
  | `cube` | `_s3d` |
  | `preview` | `.jpg`, `.jpeg`, `.png`, `.gif` files (previews and thumbnails) |
  | `other` | anything else (logs, telemetry, ...) |
- An unknown `user.` attribute is ENODATA; setting or removing any attribute is EROFS (the mount is
  read-only, so the kernel refuses before asking mastfs). Names outside `user.` (`security.selinux`,
  `system.posix_acl_*`, `trusted.*`) are EOPNOTSUPP ("not supported on this filesystem"), at once,
  without asking MAST: `ls -l` asks every file for `security.selinux` and stops asking for the rest of
  the filesystem after one EOPNOTSUPP (with ENODATA it asked each of thousands of files, a FUSE round
  trip each).

## Caching

Listings and rows are cached on disk across remounts: observations released long ago for
`--ttl-released` (7 days), recent, planned or exclusive ones for `--ttl-recent` (1 hour), unknown
ids for `--ttl-negative` (10 minutes). When MAST cannot be reached, what was seen before still
lists; what was never seen fails with EIO after `--deadline` (never ENOENT). The kernel keeps
entries and attributes for 60 seconds. `mastfs refresh PATH` drops cached metadata for a subtree.

## Slow queries

Large queries take minutes on MAST's side. A listing waits for its query up to `--query-timeout`
(600 seconds) while MAST is answering, then fails with EIO; a MAST that cannot be reached at all fails
within `--deadline`. MAST's "timed out, try again" answers are asked again with backoff within that
time. While you wait, `mastfs status` shows the queries in flight (what, for how long, pages so far),
and Ctrl-C ends the `ls` at once (EINTR): the query goes on in the daemon, and the next `ls` of the
same directory waits for that one rather than starting over.
"""
