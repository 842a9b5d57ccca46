"""``UPath("mast://...")`` (universal_pathlib): registered for the protocol through upath's entry point,
so upath uses this class instead of its untested fallback (and warns no more). Paths are those of
:class:`mastfs.remote.MastFileSystem`, whose storage options ``UPath(..., **options)`` takes."""

from __future__ import annotations

from fsspec import get_filesystem_class
from upath import UPath

get_filesystem_class("mast")  # loaded now: upath derives the path flavour from the imported class


class MastPath(UPath):
    """A path of the MAST archive: ``MastPath("mast://program/2733").iterdir()``."""
