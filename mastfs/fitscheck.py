"""FITS checksums of a product verified as its blocks arrive: each HDU's DATASUM and CHECKSUM (FITS
standard 4.0, appendix J: 32-bit ones' complement sums of big-endian words).

:class:`FitsCheck` follows one product version. Each block handed to :meth:`FitsCheck.add` is summed
per 2,880-byte record (numpy, one pass), so an HDU is checked the moment the last of its blocks arrives,
whatever order they came in, without reading any block again. Headers are parsed from the block bytes
(80-character cards up to ``END``: BITPIX, NAXISn, PCOUNT, GCOUNT, DATASUM, CHECKSUM); the next HDU's
header is found after the previous one's data, so HDUs are learned in file order; a header whose block
passed before its offset was known is parsed when the caller hands that block again (``add`` of a block
already summed only parses).

Pure computation, no I/O. Raises :class:`HduMismatch` when an HDU fails its sums or a header that must
be there is not a FITS header.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECORD = 2880
CARD = 80
_ONES = 0xFFFFFFFF


class HduMismatch(Exception):
    """An HDU's bytes do not match its DATASUM or CHECKSUM, or its header is not FITS: ``span`` is the
    byte range ``[start, end)`` of the HDU (header and data), ``number`` its index, ``what`` the check."""

    def __init__(self, number: int, span: tuple[int, int], what: str) -> None:
        super().__init__(f"HDU {number} (bytes {span[0]}-{span[1] - 1}) fails its {what}")
        self.number = number
        self.span = span
        self.what = what


@dataclass
class Hdu:
    number: int
    start: int  # first header byte
    data_start: int
    end: int  # end of the data records (padded)
    datasum: int | None
    has_checksum: bool
    checked: bool = False


def fold(total: int) -> int:
    """A sum of 32-bit words folded into a 32-bit ones' complement sum (end-around carry)."""
    while total >> 32:
        total = (total & _ONES) + (total >> 32)
    return total


def applies_to(name: str, size: int) -> bool:
    """Whether a file of this name and size is checked as FITS (a ``.fits`` name, whole records)."""
    return name.lower().endswith(".fits") and size > 0 and size % RECORD == 0


class FitsCheck:
    """DATASUM/CHECKSUM verification of one FITS file of ``size`` bytes, fed block by block."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hdus: list[Hdu] = []
        self.next_header = 0  # offset of the first HDU header not parsed yet (size: all parsed)
        self._sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block start -> (record starts, sums)
        self._spans: dict[int, int] = {}  # block start -> block end
        self.verified = 0
        """HDUs that passed every check they carry."""

    @property
    def complete(self) -> bool:
        """True when every HDU has been checked (or carries nothing to check)."""
        return self.next_header >= self.size and all(hdu.checked for hdu in self.hdus)

    def add(self, start: int, data: bytes | memoryview, more: bytes | memoryview = b"") -> list[Hdu]:
        """Take the block of bytes ``[start, start + len(data))`` (``more``: bytes right after it, when the
        caller has them, for a header running past the block). Returns the HDUs checked and found good
        now. Raises HduMismatch (its HDU's sums are then forgotten, so it is checked again when its
        blocks come again)."""
        end = start + len(data)
        if start not in self._spans:
            self._spans[start] = end
            self._sums[start] = _record_sums(start, data)
        while start <= self.next_header < end:
            if not self._parse_header(start, data, more):
                break
        return self._check_ready()

    def forget(self, start: int, end: int) -> None:
        """Drop what was summed of the blocks starting in ``[start, end)`` (they will come again)."""
        for block in [b for b in self._spans if start <= b < end or b <= start < self._spans[b]]:
            del self._spans[block]
            del self._sums[block]

    # ---------------------------------------------------------------------------------------------

    def _parse_header(self, block_start: int, data: bytes | memoryview, more: bytes | memoryview) -> bool:
        """Parse the header at ``next_header`` from the block; False when it runs past the bytes at hand."""
        offset = self.next_header - block_start
        available = bytes(data[offset:]) + bytes(more)
        number = len(self.hdus)
        first = b"SIMPLE  =" if number == 0 else b"XTENSION="
        if not available.startswith(first):
            raise HduMismatch(number, (self.next_header, self.next_header + RECORD), "header (not a FITS header)")
        cards: dict[str, str] = {}
        position = 0
        while True:
            if position + CARD > len(available):
                return False
            card = available[position:position + CARD]
            position += CARD
            try:
                text = card.decode("ascii")
            except UnicodeDecodeError:
                raise HduMismatch(number, (self.next_header, self.next_header + position), "header (not ASCII)") \
                    from None
            keyword = text[:8].strip()
            if keyword == "END":
                break
            if text[8:10] == "= ":
                cards.setdefault(keyword, text[10:].split("/")[0].strip().strip("'").strip())
        header_length = -(-position // RECORD) * RECORD
        data_start = self.next_header + header_length
        try:
            end = data_start + _padded(_data_length(cards))
            datasum = int(cards["DATASUM"]) if cards.get("DATASUM") else None
        except (KeyError, ValueError):
            raise HduMismatch(number, (self.next_header, data_start), "header (bad BITPIX, NAXISn or DATASUM)") \
                from None
        if end > self.size:
            raise HduMismatch(number, (self.next_header, data_start), "header (data past the end of the file)")
        self.hdus.append(Hdu(number, self.next_header, data_start, end, datasum, "CHECKSUM" in cards))
        self.next_header = end
        return True

    def _check_ready(self) -> list[Hdu]:
        passed = []
        for hdu in self.hdus:
            if hdu.checked:
                continue
            if hdu.datasum is None and not hdu.has_checksum:
                hdu.checked = True
                continue
            header_sum = self._range_sum(hdu.start, hdu.data_start)
            data_sum = self._range_sum(hdu.data_start, hdu.end)
            if header_sum is None or data_sum is None:
                continue
            if hdu.datasum is not None and fold(data_sum) != hdu.datasum % (1 << 32):
                self.forget(hdu.start, hdu.end)
                raise HduMismatch(hdu.number, (hdu.start, hdu.end), "DATASUM")
            if hdu.has_checksum and fold(header_sum + data_sum) != _ONES:
                self.forget(hdu.start, hdu.end)
                raise HduMismatch(hdu.number, (hdu.start, hdu.end), "CHECKSUM")
            hdu.checked = True
            self.verified += 1
            passed.append(hdu)
            self._release(hdu)
        return passed

    def _range_sum(self, start: int, end: int) -> int | None:
        """Sum of the words in ``[start, end)`` (record boundaries) if every block covering it was added."""
        if start == end:
            return 0
        total, covered = 0, 0
        for block, block_end in self._spans.items():
            if block_end <= start or block >= end:
                continue
            starts, sums = self._sums[block]
            mask = (starts >= start) & (starts < end)
            total += int(sums[mask].sum())
            covered += min(block_end, end) - max(block, start)
        return total if covered == end - start else None

    def _release(self, hdu: Hdu) -> None:
        """Forget the sums of blocks no unchecked HDU needs any more."""
        pending = [(h.start, h.end) for h in self.hdus if not h.checked]
        for block in list(self._spans):
            block_end = self._spans[block]
            if block_end <= self.next_header and not any(s < block_end and block < e for s, e in pending):
                del self._spans[block]
                del self._sums[block]


def _record_sums(start: int, data: bytes | memoryview) -> tuple[np.ndarray, np.ndarray]:
    """``(segment starts, word sums)`` of the block ``[start, start + len(data))`` cut at every record
    boundary (offsets relative to the file; both ends of the block are cut points)."""
    words = np.frombuffer(data, dtype=">u4", count=len(data) // 4)
    end = start + len(data)
    first = min(-(-start // RECORD) * RECORD, end)  # first record boundary in the block
    last = max(end // RECORD * RECORD, first)  # last one
    head = (first - start) // 4
    tail = (last - start) // 4
    per_record = RECORD // 4
    middle = words[head:tail].reshape(-1, per_record).sum(axis=1, dtype=np.uint64)
    starts = [np.arange(first, last, RECORD, dtype=np.int64)]
    sums = [middle]
    if head:
        starts.insert(0, np.array([start], dtype=np.int64))
        sums.insert(0, np.array([words[:head].sum(dtype=np.uint64)], dtype=np.uint64))
    if tail < len(words):
        starts.append(np.array([last], dtype=np.int64))
        sums.append(np.array([words[tail:].sum(dtype=np.uint64)], dtype=np.uint64))
    return np.concatenate(starts), np.concatenate(sums)


def _data_length(cards: dict[str, str]) -> int:
    bitpix = abs(int(cards["BITPIX"]))
    naxis = int(cards["NAXIS"])
    if naxis == 0:
        return 0
    count = 1
    for axis in range(1, naxis + 1):
        count *= int(cards[f"NAXIS{axis}"])
    return bitpix // 8 * int(cards.get("GCOUNT", 1) or 1) * (int(cards.get("PCOUNT", 0) or 0) + count)


def _padded(length: int) -> int:
    return -(-length // RECORD) * RECORD
