"""Domain errors of mastfs and the one table that turns them into errno values.

Third-party exceptions (httpx, botocore, diskcache) are translated into these types where they enter
mastfs; the FUSE adapter turns them into errno with :func:`errno_for`. Anything not listed here is a bug
and becomes EIO.
"""

from __future__ import annotations

import errno


class MastfsError(Exception):
    """Base of every error mastfs raises on purpose; maps to EIO unless a subclass says otherwise."""

    errno: int = errno.EIO


class NotFound(MastfsError):
    """The archive says the thing does not exist (or a name cannot exist)."""

    errno = errno.ENOENT


class InvalidName(NotFound):
    """A name that cannot be valid (rejected before any network request)."""


class NameTooLong(InvalidName):
    """A name longer than the filesystem allows."""

    errno = errno.ENAMETOOLONG


class Unauthorized(MastfsError):
    """Exclusive-access data without (valid) credentials; ``reason`` tells the user what to do."""

    errno = errno.EACCES

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(MastfsError):
    """The archive could not be reached or kept failing until the deadline (network, 5xx, timeout)."""


class BadResponse(MastfsError):
    """The archive answered something we cannot parse or that contradicts itself."""


class IntegrityError(MastfsError):
    """Bytes failed verification (length, range or checksum); they are never served nor cached."""


class ReadOnly(MastfsError):
    """Any attempt to modify the filesystem."""

    errno = errno.EROFS


class NotPermitted(MastfsError):
    """An operation the filesystem never allows (e.g. setting an xattr)."""

    errno = errno.EPERM


class NoSuchAttribute(MastfsError):
    """An extended attribute that does not exist."""

    errno = errno.ENODATA


class UnsupportedAttribute(MastfsError):
    """An extended attribute outside the namespace mastfs serves (``user.``): security labels, ACLs and
    ``trusted.*`` are not supported on this filesystem. EOPNOTSUPP rather than ENODATA, so that tools that
    probe every file (``ls -l`` asks each one for ``security.selinux``) learn it once per filesystem."""

    errno = errno.EOPNOTSUPP


class Interrupted(MastfsError):
    """The process waiting on a request received a signal; the wait ends (the work behind it may go on)."""

    errno = errno.EINTR


class Retryable(MastfsError):
    """A transient failure the retry policy may try again; ``retry_after`` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def errno_for(exc: BaseException) -> int:
    """Return the errno for ``exc``: the domain error's own, ``OSError.errno`` if set, else EIO."""
    if isinstance(exc, MastfsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
