"""Lazily generated, deterministic file contents for the MAST twin.

Every product the twin serves is a `GeneratedFile`: an ordered list of segments (literal bytes such as
FITS headers, or stretches of a shared pseudo-random data pattern) whose total length is exactly the
product's declared size. `GeneratedFile.read(offset, length)` builds any byte range in O(length) time and
memory without materialising the file, so multi-GiB mosaics cost nothing until read, and reading 8 MiB
costs about two memcpys (the data pattern is sliced through memoryviews, then joined once).

Builders:
- `build_fits(spec, size, shift)`: a valid FITS file (primary header, image extensions, binary tables
  such as a spectrum's EXTRACT1D, and one trailing BINTABLE "filler" extension, like JWST's ASDF
  extension, that absorbs whatever the images and tables leave of the declared size). Image shapes shrink, keeping their aspect ratio, when the declared size is smaller than
  the spec's full-size shape; `fits_min_size` / `fits_natural_size` tell the catalog which sizes are
  possible and what the real-world size is.
- `build_jpeg(size, shift, comment)`: a valid JPEG (a small real image padded with COM segments).
- `build_text(content)`: literal bytes (asn.json, pool.csv, cat.ecsv produced by the helpers below).
- `padded_json(obj, size)`, `pipe_table(...)`, `ecsv_catalog(...)`: parseable text of an exact size.

All output is a pure function of the arguments; the data pattern is a fixed seeded 1 MiB block.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import random
import threading
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mastfs.twin.sky import Sky, Wcs

BLOCK = 2880
PATTERN_SIZE = 1 << 20
_PATTERN = random.Random(0x6D617374).randbytes(PATTERN_SIZE)
# Two copies back to back: any window of up to PATTERN_SIZE bytes is one contiguous slice.
_DOUBLED_PATTERN = memoryview(_PATTERN + _PATTERN)
_PRIMARY_HEADER_MAX_BLOCKS = 2
_CARDS_PER_BLOCK = BLOCK // 80
_SUM_CHUNK = 8 << 20  # a multiple of 4: data sums are streamed in chunks of this size


def pad_to_block(nbytes: int) -> int:
    """Return `nbytes` rounded up to a multiple of the FITS block size (2880)."""
    return -(-nbytes // BLOCK) * BLOCK


@dataclass(frozen=True)
class ImageExt:
    """One IMAGE extension: its shape is `leading + (ny, nx)`, (ny, nx) chosen by the layout."""

    extname: str
    bitpix: int
    leading: tuple[int, ...] = ()
    extver: int = 1
    bunit: str | None = None

    @property
    def bytes_per_pixel(self) -> int:
        """Bytes per spatial pixel, counting every leading plane (integrations, groups)."""
        return abs(self.bitpix) // 8 * math.prod(self.leading)


_TFORM_BYTES = {"B": 1, "I": 2, "J": 4, "K": 8, "E": 4, "D": 8}


@dataclass(frozen=True)
class TableExt:
    """One BINTABLE extension of scalar columns (TTYPE, TFORM letter, TUNIT or None) holding `records`:
    its rows, big-endian, row after row; `cards` are extra header cards."""

    extname: str
    columns: tuple[tuple[str, str, str | None], ...]
    records: bytes
    cards: tuple[tuple[str, object, str], ...] = ()

    @property
    def header(self) -> tuple[tuple[str, object, str], ...]:
        return table_cards(self.extname, self.columns, len(self.records) // row_width(self.columns), self.cards)


def row_width(columns: Sequence[tuple[str, str, str | None]]) -> int:
    """Bytes per row of a table of these scalar columns."""
    return sum(_TFORM_BYTES[tform] for _, tform, _ in columns)


def table_cards(extname: str, columns: Sequence[tuple[str, str, str | None]], rows: int,
                cards: Sequence[tuple[str, object, str]] = ()) -> tuple[tuple[str, object, str], ...]:
    """Header cards (without CHECKSUM/DATASUM) of a BINTABLE of `rows` rows of these scalar columns."""
    described: list[tuple[str, object, str]] = [
        ("XTENSION", "BINTABLE", "binary table extension"),
        ("BITPIX", 8, "array data type"),
        ("NAXIS", 2, "number of array dimensions"),
        ("NAXIS1", row_width(columns), "length of dimension 1"),
        ("NAXIS2", rows, "length of dimension 2"),
        ("PCOUNT", 0, "number of group parameters"),
        ("GCOUNT", 1, "number of groups"),
        ("TFIELDS", len(columns), "number of table fields"),
    ]
    for number, (name, tform, unit) in enumerate(columns, start=1):
        described += [(f"TTYPE{number}", name, ""), (f"TFORM{number}", tform, ""), (f"TUNIT{number}", unit, "")]
    return (*described, ("EXTNAME", extname, "extension name"), ("EXTVER", 1, "extension value"), *cards)


def table_size(columns: Sequence[tuple[str, str, str | None]], rows: int,
               cards: Sequence[tuple[str, object, str]] = ()) -> int:
    """Bytes of a BINTABLE extension (header with its sums, padded data) of `rows` rows."""
    return HduHeader(table_cards("", columns, rows, cards), 0, 0).size + pad_to_block(rows * row_width(columns))


@dataclass(frozen=True)
class FitsSpec:
    """Everything that determines a generated FITS file except its size and data shift."""

    primary_cards: tuple[tuple[str, object, str], ...]  # (keyword, value, comment); None values skipped
    images: tuple[ImageExt, ...]
    base_shape: tuple[int, int]  # (ny, nx) of every image at full (real-world) size
    tables: tuple[TableExt, ...] = ()  # after the images, before the filler
    filler_extname: str = "ASDF"
    filler_column: str = "ASDF_METADATA"
    wcs: tuple[float, float, float] | None = None  # (ra, dec, pixel scale in deg at base_shape) for SCI headers
    sky: Sky | None = None  # what the image data show (with `wcs`); pattern bytes when None


@functools.lru_cache(maxsize=256)
def _images_size(images: tuple[ImageExt, ...], base_shape: tuple[int, int]) -> int:
    """Bytes of the image extensions (headers and padded data) at `base_shape`; memoised (few layouts)."""
    ny, nx = base_shape
    return sum(BLOCK + pad_to_block(ny * nx * image.bytes_per_pixel) for image in images)


def fits_min_size(images: Sequence[ImageExt], tables_bytes: int = 0) -> int:
    """A size `build_fits` always accepts for these images (1-pixel planes, one filler block, a primary
    header of up to two blocks) and tables of `tables_bytes` (see `table_size`); smaller sizes may be
    refused."""
    return _PRIMARY_HEADER_MAX_BLOCKS * BLOCK + _images_size(tuple(images), (1, 1)) + tables_bytes + 2 * BLOCK


def fits_natural_size(images: Sequence[ImageExt], base_shape: tuple[int, int], filler_bytes: int,
                      tables_bytes: int = 0) -> int:
    """Size of the file at full shape with tables of `tables_bytes` (see `table_size`) and
    `filler_bytes` (rounded up to blocks) of filler data."""
    return (_PRIMARY_HEADER_MAX_BLOCKS * BLOCK + _images_size(tuple(images), tuple(base_shape)) + tables_bytes
            + BLOCK + pad_to_block(max(filler_bytes, 1)))


class DataSource(Protocol):
    """Bytes of one data unit stretch generated on demand (e.g. a sky image plane)."""

    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of this stretch (0 <= offset < offset+length <= size)."""
        ...


@dataclass(frozen=True)
class HduHeader:
    """A FITS header whose CHECKSUM and DATASUM cards are filled in when first read.

    `data_start`/`data_size` locate the HDU's data unit (padding included) in the file.
    """

    cards: tuple[tuple[str, object, str], ...]
    data_start: int
    data_size: int

    @property
    def size(self) -> int:
        return len(self.render("0", 0))

    def render(self, checksum: str, datasum: int) -> bytes:
        return _header([*self.cards, ("CHECKSUM", checksum, "HDU checksum"),
                        ("DATASUM", str(datasum), "data unit checksum")])


class ChecksumMemo:
    """Per-product memo of data-unit sums (keyed by data unit offset), shared by every `GeneratedFile` of
    one product so that each sum is computed at most once; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.datasums: dict[int, int] = {}


def ones_complement_sum(data: bytes | memoryview, start: int = 0) -> int:
    """FITS checksum arithmetic: 32-bit ones'-complement sum of big-endian words of `data` (length a
    multiple of 4) added to `start`. Partial sums combine: sum(a + b) == sum(b, start=sum(a))."""
    total = start + int(np.frombuffer(data, dtype=">u4").sum(dtype=np.uint64))
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


_CHECKSUM_EXCLUDED = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))


def encode_checksum(value: int) -> str:
    """The 16-character ASCII encoding of a 32-bit value (FITS checksum convention, as astropy's)."""
    chars = [0] * 16
    for i in range(4):
        byte = (value >> ((3 - i) * 8)) & 0xFF
        quotient, remainder = byte // 4 + 0x30, byte % 4
        group = [quotient + remainder, quotient, quotient, quotient]
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                if group[j] in _CHECKSUM_EXCLUDED or group[j + 1] in _CHECKSUM_EXCLUDED:
                    group[j] += 1
                    group[j + 1] -= 1
                    changed = True
        for j in range(4):
            chars[4 * j + i] = group[j]
    return bytes(chars[(i + 15) % 16] for i in range(16)).decode("ascii")


class GeneratedFile:
    """Deterministic file contents made of literal segments, stretches of the data pattern, data sources
    and checksummed FITS headers.

    `read` is thread-safe. A header's DATASUM is computed on the first read of that header by streaming
    its data unit (O(data unit) once per product when a `ChecksumMemo` is given, never held in memory).
    """

    __slots__ = ("size", "_shift", "_starts", "_segments", "_memo", "_rendered")

    def __init__(self, segments: Sequence[bytes | int | DataSource | HduHeader], shift: int,
                 memo: ChecksumMemo | None = None) -> None:
        """`segments`: literal bytes, an int = that many pattern bytes, a `DataSource`, or an `HduHeader`;
        `shift` offsets the pattern; `memo` keeps data sums across instances of the same product."""
        self._shift = shift % PATTERN_SIZE
        self._starts: list[int] = []
        self._segments: list[tuple[int, int, object]] = []
        self._memo = memo if memo is not None else ChecksumMemo()
        self._rendered: dict[int, memoryview] = {}
        position = 0
        for segment in segments:
            if isinstance(segment, int):
                length, content = segment, None
            elif isinstance(segment, (bytes, bytearray)):
                length, content = len(segment), memoryview(bytes(segment))
            else:
                length, content = segment.size, segment
            if length == 0:
                continue
            self._starts.append(position)
            self._segments.append((position, position + length, content))
            position += length
        self.size = position

    def read(self, offset: int, length: int) -> bytes:
        """Return bytes [offset, offset+length) clipped to the file size (b"" past the end).

        Raises ValueError for a negative offset or length.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        parts: list[memoryview | bytes] = []
        index = bisect_right(self._starts, offset) - 1
        position = offset
        while position < end:
            start, stop, content = self._segments[index]
            stop = min(stop, end)
            if content is None:
                _append_pattern(parts, position + self._shift, stop - position)
            elif isinstance(content, memoryview):
                parts.append(content[position - start : stop - start])
            elif isinstance(content, HduHeader):
                parts.append(self._header_bytes(start, content)[position - start : stop - start])
            else:
                parts.append(content.read(position - start, stop - position))
            position = stop
            index += 1
        return b"".join(parts)

    def _header_bytes(self, start: int, header: HduHeader) -> memoryview:
        """The header at `start` with its CHECKSUM and DATASUM filled in (rendered once per instance)."""
        rendered = self._rendered.get(start)
        if rendered is None:
            datasum = self._datasum(header)
            unsummed = header.render("0" * 16, datasum)
            checksum = encode_checksum(~ones_complement_sum(unsummed, datasum) & 0xFFFFFFFF)
            rendered = self._rendered[start] = memoryview(header.render(checksum, datasum))
        return rendered

    def _datasum(self, header: HduHeader) -> int:
        """Ones'-complement sum of the header's data unit, streamed in chunks; memoised per product."""
        with self._memo.lock:
            datasum = self._memo.datasums.get(header.data_start)
            if datasum is None:
                datasum = 0
                end = header.data_start + header.data_size
                for position in range(header.data_start, end, _SUM_CHUNK):
                    datasum = ones_complement_sum(self.read(position, min(_SUM_CHUNK, end - position)), datasum)
                self._memo.datasums[header.data_start] = datasum
        return datasum


def _append_pattern(parts: list[memoryview], position: int, length: int) -> None:
    """Append views of the data pattern covering `length` bytes from pattern position `position`."""
    while length > 0:
        start = position % PATTERN_SIZE
        chunk = min(length, PATTERN_SIZE)
        parts.append(_DOUBLED_PATTERN[start : start + chunk])
        position += chunk
        length -= chunk


def _format_value(value: object) -> str:
    """FITS fixed-format value field for a bool, int, float or str."""
    if isinstance(value, bool):
        return ("T" if value else "F").rjust(20)
    if isinstance(value, int):
        return str(value).rjust(20)
    if isinstance(value, float):
        text = repr(value).upper()
        if "." not in text and "E" not in text:
            text += ".0"
        return text.rjust(20)
    quoted = "'" + str(value).replace("'", "''").ljust(8) + "'"
    return quoted.ljust(20)


def _card(keyword: str, value: object, comment: str = "") -> str:
    """One 80-character header card."""
    card = f"{keyword:<8}= {_format_value(value)}"
    if comment:
        card += f" / {comment}"
    if len(card) > 80:
        if card[:80].count("'") % 2:  # never cut a string value in half
            raise ValueError(f"FITS card too long: {card!r}")
        card = card[:80]
    return card.ljust(80)


def _header(cards: Sequence[tuple[str, object, str]]) -> bytes:
    """Header bytes: the cards (None values skipped), END, padded with blanks to a block multiple."""
    lines = [_card(key, value, comment) for key, value, comment in cards if value is not None]
    lines.append("END".ljust(80))
    text = "".join(lines)
    return text.ljust(pad_to_block(len(text))).encode("ascii")


def _image_cards(image: ImageExt, shape: tuple[int, int],
                 wcs: tuple[float, float, float] | None) -> list[tuple[str, object, str]]:
    ny, nx = shape
    axes = [nx, ny, *reversed(image.leading)]
    cards: list[tuple[str, object, str]] = [
        ("XTENSION", "IMAGE", "Image extension"),
        ("BITPIX", image.bitpix, "array data type"),
        ("NAXIS", len(axes), "number of array dimensions"),
    ]
    cards += [(f"NAXIS{i}", n, "") for i, n in enumerate(axes, start=1)]
    cards += [
        ("PCOUNT", 0, "number of parameters"),
        ("GCOUNT", 1, "number of groups"),
        ("EXTNAME", image.extname, "extension name"),
        ("EXTVER", image.extver, "extension value"),
        ("BUNIT", image.bunit, "physical units of the array values"),
    ]
    if wcs is not None and image.extname == "SCI":
        ra, dec, scale = wcs
        cards += [
            ("WCSAXES", 2, "number of World Coordinate System axes"),
            ("CTYPE1", "RA---TAN", "first axis coordinate type"),
            ("CTYPE2", "DEC--TAN", "second axis coordinate type"),
            ("CUNIT1", "deg", "first axis units"),
            ("CUNIT2", "deg", "second axis units"),
            ("CRPIX1", (nx + 1) / 2.0, "axis 1 coordinate of the reference pixel"),
            ("CRPIX2", (ny + 1) / 2.0, "axis 2 coordinate of the reference pixel"),
            ("CRVAL1", float(ra), "first axis value at the reference pixel"),
            ("CRVAL2", float(dec), "second axis value at the reference pixel"),
            ("CDELT1", -float(scale), "first axis increment per pixel"),
            ("CDELT2", float(scale), "second axis increment per pixel"),
            ("RADESYS", "ICRS", "name of the coordinate reference frame"),
        ]
    return cards


def _filler_cards(extname: str, column: str, nbytes: int) -> list[tuple[str, object, str]]:
    return [
            ("XTENSION", "BINTABLE", "binary table extension"),
            ("BITPIX", 8, "array data type"),
            ("NAXIS", 2, "number of array dimensions"),
            ("NAXIS1", nbytes, "length of dimension 1"),
            ("NAXIS2", 1, "length of dimension 2"),
            ("PCOUNT", 0, "number of group parameters"),
            ("GCOUNT", 1, "number of groups"),
            ("TFIELDS", 1, "number of table fields"),
            ("TTYPE1", column, ""),
            ("TFORM1", f"{nbytes}B", ""),
            ("EXTNAME", extname, "extension name"),
        ]


def _image_data_bytes(images: Sequence[ImageExt], ny: int, nx: int) -> int:
    return sum(pad_to_block(ny * nx * image.bytes_per_pixel) for image in images)


def _fit_shape(images: Sequence[ImageExt], base_shape: tuple[int, int], budget: int) -> tuple[int, int]:
    """Largest (ny, nx), full shape at most, keeping the aspect ratio, whose padded data fits `budget`."""
    ny0, nx0 = base_shape
    if _image_data_bytes(images, ny0, nx0) <= budget:
        return base_shape
    per_pixel = sum(image.bytes_per_pixel for image in images)
    usable = max(budget - len(images) * BLOCK, per_pixel)
    factor = math.sqrt(usable / (per_pixel * ny0 * nx0))
    nx = max(1, min(nx0, int(nx0 * factor)))
    ny = max(1, min(ny0, usable // (per_pixel * nx)))
    while _image_data_bytes(images, ny, nx) > budget:
        if ny > 1:
            ny -= 1
        elif nx > 1:
            nx -= 1
        else:
            raise ValueError(f"size too small for {len(images)} image extensions")
    return ny, nx


def fitted_wcs(wcs: tuple[float, float, float], base_shape: tuple[int, int],
               shape: tuple[int, int]) -> tuple[float, float, float]:
    """The (ra, dec, pixel scale) of an image shrunk from `base_shape` to `shape`: it covers the same sky
    with larger pixels."""
    ra, dec, scale = wcs
    return ra, dec, scale * base_shape[1] / shape[1]


def image_shape(spec: FitsSpec, size: int) -> tuple[int, int]:
    """(ny, nx) of the images `build_fits(spec, size, ...)` makes. Raises ValueError as build_fits does."""
    return _layout(spec, size)[1]


def _layout(spec: FitsSpec, size: int) -> tuple[HduHeader, tuple[int, int]]:
    """The primary header and the image shape of a file of `size` bytes; raises ValueError if impossible."""
    if size % BLOCK:
        raise ValueError(f"FITS size {size} is not a multiple of {BLOCK}")
    primary_cards = (
        ("SIMPLE", True, "conforms to FITS standard"),
        ("BITPIX", 8, "array data type"),
        ("NAXIS", 0, "number of array dimensions"),
        ("EXTEND", True, ""),
        *spec.primary_cards,
    )
    primary = HduHeader(primary_cards, 0, 0)
    if primary.size > _PRIMARY_HEADER_MAX_BLOCKS * BLOCK:
        raise ValueError("primary header longer than two blocks")
    tables = sum(HduHeader(table.header, 0, 0).size + pad_to_block(len(table.records)) for table in spec.tables)
    budget = size - primary.size - tables - BLOCK * (len(spec.images) + 1) - BLOCK  # >= 1 block of filler data
    if budget < 0:
        raise ValueError(f"size {size} too small")
    return primary, _fit_shape(spec.images, spec.base_shape, budget)


def build_fits(spec: FitsSpec, size: int, shift: int, memo: ChecksumMemo | None = None) -> GeneratedFile:
    """A valid FITS file of exactly `size` bytes (a multiple of 2880, >= fits_min_size(spec.images)).

    Image data show `spec.sky` (else they are pattern bytes), under a TAN WCS in the SCI header when the
    sky is celestial; tables hold their records; filler data come from the data pattern (offset by
    `shift`); data padding is zeros. Shrunk images keep the sky `spec.wcs` covers.
    Every HDU carries CHECKSUM and DATASUM, computed when its header is first read (sums kept in `memo`).
    Raises ValueError if the size is impossible or the primary header exceeds two blocks.
    """
    primary, (ny, nx) = _layout(spec, size)
    wcs = fitted_wcs(spec.wcs, spec.base_shape, (ny, nx)) if spec.wcs else None
    header_wcs = wcs if spec.sky is None or spec.sky.celestial else None
    segments: list[bytes | int | DataSource | HduHeader] = [primary]
    position = primary.size
    for image in spec.images:
        nbytes = ny * nx * image.bytes_per_pixel
        cards = tuple(_image_cards(image, (ny, nx), header_wcs))
        header = HduHeader(cards, position + HduHeader(cards, 0, 0).size, pad_to_block(nbytes))
        data: int | bytes | DataSource = nbytes
        if spec.sky is not None and wcs is not None:
            data = spec.sky.plane(image.extname, image.bitpix, image.bunit, image.leading, Wcs(*wcs, (ny, nx)))
        segments += [header, data, bytes(pad_to_block(nbytes) - nbytes)]
        position += header.size + pad_to_block(nbytes)
    for table in spec.tables:
        nbytes = len(table.records)
        header = HduHeader(table.header, position + HduHeader(table.header, 0, 0).size, pad_to_block(nbytes))
        segments += [header, table.records, bytes(pad_to_block(nbytes) - nbytes)]
        position += header.size + pad_to_block(nbytes)
    filler = size - position - BLOCK
    cards = tuple(_filler_cards(spec.filler_extname, spec.filler_column, filler))
    filler_header = HduHeader(cards, position + HduHeader(cards, 0, 0).size, filler)
    segments += [filler_header, filler]
    generated = GeneratedFile(segments, shift, memo)
    assert generated.size == size
    return generated


_JPEG_IMAGE = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA0JCgsKCA0LCgsODg0PEyAVExISEyccHhcgLikxMC4pLSwzOko+MzZGNywtQFdBRkxO"
    "UlNSMj5aYVpQYEpRUk//2wBDAQ4ODhMREyYVFSZPNS01T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09P"
    "T09PT09PT0//wAARCABAAEADASIAAhEBAxEB/8QAGwAAAgMBAQEAAAAAAAAAAAAABAUBAwYAAgf/xAAeEAABBQEBAQEBAAAAAAAA"
    "AAAAAQIDBDERIWESQf/EABkBAAMBAQEAAAAAAAAAAAAAAAADBAUBAv/EABgRAAMBAQAAAAAAAAAAAAAAAAABAxEC/9oADAMBAAIR"
    "AxEAPwD56Sidw5E6oVBD0sbw8paUshV2lyVvgwhr/AltbzCfq+DVMTLW+FL4VaP3VvMBpa++BzfQcxKqc0gLnh53wFVOKUcvRbWF"
    "kDf04bVosF9RMHVRuE9+sGTQVXg+BzK3mE1WIvBrDB1DJrXCzjjRQ+txMAp4N8NHPB+UwVWmInTsq6HfGGdsxaKZ2/lw/tN0TWk0"
    "1YdaR0R1RcHVR2Gfgd+XDarLnoX50Js0lV6eDavMjUM1Xn5/Q+OzxNMismy3jvBtYmRyKJ7T09PUlnqaAWJ+99Oyk0Hfegdp2ia0"
    "ujCzLopnd+nGtDnCKjK0XihUE/P6CEovMKHzopPB1DY+hTbXmmfZMrdLks/SfqGjVQdOteaCy2N9F62fpS+ZXBzDAdC6ebvfQVV6"
    "pyr3SCjnnBben//Z"
)
"""A real 64x64 baseline JPEG (a swirled ring, made once with ImageMagick): the image of previews too small
for a rendered one."""
_COM_MAX_PAYLOAD = 65533


def build_jpeg(size: int, shift: int, comment: str,
               picture: Callable[[int], bytes | None] | None = None) -> GeneratedFile:
    """A valid JPEG of exactly `size` bytes: a real image whose extra bytes are pattern bytes in COM
    (comment) segments, which decoders skip. `picture(budget)` draws the image in at most `budget` bytes
    (None: it cannot); without one, or when it cannot, a small built-in image is used.
    Raises ValueError if `size` cannot hold the image."""
    note = comment.encode("ascii", "replace")[:200]
    image = (picture(size - 8 - len(note)) if picture else None) or _JPEG_IMAGE
    app0_end = 4 + int.from_bytes(image[4:6], "big")  # SOI, then the APP0 (JFIF) segment
    head, body = image[:app0_end], image[app0_end:]
    rest = size - len(head) - len(body) - 4 - len(note)
    if rest < 0:
        raise ValueError(f"JPEG size {size} too small")
    full, leftover = divmod(rest, _COM_MAX_PAYLOAD + 4)
    if leftover < 5:  # too short for a segment of its own: lengthen the note instead
        note, leftover = note + b" " * leftover, 0
    segments: list[bytes | int] = [head, b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note]
    segments += [b"\xff\xfe\xff\xff", _COM_MAX_PAYLOAD] * full
    if leftover:
        segments += [b"\xff\xfe" + (leftover - 2).to_bytes(2, "big"), leftover - 4]
    segments.append(body)
    return GeneratedFile(segments, shift)


def build_text(content: bytes) -> GeneratedFile:
    """A file holding exactly `content`."""
    return GeneratedFile([content], 0)


def padded_json(obj: object, size: int) -> bytes:
    """`obj` as indented JSON followed by blanks and a newline, exactly `size` bytes.

    Raises ValueError if the JSON does not fit.
    """
    text = json.dumps(obj, indent=4).encode("ascii")
    if len(text) + 1 > size:
        raise ValueError(f"JSON of {len(text)} bytes does not fit in {size}")
    return text + b" " * (size - len(text) - 1) + b"\n"


def _fill_rows(header: str, row: Callable[[int], list[str]], separator: str, size: int) -> bytes:
    """Header plus as many rows as fit in `size` bytes; the last row's first field is zero-padded.

    Rows' first fields must be numeric so zero padding keeps their value. Raises ValueError if not even
    one row fits.
    """
    lines = [header]
    used = len(header)
    index = 0
    while True:
        fields = row(index)
        line = separator.join(fields) + "\n"
        if used + len(line) > size:
            break
        lines.append(line)
        used += len(line)
        index += 1
    if index == 0:
        raise ValueError(f"no row fits in {size} bytes")
    spare = size - used
    if spare:
        fields = row(index - 1)
        fields[0] = fields[0].rjust(len(fields[0]) + spare, "0")
        lines[-1] = separator.join(fields) + "\n"
    content = "".join(lines).encode("ascii")
    assert len(content) == size
    return content


def pipe_table(columns: Sequence[str], row: Callable[[int], list[str]], size: int) -> bytes:
    """A '|'-separated table (JWST association pool layout) of exactly `size` bytes.

    `row(i)` returns the fields of row i; its first field must be numeric (zero padding absorbs slack).
    """
    return _fill_rows("|".join(columns) + "\n", row, "|", size)


def ecsv_catalog(
    columns: Sequence[tuple[str, str]], row: Callable[[int], list[str]], meta: dict[str, str], size: int
) -> bytes:
    """An ECSV 1.0 table of exactly `size` bytes; `columns` are (name, datatype) pairs.

    `row(i)` returns the fields of row i (first one an integer); fields must contain no blanks.
    """
    header = ["# %ECSV 1.0", "# ---", "# datatype:"]
    header += [f"# - {{name: {name}, datatype: {datatype}}}" for name, datatype in columns]
    header += ["# meta: !!omap"]
    header += [f"# - {{{key}: {value}}}" for key, value in meta.items()]
    header += ["# schema: astropy-2.0", " ".join(name for name, _ in columns)]
    return _fill_rows("\n".join(header) + "\n", row, " ", size)
