"""Object versions: which version of an archive file a server states, and the checks that every later
answer is of that same version.

A product's bytes may change on MAST while it keeps its dataURI (JWST products are reprocessed in place);
the S3 copy and the HTTPS copy may differ for a while. A version is what the server says about one copy:
its ETag (S3 also a VersionId), else its Last-Modified, plus its length. Two copies are the same version
only when their tags are equal (the twin's and S3's ETags are content MD5s, so equal bytes show equal).

Shared by the fetchers (which send the version's conditions and compare each answer's validators) and
the reader and block cache (which key blocks by version). Raises only :class:`VersionChanged` and
:class:`~mastfs.errors.BadResponse`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadResponse, MastfsError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_PLAIN_MD5 = re.compile(r'"?([0-9a-fA-F]{32})"?')
S3_CHECKSUMS = ("ChecksumSHA256", "ChecksumSHA1", "ChecksumCRC32")
"""S3 additional checksums mastfs can verify over a whole object (full-object, not composite ``-N``)."""


class VersionChanged(MastfsError):
    """The file changed on MAST (another ETag or date) while a handle was reading it: EIO for that handle;
    the next open reads the new version from its start."""


@dataclass(frozen=True)
class ObjectVersion:
    """One version of one copy of a file as its server stated it.

    ``size`` is the true length (None: the server gave none); ``etag`` the quoted entity tag or None;
    ``last_modified`` the Last-Modified text or None; ``version_id`` the S3 VersionId or None;
    ``checksums`` S3 additional checksums ((name, base64) pairs) when the object has them. Hashable.
    """

    size: int | None
    etag: str | None = None
    last_modified: str | None = None
    version_id: str | None = None
    checksums: tuple[tuple[str, str], ...] = ()

    @property
    def tag(self) -> str:
        """The version's identity in the cache: ETag (and VersionId), else Last-Modified and length;
        "" when the server stated neither (such a file can only be read whole, at once)."""
        if self.etag:
            return self.etag + (f"#{self.version_id}" if self.version_id else "")
        if self.last_modified:
            return f"date:{self.last_modified}:{self.size}"
        return ""

    @property
    def content_md5(self) -> str | None:
        """The hex MD5 of the whole content when the ETag is a plain MD5 (a one-part S3 upload), else None
        (multipart ``-N`` ETags and opaque HTTPS tags are not content digests)."""
        match = _PLAIN_MD5.fullmatch(self.etag or "")
        return match.group(1).lower() if match else None

    def conditions(self) -> dict[str, str]:
        """HTTP request headers that make a server refuse (412) another version."""
        if self.etag:
            return {"If-Match": self.etag}
        if self.last_modified:
            return {"If-Unmodified-Since": self.last_modified}
        return {}

    def check(self, etag: str | None, last_modified: str | None, where: str) -> None:
        """Raise VersionChanged when an answer's validators show another version than this one (a
        server that ignores If-Match still states its ETag). Validators the answer lacks are not
        held against it."""
        if self.etag and etag and _strong(etag) != _strong(self.etag):
            raise VersionChanged(f"{where}: the file changed on MAST (ETag {self.etag} is now {etag})")
        if not self.etag and self.last_modified and last_modified and last_modified != self.last_modified:
            raise VersionChanged(f"{where}: the file changed on MAST (Last-Modified {self.last_modified} is "
                                 f"now {last_modified})")


def _strong(etag: str) -> str:
    return etag.strip().removeprefix("W/")


def content_range_total(header: str | None) -> int | None:
    """The complete length in a ``Content-Range: bytes a-b/TOTAL`` header; None for ``*`` or none.
    Raises BadResponse for a header that is present but not a byte range."""
    if not header:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise BadResponse(f"unparsable Content-Range {header!r}")
    return None if match.group(3) == "*" else int(match.group(3))


def from_s3(response: Mapping[str, Any]) -> ObjectVersion:
    """The version a HeadObject or GetObject answer states (size: ContentLength of a HEAD, the
    Content-Range total of a ranged GET)."""
    total = content_range_total(response.get("ContentRange"))
    size = total if total is not None else response.get("ContentLength")
    modified = response.get("LastModified")
    checksums = tuple((name, response[name]) for name in S3_CHECKSUMS
                      if response.get(name) and "-" not in str(response[name]))
    return ObjectVersion(size=size, etag=response.get("ETag"),
                         last_modified=modified.isoformat() if modified is not None else None,
                         version_id=response.get("VersionId"), checksums=checksums)
