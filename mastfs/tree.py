"""The virtual tree: inodes, names, attributes, xattrs and sidecar files over the Archive and the reader.

Knows nothing of FUSE: :mod:`mastfs.fuse_adapter` adapts these calls to pyfuse3. The grammar of names is in
:mod:`mastfs.namespace`; metadata comes from the Archive (which owns the persistent cache and its TTLs);
bytes come from the ByteReader.

Contract:
- Inode numbers are stable per path: a path's number is a 63-bit hash of it (the same in every mount),
  probed past the live node of another path in the (never yet seen) case of a collision. ``/obs/X``
  and ``/program/P/X`` are different directories (the kernel must never see one directory under two
  names) but their files share one :class:`ProductRef`, hence one cache identity.
- Memory follows the kernel: the adapter reports every entry it hands out (:meth:`Tree.remember`),
  every FUSE forget (:meth:`Tree.forget`) and every closed listing (:meth:`Tree.release_listing`); a
  node neither the kernel nor an open listing holds is dropped (the last :data:`FORGOTTEN_KEPT` stay
  findable, in case the kernel asks again), and expired memos are swept, so listing a million files
  does not keep a million nodes once the kernel lets them go.
- Directory contents are memoised for :data:`MEMO_TTL` seconds (trio clock) so that a 3,000-file
  ``ls -l`` costs one Archive call, not one per lookup; the Archive decides when MAST is asked again.
- Every method raises only :mod:`mastfs.errors` types: NotFound/InvalidName for names that do not
  exist (invalid names before any I/O), Unauthorized, Unavailable, BadResponse, NoSuchAttribute,
  NotPermitted, ReadOnly.
- Everything runs on the trio thread; nothing here blocks.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import stat
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import trio

from . import namespace
from .errors import (
    InvalidName,
    MastfsError,
    NoSuchAttribute,
    NotFound,
    NotPermitted,
    Unauthorized,
    UnsupportedAttribute,
)
from .lru import LRU
from .singleflight import SingleFlight
from .versions import VersionChanged

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .blockcache import ProductRef
    from .config import Settings
    from .mast.models import Observation, Product
    from .mast.table import ProductTable
    from .reader import ReadStream

log = logging.getLogger(__name__)
T = TypeVar("T")
N = TypeVar("N", bound="Node")

ROOT_INODE = 1
FORGOTTEN_KEPT = 4096
"""How many nodes the kernel forgot stay findable by inode number (a safety margin, not a cache)."""
REFS_KEPT = 10_000
"""How many products' pinned ProductRefs (version, true size, S3 key) and true sizes are kept."""
PIN_TTL = 60.0
"""Seconds an open reuses the version the previous open of the same product pinned (the kernel keeps
attributes for as long); later opens, and every open after ``mastfs refresh`` or after a read found the
file changed, ask the server again (one HEAD)."""
MEMO_SWEEP_EVERY = 256
"""Expired memos are swept after this many new ones."""
MEMO_TTL = 60.0
"""Seconds a directory's contents are reused before the Archive is asked again; the FUSE adapter gives
the kernel the same time to reuse a name lookup or attributes without asking again."""
STAT_BLOCK_SIZE = 4096
"""st_blksize (the preferred I/O size) and the statfs block size. Small on purpose: Python (astropy) sizes
its read buffer by it, and a 128 KiB buffer turns a 2,880-byte FITS header read into a kernel read beyond
the cache's 64 KiB first block; ``cp``, ``cat`` and ``dd`` read at least 128 KiB whatever it says, and
the kernel reads ahead. Not the block cache's BLOCK_SIZE (4 MiB)."""
SIZE_RESOLVERS = 8
"""Most concurrent size look-ups (HEAD requests) when a listing holds products of unknown size."""
S3_LOOKUP_SPAN = 200
"""Opening a product looks up the S3 keys of this many neighbours in its directory at once (5
path_lookup requests), not of the whole directory (which may hold 300,000)."""

TOKEN_HELP = (
    "get a token at https://auth.mast.stsci.edu/token, then set MAST_API_TOKEN or the token_file "
    "setting (a file of mode 0600) and remount"
)


@dataclass(frozen=True)
class Attributes:
    """What ``stat`` shows of one node. ``mtime`` in unix seconds."""

    ino: int
    mode: int
    nlink: int
    size: int
    mtime: float
    uid: int
    gid: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True)
class FsStats:
    """What ``statfs`` (``df``) shows: sizes in blocks of ``block_size`` bytes."""

    block_size: int
    blocks: int
    blocks_free: int
    files: int
    name_max: int = namespace.NAME_MAX


class ArchiveView(Protocol):
    """What the tree needs of the metadata layer (:class:`mastfs.archive.Archive`): cached MAST answers;
    each raises NotFound, Unauthorized, Unavailable or BadResponse."""

    async def program(self, pid: str, /) -> list[Observation]: ...
    async def observation(self, obs_id: str, /) -> Observation: ...
    async def products(self, obs: Observation, /) -> ProductTable: ...
    async def target(self, name: str, /) -> list[Observation]: ...
    async def cone(self, ra: float, dec: float, radius: float, /) -> list[Observation]: ...
    async def resolved_size(self, product: Product, /) -> int | None: ...
    async def s3_keys(self, products: Iterable[Product], /) -> dict[str, str | None]: ...
    async def known_programs(self) -> list[str]: ...
    async def forget(self, kind: str, ident: str, /) -> None: ...
    async def forget_all(self) -> None: ...


class BytesView(Protocol):
    """What the tree needs of the byte layer (:class:`mastfs.reader.ByteReader`): the version a product is
    at now, verified bytes of it through a per-handle stream, and where they come from."""

    async def pin(self, ref: ProductRef, /) -> ProductRef: ...
    def open_stream(self, ref: ProductRef, /) -> ReadStream: ...
    async def read_view(self, stream: ReadStream, offset: int, length: int, /) -> bytes | memoryview: ...
    def source_of(self, ref: ProductRef, /) -> str | None: ...


class Content:
    """The bytes of a virtual file, made at once (``Content(data)``) or part by part on demand
    (``Content.parts(count, render)``: ``render(i)`` makes part ``i``), so a products.csv of 300,000 rows
    is never held whole. Parts are rendered once to learn the size; a read renders only the parts it
    covers (the last one rendered is kept)."""

    def __init__(self, data: bytes = b"", *, count: int = 0,
                 render: Callable[[int], bytes] | None = None) -> None:
        self._render = render or (lambda _part: data)
        self._count = count if render is not None else 1
        self._ends: list[int] | None = None
        self._last: tuple[int, bytes] | None = None

    @classmethod
    def parts(cls, count: int, render: Callable[[int], bytes]) -> Content:
        return cls(count=count, render=render)

    def _part(self, number: int) -> bytes:
        if self._last is None or self._last[0] != number:
            self._last = (number, self._render(number))
        return self._last[1]

    @property
    def size(self) -> int:
        if self._ends is None:
            total, ends = 0, []
            for number in range(self._count):
                total += len(self._part(number))
                ends.append(total)
            self._ends = ends
        return self._ends[-1] if self._ends else 0

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end)."""
        if self.size == 0 or length <= 0:
            return b""
        assert self._ends is not None
        pieces = []
        number = bisect.bisect_right(self._ends, offset)
        while length > 0 and number < self._count:
            start = self._ends[number - 1] if number else 0
            piece = self._part(number)[offset - start:offset - start + length]
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
            number += 1
        return b"".join(pieces)


@dataclass
class OpenFile:
    """One open file handle: virtual content, or a product read through the ByteReader's stream."""

    node: Node
    content: Content | None = None
    ref: ProductRef | None = None
    stream: ReadStream | None = None
    changed: bool = False  # this open found another version or size than the kernel was shown


@dataclass
class _Memo:
    value: Any
    expires: float


# ------------------------------------------------------------------------------------------------ nodes


class Node:
    """One path of the tree. Subclasses say whether they are directories and what they hold, and keep
    their path (:class:`PathNode`) or make it when asked (:class:`ProductFile`). Nodes use slots: a
    listing of 300,000 files holds 300,000 of them."""

    __slots__ = ("ino", "kernel_refs", "listings")
    ino: int
    kernel_refs: int
    """References the kernel holds (lookups and readdirplus entries not yet forgotten)."""
    listings: int
    """Open listings (:meth:`Tree.listdir` until :meth:`Tree.release_listing`) holding this node."""
    is_dir = False

    @property
    def path(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def path_text(self) -> str:
        return "/" + "/".join(self.path)

    def same_as(self, other: Node) -> bool:
        """Whether ``other`` (a fresh node for the same path) shows the same thing, so this one may stay."""
        return type(other) is type(self)

    def mtime(self, tree: Tree) -> float:
        return tree.mount_time

    async def size(self, tree: Tree) -> int:
        return 0

    def mode(self, tree: Tree) -> int:
        return stat.S_IFDIR | 0o555 if self.is_dir else stat.S_IFREG | 0o444

    def nlink(self) -> int:
        # 1 for a directory means "subdirectory count unknown" to find/fts, which then never skips one.
        return 1

    def xattrs(self, tree: Tree) -> dict[str, bytes]:
        return {}


class PathNode(Node):
    """A node that keeps its path (every kind but product files, which are many)."""

    __slots__ = ("_path",)

    def __init__(self, ino: int, path: tuple[str, ...]) -> None:
        self.ino = ino
        self.kernel_refs = self.listings = 0
        self._path = path

    @property
    def path(self) -> tuple[str, ...]:
        return self._path


class DirNode(PathNode):
    """A directory: ``entries`` lists it, ``child`` looks one name up (validated first, before any I/O),
    ``children`` gives its nodes in display order."""

    __slots__ = ()
    is_dir = True

    async def entries(self, tree: Tree) -> dict[str, Node]:
        raise NotImplementedError

    async def children(self, tree: Tree) -> list[Node]:
        return list((await self.entries(tree)).values())

    async def child(self, tree: Tree, name: str) -> Node:
        namespace.check_component(name)
        entry = (await self.entries(tree)).get(name)
        if entry is None:
            raise NotFound(f"{self.path_text}/{name}")
        return entry


class RootDir(DirNode):
    __slots__ = ()

    def nlink(self) -> int:
        return 2 + len(namespace.TOP_DIRECTORIES)

    async def entries(self, tree: Tree) -> dict[str, Node]:
        entries: dict[str, Node] = {
            namespace.README_NAME: tree.intern(ReadmeFile, (namespace.README_NAME,)),
        }
        for name in namespace.TOP_DIRECTORIES:
            entries[name] = tree.intern(TopDir, (name,))
        return entries


class GeneratedFile(PathNode):
    """A file whose bytes mastfs makes itself (README, sidecars, planned.csv), not a product:
    :meth:`content` is its bytes, its size their length."""

    __slots__ = ()

    async def content(self, tree: Tree) -> Content:
        raise NotImplementedError

    async def size(self, tree: Tree) -> int:
        return (await self.content(tree)).size


class ReadmeFile(GeneratedFile):
    __slots__ = ()

    async def content(self, tree: Tree) -> Content:
        return Content(tree.readme)


class TopDir(DirNode):
    """``/program``, ``/obs``, ``/target``, ``/cone``: any valid name can be looked up; listing shows
    what was seen (programs: also those in the metadata cache)."""

    __slots__ = ()

    async def entries(self, tree: Tree) -> dict[str, Node]:
        kind = self.path[0]
        names = set(tree.seen[kind])
        if kind == "program":
            names.update(await tree.archive.known_programs())
        order = (lambda n: (len(n), n)) if kind == "program" else str
        entries: dict[str, Node] = {}
        for name in sorted(names, key=order):
            # Names seen in this mount have nodes; other programs come from the metadata cache.
            entries[name] = tree.existing((kind, name)) or tree.intern(ProgramDir, (kind, name))
        return entries

    async def child(self, tree: Tree, name: str) -> Node:
        kind = self.path[0]
        path = (kind, name)
        if kind == "program":
            namespace.parse_program_id(name)
            program = tree.intern(ProgramDir, path)
            await program.entries(tree)  # an unknown program is ENOENT, not an empty directory
            node: Node = program
        elif kind == "obs":
            namespace.parse_obs_id(name)
            observation = await tree.archive.observation(name)
            if namespace.is_planned(observation, tree.mjd_now()):
                tree.log_once(("planned", name), logging.INFO,
                              "%s is a planned observation (not executed yet): it has no products", name)
                raise NotFound(f"{name} is planned, not executed yet")
            node = tree.intern(ObservationDir, path, observation)
        elif kind == "target":
            namespace.parse_target_name(name)
            query = tree.intern(QueryDir, path)
            await query.entries(tree)
            node = query
        else:
            namespace.parse_cone(name)
            query = tree.intern(QueryDir, path)
            await query.entries(tree)
            node = query
        tree.seen[kind].add(name)
        return node


class ObservationListDir(DirNode):
    """A directory of observation directories, named by obs_id, from one Archive query. Planned
    observations (not executed yet, no products) are left out and named in ``planned.csv``."""

    __slots__ = ()

    async def observations(self, tree: Tree) -> list[Observation]:
        raise NotImplementedError

    async def entries(self, tree: Tree) -> dict[str, Node]:
        return await tree.memoised(self.path, lambda: self._load(tree))

    async def _load(self, tree: Tree) -> dict[str, Node]:
        entries: dict[str, Node] = {}
        planned = []
        now = tree.mjd_now()
        for observation in await self.observations(tree):
            name = observation.obs_id
            if namespace.is_planned(observation, now):
                planned.append(observation)
                continue
            try:
                namespace.parse_obs_id(name)
            except InvalidName:
                log.warning("observation id %r cannot be a file name; not shown in %s", name, self.path_text)
                continue
            entries.setdefault(name, tree.intern(ObservationDir, (*self.path, name), observation))
        if planned:
            entries[namespace.PLANNED_SIDECAR] = tree.intern(
                PlannedFile, (*self.path, namespace.PLANNED_SIDECAR), namespace.planned_csv(planned))
        return entries


class ProgramDir(ObservationListDir):
    __slots__ = ()

    async def observations(self, tree: Tree) -> list[Observation]:
        observations = await tree.archive.program(self.path[1])
        if not observations:
            raise NotFound(f"program {self.path[1]} has no observations in {', '.join(tree.collections)}")
        return observations


class QueryDir(ObservationListDir):
    """``/target/<name>`` or ``/cone/<ra>,<dec>[,<r>]``."""

    __slots__ = ()

    async def observations(self, tree: Tree) -> list[Observation]:
        kind, name = self.path[0], self.path[1]
        if kind == "target":
            try:
                return await tree.archive.target(name)
            except NotFound:
                tree.log_once(("target", name), logging.INFO, "target %r does not resolve to a position", name)
                raise
        cone = namespace.parse_cone(name)
        return await tree.archive.cone(cone.ra, cone.dec, cone.radius)


@dataclass(frozen=True)
class _ObservationContents:
    """An observation directory's products (a packed ProductTable), where each is shown, and the
    content of products.csv (made part by part when read). Held by its memo and by the file nodes of
    its groups (through :class:`GroupFiles`); gone with the last of them."""

    products: ProductTable
    placement: namespace.Placement
    products_csv: Content
    group_files: dict[str, GroupFiles] = field(default_factory=dict)
    """Group name -> what the file nodes of that group share (made when the group is first listed)."""


class GroupFiles:
    """What every file node of one group directory shares: the directory, the observation's contents
    (product table, placement) and the sizes looked up for rows that state none (by slot)."""

    __slots__ = ("group_dir", "contents", "names", "resolved")

    def __init__(self, group_dir: GroupDir, contents: _ObservationContents, names: namespace.NameList) -> None:
        self.group_dir = group_dir
        self.contents = contents
        self.names = names
        self.resolved: dict[int, int] = {}


class ObservationDir(DirNode):
    __slots__ = ("observation", "_shown")

    def __init__(self, ino: int, path: tuple[str, ...], observation: Observation) -> None:
        super().__init__(ino, path)
        self.observation = observation
        self._shown: weakref.ref[_ObservationContents] | None = None
        """The contents loaded last, while anything (the memo, a file node) still holds them."""

    def same_as(self, other: Node) -> bool:
        return isinstance(other, ObservationDir) and other.observation == self.observation

    def mtime(self, tree: Tree) -> float:
        return observation_mtime(self.observation, tree.mount_time)

    def xattrs(self, tree: Tree) -> dict[str, bytes]:
        values = namespace.field_xattrs(self.observation.fields)
        date = namespace.observation_date(self.observation)
        if date is not None:
            values[namespace.OWN_XATTR_PREFIX + "observation_date"] = date.encode()
        return values

    async def contents(self, tree: Tree) -> _ObservationContents:
        return await tree.memoised(self.path, lambda: self._load(tree))

    async def _load(self, tree: Tree) -> _ObservationContents:
        """The contents from the Archive; the very contents loaded before when the rows are the same (so
        the file nodes the kernel holds keep theirs, and a second layout is neither made nor kept)."""
        products = await tree.archive.products(self.observation)
        shown = self._shown() if self._shown is not None else None
        if shown is not None and shown.products == products:
            return shown
        placement = namespace.place_products(products.projected(namespace.PLACEMENT_FIELDS))
        columns = list(products.columns)
        date = namespace.observation_date(self.observation)

        def render(part: int) -> bytes:
            if part == 0:
                return namespace.products_csv_header(columns)
            values = products.chunk_columns(part - 1, columns)
            first = products.chunk_start(part - 1)
            return namespace.products_csv_rows(values, [placement.path(first + i) for i in range(len(values[0]))], date)

        contents = _ObservationContents(products, placement, Content.parts(1 + products.chunk_count, render))
        self._shown = weakref.ref(contents)
        return contents

    async def entries(self, tree: Tree) -> dict[str, Node]:
        contents = await self.contents(tree)
        entries: dict[str, Node] = {}
        for group in contents.placement.groups:
            entries[group] = tree.intern(GroupDir, (*self.path, group), self)
        if contents.placement.recommended:
            entries[namespace.RECOMMENDED_DIR] = tree.intern(RecommendedDir, (*self.path, namespace.RECOMMENDED_DIR),
                                                             self)
        for name in namespace.SIDECARS:
            entries[name] = tree.intern(SidecarFile, (*self.path, name), self)
        return entries

    async def child(self, tree: Tree, name: str) -> Node:
        namespace.check_component(name)
        if name in namespace.SIDECARS:  # known without listing the products
            return tree.intern(SidecarFile, (*self.path, name), self)
        return await super().child(tree, name)


class InObservation(Node):
    """Mixin of the nodes inside an observation directory (its subdirectories and sidecars): they have
    the observation's time and stay the same nodes while the observation directory does."""

    __slots__ = ()
    observation_dir: ObservationDir

    def same_as(self, other: Node) -> bool:
        return (isinstance(other, InObservation) and type(other) is type(self)
                and other.observation_dir is self.observation_dir)

    def mtime(self, tree: Tree) -> float:
        return self.observation_dir.mtime(tree)


class ObservationSubdir(InObservation, DirNode):
    """A directory inside an observation directory (a group, ``recommended/``)."""

    __slots__ = ("observation_dir",)

    def __init__(self, ino: int, path: tuple[str, ...], observation_dir: ObservationDir) -> None:
        super().__init__(ino, path)
        self.observation_dir = observation_dir

    def nlink(self) -> int:
        return 2


class GroupDir(ObservationSubdir):
    """``level2/``, ``auxiliary/`` ...: the products of one group of an observation. Its file nodes are
    made as they are listed or looked up, not kept here (one listing may hold 300,000)."""

    __slots__ = ()

    async def _files(self, tree: Tree) -> GroupFiles:
        """What this group's file nodes share (the observation's product table, this group's file
        names with their row indices). Raises NotFound when the group is gone after a refresh."""
        contents = await self.observation_dir.contents(tree)
        files = contents.group_files.get(self.name)
        if files is None or files.group_dir is not self:
            names = contents.placement.groups.get(self.name)
            if names is None:
                raise NotFound(f"{self.path_text} no longer exists")
            files = contents.group_files[self.name] = GroupFiles(self, contents, names)
        return files

    async def children(self, tree: Tree) -> list[Node]:
        files = await self._files(tree)
        return [tree.intern(ProductFile, (*self.path, name), files, slot) for slot, name in enumerate(files.names)]

    async def child(self, tree: Tree, name: str) -> Node:
        namespace.check_component(name)
        files = await self._files(tree)
        slot = files.names.find(name)
        if slot is None:
            raise NotFound(f"{self.path_text}/{name}")
        return tree.intern(ProductFile, (*self.path, name), files, slot)

    async def s3_key(self, tree: Tree, slot: int, uri: str) -> tuple[str | None, bool]:
        """(S3 key or None, settled) of the file in ``slot`` with dataURI ``uri``. The keys of its stretch of
        this directory (:data:`S3_LOOKUP_SPAN` names, so a small directory is one stretch) are looked up
        in one Archive call and memoised (under a key no real path can have: names never contain NUL).
        When the look-up said nothing about ``uri`` (it failed), settled is False and the memo goes, so
        the next open asks again."""
        files = await self._files(tree)
        table, names = files.contents.products, files.names
        stretch = slot // S3_LOOKUP_SPAN
        memo_key = (*self.path, "\0s3", str(stretch))

        async def lookup() -> dict[str, str | None]:
            span = names.indices[stretch * S3_LOOKUP_SPAN:(stretch + 1) * S3_LOOKUP_SPAN]
            return dict(await tree.archive.s3_keys([table[index] for index in span]))

        keys = await tree.memoised(memo_key, lookup)
        if uri not in keys:
            tree.forget_memos(memo_key)
            return None, False
        return keys[uri], True


class RecommendedDir(ObservationSubdir):
    """``recommended/``: the observation's "Minimum Recommended Products", as the very nodes (inodes,
    cache identity) of their files in the level and group directories."""

    __slots__ = ()

    async def entries(self, tree: Tree) -> dict[str, Node]:
        """Name -> the ProductFile node of the same product in its group directory. Raises NotFound when
        the view is gone after a refresh."""
        observation_dir = self.observation_dir
        placement = (await observation_dir.contents(tree)).placement
        if not placement.recommended:
            raise NotFound(f"{self.path_text} no longer exists")
        entries: dict[str, Node] = {}
        for name, index in placement.recommended.items():
            group_name, file_name = placement.path(index).split("/", 1)  # recommended products are shown
            group_dir = tree.intern(GroupDir, (*observation_dir.path, group_name), observation_dir)
            entries[name] = await group_dir.child(tree, file_name)
        return entries


class SidecarFile(InObservation, GeneratedFile):
    """``observation.json`` or ``products.csv`` of an observation directory."""

    __slots__ = ("observation_dir",)

    def __init__(self, ino: int, path: tuple[str, ...], observation_dir: ObservationDir) -> None:
        super().__init__(ino, path)
        self.observation_dir = observation_dir

    async def content(self, tree: Tree) -> Content:
        if self.name == namespace.OBSERVATION_SIDECAR:
            return Content(namespace.observation_json(self.observation_dir.observation))
        return (await self.observation_dir.contents(tree)).products_csv


class PlannedFile(GeneratedFile):
    """``planned.csv`` of a program, target or cone directory: the planned observations left out."""

    __slots__ = ("text",)

    def __init__(self, ino: int, path: tuple[str, ...], text: bytes) -> None:
        super().__init__(ino, path)
        self.text = text

    def same_as(self, other: Node) -> bool:
        return isinstance(other, PlannedFile) and other.text == self.text

    async def content(self, tree: Tree) -> Content:
        return Content(self.text)


class ProductFile(Node):
    """One product: name ``slot`` of its group's NameList, row ``index`` of its observation's
    ProductTable, decoded only when its fields are needed (size and rights come packed). Holds nothing
    but its number, its slot and what its group's files share: name, path and row are made when asked
    for (a listing may hold 300,000 of these; each costs about 150 bytes with its two numbers)."""

    __slots__ = ("files", "slot")

    def __init__(self, ino: int, path: tuple[str, ...], files: GroupFiles, slot: int) -> None:
        self.ino = ino
        self.kernel_refs = self.listings = 0
        self.files = files
        self.slot = slot

    @property
    def path(self) -> tuple[str, ...]:
        return (*self.group_dir.path, self.name)

    @property
    def name(self) -> str:
        return self.files.names[self.slot]

    @property
    def group_dir(self) -> GroupDir:
        return self.files.group_dir

    @property
    def table(self) -> ProductTable:
        return self.files.contents.products

    @property
    def index(self) -> int:
        return self.files.names.indices[self.slot]

    @property
    def resolved_size(self) -> int | None:
        """The size the row states, else the one looked up (None: not yet)."""
        size = self.table.size(self.index)
        return size if size is not None else self.files.resolved.get(self.slot)

    @property
    def observation_dir(self) -> ObservationDir:
        return self.group_dir.observation_dir

    @property
    def product(self) -> Product:
        return self.table[self.index]

    def same_as(self, other: Node) -> bool:
        if not isinstance(other, ProductFile):
            return False
        if other.table is self.table:
            return other.index == self.index
        return other.product == self.product

    @property
    def exclusive(self) -> bool:
        if not self.table.rights_stated(self.index):  # older rows: the observation's rights apply
            return bool(self.observation_dir.observation.is_exclusive)
        return self.table.exclusive(self.index)

    def mode(self, tree: Tree) -> int:
        if self.exclusive:  # the token, and so the bytes it brings, are the mounting user's alone
            return stat.S_IFREG | (0o400 if tree.has_token else 0o000)
        return stat.S_IFREG | 0o444

    def _learned(self, tree: Tree) -> tuple[int, float | None] | None:
        """(true size, Last-Modified) an open in this mount learned of the product; its row is not
        decoded while nothing was learned of any product (a listing's stat of 300,000 files)."""
        return tree.truths.get(self.product.data_uri) if tree.truths else None

    def mtime(self, tree: Tree) -> float:
        learned = self._learned(tree)
        if learned is not None and learned[1] is not None:
            return learned[1]
        return self.observation_dir.mtime(tree)

    async def size(self, tree: Tree) -> int:
        learned = self._learned(tree)
        if learned is not None:
            return learned[0]
        if self.resolved_size is None:
            product = self.product
            size = await tree.archive.resolved_size(product)
            if size is None:
                tree.log_once(("size", product.data_uri), logging.WARNING,
                              "MAST states no size for %s; it is shown empty", product.data_uri)
            self.files.resolved[self.slot] = size or 0
            return size or 0
        return self.resolved_size

    def xattrs(self, tree: Tree) -> dict[str, bytes]:
        product = self.product
        values = namespace.field_xattrs(product.fields)
        own = namespace.OWN_XATTR_PREFIX
        values[own + "uri"] = product.data_uri.encode()
        values[own + "kind"] = namespace.product_kind(product).encode()
        date = namespace.observation_date(self.observation_dir.observation)
        if date is not None:
            values[own + "observation_date"] = date.encode()
        ref = tree.refs.peek(product.data_uri)
        if ref is not None:  # opened in this mount: the S3 key question is settled
            source = tree.reader.source_of(ref)  # the reader's own decision, so the xattr tells the truth
            if source is not None:
                values[own + "source"] = source.encode()
            if ref.version is not None and ref.version.etag:
                values[own + "etag"] = ref.version.etag.encode()
        values[own + "cached_bytes"] = str(tree.cached_bytes(product.data_uri)).encode()
        return values


def observation_mtime(observation: Observation, fallback: float) -> float:
    """Unix time of ``t_obs_release`` (else ``t_max``) of an observation; ``fallback`` when both are null."""
    for mjd in (observation.t_obs_release, observation.t_max):
        unix = namespace.mjd_to_unix(mjd)
        if unix is not None:
            return unix
    return fallback


# ------------------------------------------------------------------------------------------------- tree


@dataclass(frozen=True)
class PrefetchCandidate:
    """A product file a prefetch would warm (:meth:`Tree.prefetch_candidates`): its ``path`` inside the
    mount, ``size`` in bytes, the ``file`` to hand to :meth:`Tree.product_ref`, and ``refusal``: why its
    bytes cannot be fetched (exclusive-access data without a token), else None."""

    path: str
    size: int
    file: ProductFile
    refusal: str | None


class Tree:
    """The filesystem model. Build once per mount; see the module docstring for the contract.

    archive: the Archive (``program``, ``observation``, ``products``, ``target``, ``cone``, ``s3_keys``,
    ``resolved_size``, ``known_programs``, ``forget``). reader: the ByteReader (``open_stream``,
    ``read``). ``product_ref(uri=, size=, s3_key=, exclusive=)`` makes a ProductRef; ``cache_usage()``
    returns ``(used_bytes, limit_bytes)`` of the block cache (for statfs); ``cached_bytes(uri)`` how much
    of a product it holds.
    """

    def __init__(
        self,
        archive: ArchiveView,
        reader: BytesView,
        settings: Settings,
        *,
        has_token: bool,
        product_ref: Callable[..., ProductRef],
        cache_usage: Callable[[], tuple[int, int]],
        cached_bytes: Callable[[str], int],
    ) -> None:
        self.archive = archive
        self.reader = reader
        self.settings = settings
        self.has_token = has_token
        self.collections = list(settings.collections)
        self.uid = settings.uid if settings.uid is not None else os.getuid()
        self.gid = settings.gid if settings.gid is not None else os.getgid()
        self.mount_time = time.time()
        self.readme = namespace.README_TEXT.encode()
        self.seen: dict[str, set[str]] = {name: set() for name in namespace.TOP_DIRECTORIES}
        self.refs: LRU[str, ProductRef] = LRU(REFS_KEPT)
        """dataURI -> pinned ProductRef of products opened lately (at most REFS_KEPT, least recent out first)."""
        self.truths: LRU[str, tuple[int, float | None]] = LRU(REFS_KEPT)
        """dataURI -> (true size, Last-Modified) the server stated at the latest pin (at most REFS_KEPT)."""
        self._pinned_at: dict[str, float] = {}
        self.make_ref = product_ref
        self._cache_usage = cache_usage
        self.cached_bytes = cached_bytes
        self._nodes: dict[int, Node] = {ROOT_INODE: RootDir(ROOT_INODE, ())}
        self._kernel_held = 0  # nodes with kernel_refs
        self._listed = 0  # nodes with listings
        self._forgotten: LRU[int, Node] = LRU(FORGOTTEN_KEPT)
        self._memos: dict[tuple[str, ...], _Memo] = {}
        self._memos_added = 0
        self._flights: SingleFlight[tuple[str, ...], Any] = SingleFlight()
        self._handles: dict[int, OpenFile] = {}
        self._next_handle = 1
        self._logged: set[Any] = set()

    # ---------------------------------------------------------------------------- inodes and memos

    def intern(self, cls: Callable[..., N], path: tuple[str, ...], *args: Any) -> N:
        """The node for ``path``: the one the kernel knows when it shows the same thing, else a fresh
        one with the same inode number (a path's number never changes). Only handing a node to the
        kernel (:meth:`lookup`, :meth:`listdir`) registers it under its number."""
        ino = self._ino_of(path)
        fresh = cls(ino, path, *args)
        existing = self._nodes.get(ino) or self._forgotten.peek(ino)
        if isinstance(existing, type(fresh)) and existing.same_as(fresh):
            return existing
        return fresh

    def _ino_of(self, path: tuple[str, ...]) -> int:
        if not path:
            return ROOT_INODE
        text = "/".join(path).encode("utf-8", "surrogateescape")
        while True:
            ino = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
            holder = self._nodes.get(ino) or self._forgotten.peek(ino)
            if ino > ROOT_INODE and (holder is None or holder.path == path):
                return ino
            text += b"\0"  # taken by another path (or the root's number): probe on

    def existing(self, path: tuple[str, ...]) -> Node | None:
        node = self._nodes.get(self._ino_of(path))
        return node if node is not None and node.path == path else None

    def node(self, ino: int) -> Node:
        """The node of inode ``ino`` (one the kernel forgot lately is taken back). Raises NotFound for
        numbers not handed out or forgotten long ago."""
        node = self._nodes.get(ino)
        if node is None:
            node = self._forgotten.peek(ino)
            if node is None:
                raise NotFound(f"no inode {ino}")
            self._hand_out(node)
        return node

    def _hand_out(self, node: Node) -> None:
        """Register ``node`` under its number: the kernel is about to know it. A fresh node for a path
        whose number is registered takes over the holds on that number."""
        held = self._nodes.get(node.ino)
        if held is not None and held is not node:
            node.kernel_refs, node.listings = held.kernel_refs, held.listings
        self._nodes[node.ino] = node
        self._forgotten.pop(node.ino)

    def remember(self, ino: int) -> None:
        """The kernel took one more reference to ``ino`` (a readdirplus entry of :meth:`listdir`;
        :meth:`lookup` counts itself): its node stays until as many are forgotten."""
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        if not node.kernel_refs:
            self._kernel_held += 1
        node.kernel_refs += 1

    def release_listing(self, inos: list[int]) -> None:
        """A listing of :meth:`listdir` is done (closed): its entries the kernel holds no reference to,
        and no other open listing holds, leave memory."""
        for ino in inos:
            node = self._nodes.get(ino)
            if node is not None and node.listings:
                node.listings -= 1
                if not node.listings:
                    self._listed -= 1
                    self._let_go(node)

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references to ``ino``; at none left (and in no open listing),
        its node goes."""
        node = self._nodes.get(ino)
        if node is not None and node.kernel_refs:
            node.kernel_refs = max(0, node.kernel_refs - count)
            if not node.kernel_refs:
                self._kernel_held -= 1
                self._let_go(node)

    def _let_go(self, node: Node) -> None:
        """With no hold of any kind left, ``node`` leaves the inode table (the last FORGOTTEN_KEPT gone
        stay findable)."""
        if node.ino != ROOT_INODE and not node.kernel_refs and not node.listings:
            del self._nodes[node.ino]
            self._forgotten.put(node.ino, node)

    def compact(self) -> None:
        """Re-make the inode table at its present size: a dict keeps the table of its largest size, so
        300,000 inodes the kernel forgot would go on costing some 10 MB."""
        self._nodes = dict(self._nodes)

    def stats(self) -> dict[str, int]:
        """Sizes of what the tree holds in memory: live nodes, nodes the kernel references, memos and the
        product rows of the observations they hold (what a big listing's layout weighs)."""
        memo_rows = sum(len(memo.value.products) for memo in self._memos.values()
                        if isinstance(memo.value, _ObservationContents))
        return {"nodes": len(self._nodes), "kernel_inodes": self._kernel_held, "listed": self._listed,
                "memos": len(self._memos), "memo_rows": memo_rows, "forgotten_kept": len(self._forgotten)}

    async def memoised(self, key: tuple[str, ...], load: Callable[[], Awaitable[T]]) -> T:
        """The memoised value for ``key`` while fresh (MEMO_TTL), else the result of ``await load()``.

        Single flight: concurrent callers for one key share one ``load()`` and its value or error.
        Errors are not memoised.
        """
        memo = self._memos.get(key)
        if memo is not None and memo.expires > trio.current_time():
            return cast(T, memo.value)
        return cast(T, await self._flights.run(key, lambda: self._load_memo(key, load)))

    async def _load_memo(self, key: tuple[str, ...], load: Callable[[], Awaitable[T]]) -> T:
        value = await load()
        self._memos[key] = _Memo(value, trio.current_time() + MEMO_TTL)
        self._memos_added += 1
        if self._memos_added % MEMO_SWEEP_EVERY == 0:
            self.sweep_memos()
        return value

    def sweep_memos(self) -> None:
        """Drop the memoised directory contents that expired, and the forgotten file nodes of observations
        no memo holds any more (they would keep the observation's product table and layout)."""
        now = trio.current_time()
        expired = [key for key, memo in self._memos.items() if memo.expires <= now]
        for key in expired:
            del self._memos[key]
        if expired:
            held = {id(memo.value) for memo in self._memos.values()}
            for ino in [ino for ino, node in self._forgotten.items()
                        if isinstance(node, ProductFile) and id(node.files.contents) not in held]:
                self._forgotten.pop(ino)

    def forget_memos(self, prefix: tuple[str, ...]) -> int:
        """Drop memoised contents at and below ``prefix``; returns how many were dropped."""
        doomed = [key for key in self._memos if key[: len(prefix)] == prefix]
        for key in doomed:
            del self._memos[key]
        return len(doomed)

    @staticmethod
    def mjd_now() -> float:
        """Now as a Modified Julian Date (to tell planned observations)."""
        return time.time() / 86400.0 + namespace.MJD_UNIX_EPOCH

    def log_once(self, key: Any, level: int, message: str, *args: Any) -> None:
        """Log ``message`` the first time ``key`` is seen in this mount, at DEBUG afterwards."""
        first = key not in self._logged
        self._logged.add(key)
        log.log(level if first else logging.DEBUG, message, *args)

    # ------------------------------------------------------------------------------ namespace ops

    async def lookup(self, parent_ino: int, name: str) -> Attributes:
        """Attributes of ``name`` in directory ``parent_ino`` (``.`` and ``..`` included), for the
        kernel's LOOKUP: the node is handed out and the reference counted (see :meth:`forget`)."""
        node = await self._child(self.node(parent_ino), name)
        attributes = await self.attributes(node)
        self._hand_out(node)
        self.remember(node.ino)
        return attributes

    async def dot_entries(self, ino: int) -> list[tuple[str, Attributes]]:
        """``.`` and ``..`` of directory ``ino`` for a listing (not counted: the kernel takes no
        reference to them from a readdirplus)."""
        directory = self.node(ino)
        return [(name, await self.attributes(await self._child(directory, name))) for name in (".", "..")]

    async def _child(self, parent: Node, name: str) -> Node:
        if not isinstance(parent, DirNode):
            raise NotFound(f"{parent.path_text} is not a directory")
        if name == ".":
            return parent
        if name == "..":
            return self.existing(parent.path[:-1]) or await self.resolve_path("/".join(parent.path[:-1]))
        return await parent.child(self, name)

    async def getattr(self, ino: int) -> Attributes:
        return await self.attributes(self.node(ino))

    async def attributes(self, node: Node) -> Attributes:
        return Attributes(
            ino=node.ino, mode=node.mode(self), nlink=node.nlink(), size=await node.size(self),
            mtime=node.mtime(self), uid=self.uid, gid=self.gid,
        )

    async def listdir(self, ino: int) -> list[Node]:
        """Every entry of directory ``ino`` as :meth:`children_of` gives them. The nodes stay until
        :meth:`release_listing` with their numbers (or the kernel's forget)."""
        children = await self.children_of(self.node(ino))
        for child in children:  # held until release_listing; counted as readdir hands each out
            self._hand_out(child)
            if not child.listings:
                self._listed += 1
            child.listings += 1
        return children

    async def children_of(self, node: Node) -> list[Node]:
        """Every entry of directory ``node`` in display order (``node.name`` its name, :meth:`attributes`
        what readdirplus shows). Sizes missing from product rows are resolved concurrently (at most
        :data:`SIZE_RESOLVERS` at a time), each once, so attributes need no further request. Nothing is
        handed out: the caller decides whether the kernel gets to know the nodes.
        """
        if not isinstance(node, DirNode):
            raise NotFound(f"{node.path_text} is not a directory")
        children = await node.children(self)
        unresolved = [n for n in children if isinstance(n, ProductFile) and n.resolved_size is None]
        if unresolved:
            await self._resolve_sizes(unresolved)
        for child in children:
            await child.size(self)  # sidecars made now, so handing out attributes costs no wait
        return children

    async def _resolve_sizes(self, files: list[ProductFile]) -> None:
        limiter = trio.CapacityLimiter(SIZE_RESOLVERS)

        async def resolve(file: ProductFile) -> None:
            async with limiter:
                await file.size(self)

        async with trio.open_nursery() as nursery:
            for file in files:
                nursery.start_soon(resolve, file)

    async def resolve_path(self, path: str) -> Node:
        """The node at an absolute path inside the mount (``/program/2733``)."""
        node = self._nodes[ROOT_INODE]
        for part in (p for p in path.split("/") if p):
            node = await self._child(node, part)
        return node

    # ----------------------------------------------------------------------------------- file I/O

    async def open(self, ino: int) -> int:
        """Open file ``ino`` for reading; returns a handle number for :meth:`read` and :meth:`release`.

        Raises Unauthorized (with one log line saying how to get a token) for exclusive-access products
        when no token is configured.
        """
        handle = await self.open_node(self.node(ino))
        number = self._next_handle
        self._next_handle += 1
        self._handles[number] = handle
        return number

    async def open_node(self, node: Node, **stream_options: Any) -> OpenFile:
        """An :class:`OpenFile` of ``node`` (not registered as a handle: for callers that keep it
        themselves); ``stream_options`` go to the reader's ``open_stream``. Raises NotPermitted for a
        directory, Unauthorized like :meth:`open`."""
        if isinstance(node, DirNode):
            raise NotPermitted(f"{node.path_text} is a directory")
        if isinstance(node, GeneratedFile):
            return OpenFile(node, content=await node.content(self))
        assert isinstance(node, ProductFile)
        if node.exclusive and not self.has_token:
            self.log_once(("token", node.product.data_uri), logging.WARNING,
                          "%s is exclusive-access data: %s", node.path_text, TOKEN_HELP)
            raise Unauthorized(f"{node.path_text} is exclusive-access data", reason=TOKEN_HELP)
        shown = self.truths.get(node.product.data_uri)
        try:
            ref = await self.product_ref(node)
        except Unauthorized as exc:  # MAST refused the token (expired, or no access to these data)
            self._log_refused(node, exc)
            raise
        changed = shown is None or shown != self.truths.get(node.product.data_uri)
        return OpenFile(node, ref=ref, stream=self.reader.open_stream(ref, **stream_options), changed=changed)

    async def product_ref(self, node: ProductFile, *, fresh: bool = False) -> ProductRef:
        """The pinned ProductRef of the node's dataURI (shared by every observation listing it): the
        version and true size the server states (:meth:`ByteReader.pin`), reused for PIN_TTL seconds
        unless ``fresh``. The S3 key is looked up (once per stretch of its directory) unless ``--source
        http``; when that look-up failed the ref reads over HTTPS and is not kept, so the next open asks
        for the key again. A true size other than the row's is logged (WARNING, once per product) and
        shown from now on."""
        uri = node.product.data_uri
        ref = self.refs.get(uri)
        if ref is not None and not fresh and time.monotonic() - self._pinned_at.get(uri, -PIN_TTL) < PIN_TTL:
            return ref
        s3_key, settled = None, True
        if self.settings.source != "http":
            s3_key, settled = await node.group_dir.s3_key(self, node.slot, uri)
        base = self.make_ref(uri=uri, size=node.product.size or 0, s3_key=s3_key, exclusive=node.exclusive)
        pinned = await self.reader.pin(base)
        if ref is not None and ref.version_key != pinned.version_key:
            log.warning("%s changed on MAST (now %d bytes, version %s); new opens read the new version",
                        uri, pinned.size, pinned.version.tag if pinned.version else "?")
        listed = node.product.size
        if listed is not None and listed != pinned.size:
            self.log_once(("true-size", uri, pinned.size), logging.WARNING,
                          "MAST lists %s as %d bytes but the server has %d; showing %d", uri, listed,
                          pinned.size, pinned.size)
        self._learn(pinned, changed=ref is not None and ref.version_key != pinned.version_key, keep=settled)
        return pinned

    def _learn(self, pinned: ProductRef, changed: bool, keep: bool) -> None:
        """Show the pinned true size from now on, and once the product ``changed`` on MAST in this mount its
        new Last-Modified as the modification time (until then the observation's date, as listed, so
        ``cp -p`` and ``rsync`` see one date before and after reading). The ref itself is reused by the
        next opens only when ``keep``."""
        uri = pinned.uri
        if keep:
            self.refs.put(uri, pinned)
            self._pinned_at[uri] = time.monotonic()
        known = self.truths.peek(uri)
        modified = known[1] if known is not None else None
        if changed and pinned.version is not None:
            modified = _http_time(pinned.version.last_modified)
        self.truths.put(uri, (pinned.size, modified))
        if len(self._pinned_at) > len(self.refs):  # refs dropped from the LRU take their times along
            for gone in [gone for gone in self._pinned_at if gone not in self.refs]:
                del self._pinned_at[gone]

    def forget_pin(self, uri: str) -> None:
        """The next open of ``uri`` asks the server for its version again."""
        self._pinned_at.pop(uri, None)

    async def read(self, handle: int, offset: int, length: int) -> bytes | memoryview:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file), possibly as a
        read-only view of a cached block (any buffer suits the FUSE adapter)."""
        open_file = self._handles.get(handle)
        if open_file is None:
            raise NotFound(f"no open file handle {handle}")
        return await self.read_open(open_file, offset, length)

    async def read_open(self, open_file: OpenFile, offset: int, length: int) -> bytes | memoryview:
        """:meth:`read` of an :class:`OpenFile` from :meth:`open_node`."""
        if open_file.content is not None:
            return open_file.content.read(offset, length)
        assert open_file.stream is not None and open_file.ref is not None  # a product's handle
        try:
            return await self.reader.read_view(open_file.stream, offset, length)
        except Unauthorized as exc:
            self._log_refused(open_file.node, exc)
            raise
        except VersionChanged as exc:
            self.forget_pin(open_file.ref.uri)
            self.log_once(("changed", open_file.ref.version_key), logging.WARNING,
                          "%s: the product changed on MAST while open (%s); this open file fails with EIO, "
                          "open it again to read the new version", open_file.node.path_text, exc)
            raise

    def _log_refused(self, node: Any, exc: Unauthorized) -> None:
        self.log_once(("refused", node.product.data_uri), logging.WARNING, "%s: %s (%s)", node.path_text, exc,
                      exc.reason)

    def opened_changed(self, handle: int) -> bool:
        """Whether opening ``handle`` found a version or size the kernel may not have seen (its cached
        attributes and pages of the file are stale)."""
        open_file = self._handles.get(handle)
        return open_file is not None and open_file.changed

    def handle_path(self, handle: int) -> str:
        """The path of an open file handle (for log lines)."""
        open_file = self._handles.get(handle)
        return open_file.node.path_text if open_file is not None else f"<handle {handle}>"

    def release(self, handle: int) -> None:
        self._handles.pop(handle, None)

    # -------------------------------------------------------------------------------------- xattrs

    async def getxattr(self, ino: int, name: str) -> bytes:
        """The value of xattr ``name``; NoSuchAttribute when it has none; UnsupportedAttribute (at once,
        without any I/O) for names outside ``user.`` (security labels, ACLs)."""
        if _never_present(name):
            raise UnsupportedAttribute(name)
        value = self.node(ino).xattrs(self).get(name)
        if value is None:
            raise NoSuchAttribute(name)
        return value

    async def listxattr(self, ino: int) -> list[str]:
        return list(self.node(ino).xattrs(self))

    # --------------------------------------------------------------------------------- whole mount

    def statfs(self) -> FsStats:
        """The block cache as the filesystem's size: total = its limit, used = what it holds."""
        used, limit = self._cache_usage()
        block = STAT_BLOCK_SIZE
        total = max(limit, used)
        return FsStats(block_size=block, blocks=total // block, blocks_free=(total - used) // block,
                       files=len(self._nodes))

    async def refresh(self, path: str) -> list[int]:
        """Drop cached metadata at and below ``path`` (the Archive's, the memos, the product refs) so
        it is asked of MAST again. Returns the inode numbers whose kernel caches should be invalidated.
        """
        node = await self.resolve_path(path)
        # the node itself even when the kernel forgot it (resolve_path then made a fresh one)
        below = [node, *(n for n in self._nodes.values() if n is not node and n.path[: len(node.path)] == node.path)]
        if isinstance(node, RootDir):
            await self.archive.forget_all()
        else:
            for kind, ident in self._archive_keys([*below, *self._enclosing_observation(node)]):
                await self.archive.forget(kind, ident)
        self.forget_memos(node.path)
        for owner in self._enclosing_observation(node):  # a group or file: its listing is the observation's
            self.forget_memos(owner.path)
        opened = [file for file in below if isinstance(file, ProductFile) and file.product.data_uri in self.refs]
        for file in below:
            if isinstance(file, ProductFile):
                self.forget_pin(file.product.data_uri)
        await self._repin(opened)
        log.info("refresh %s: its metadata will be asked of MAST again", node.path_text)
        return [n.ino for n in below]

    async def _repin(self, files: list[ProductFile]) -> None:
        """Ask the server again for the version and true size of products opened before (so ``stat``
        shows them at once after a refresh); a product that cannot be asked now is forgotten."""
        limiter = trio.CapacityLimiter(SIZE_RESOLVERS)

        async def repin(file: ProductFile) -> None:
            async with limiter:
                try:
                    await self.product_ref(file, fresh=True)
                except MastfsError as exc:
                    log.info("refresh: cannot ask for %s now (%s)", file.product.data_uri, exc)
                    self.refs.pop(file.product.data_uri)
                    self.truths.pop(file.product.data_uri)

        async with trio.open_nursery() as nursery:
            for file in {f.product.data_uri: f for f in files}.values():
                nursery.start_soon(repin, file)

    @staticmethod
    def _enclosing_observation(node: Node) -> list[Node]:
        owner = getattr(node, "observation_dir", None)
        return [owner] if owner is not None else []

    @staticmethod
    def _archive_keys(nodes: list[Node]) -> dict[tuple[str, str], None]:
        """The Archive entries (kind, id) behind ``nodes``, each once."""
        keys: dict[tuple[str, str], None] = {}
        for node in nodes:
            if isinstance(node, ProgramDir):
                keys[("program", node.path[1])] = None
            elif isinstance(node, QueryDir) and node.path[0] == "target":
                keys[("target", node.path[1])] = None
            elif isinstance(node, ObservationDir):
                keys[("observation", node.observation.obs_id)] = None
                keys[("products", node.observation.obsid)] = None
            elif isinstance(node, ProductFile):
                keys[("size", node.product.data_uri)] = None
                keys[("s3", node.product.data_uri)] = None
        return keys

    async def walk_products(self, path: str) -> AsyncIterator[tuple[str, ProductFile]]:
        """Every product file at or below ``path`` once (depth first, listing directories as it goes;
        ``recommended/`` is walked only when it is ``path`` itself, its files being in the groups too)."""
        node = await self.resolve_path(path)
        async for item in self._walk(node, top=True):
            yield item

    async def prefetch_candidates(self, path: str, *, level: int | None = None, product_type: str | None = None,
                                  recommended: bool = False) -> list[PrefetchCandidate]:
        """The product files at or below ``path`` (as :meth:`walk_products`) that a prefetch with these
        filters takes: calibration ``level``, ``product_type`` (as MAST spells it, e.g. ``SCIENCE``), only
        Minimum Recommended Products when ``recommended``. Each with its size (a null size resolved by
        HEAD) and, for exclusive-access data without a token, why its bytes cannot be fetched. Raises like
        :meth:`resolve_path` and the listings it walks."""
        candidates = []
        async for file_path, node in self.walk_products(path):
            product = node.product
            if level is not None and product.level != level:
                continue
            if recommended and not namespace.is_recommended(product):
                continue
            if product_type is not None and product.product_type != product_type:
                continue
            refusal = "exclusive-access data needs a token" if node.exclusive and not self.has_token else None
            candidates.append((file_path, node, refusal))
        return [PrefetchCandidate(file_path, await node.size(self), node, refusal)
                for file_path, node, refusal in candidates]

    async def _walk(self, node: Node, top: bool = False) -> AsyncIterator[tuple[str, ProductFile]]:
        if isinstance(node, ProductFile):
            yield node.path_text, node
        elif isinstance(node, DirNode) and not isinstance(node, TopDir | RootDir):
            if isinstance(node, RecommendedDir) and not top:  # its files are walked in their groups
                return
            for child in await node.children(self):
                async for item in self._walk(child):
                    yield item


def _http_time(text: str | None) -> float | None:
    """Unix time of a Last-Modified value (HTTP date, or the ISO form S3 answers carry); None if absent
    or unparsable."""
    if not text:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _never_present(name: str) -> bool:
    """Names mastfs never has (``security.*``, ``system.posix_acl_*``, anything outside ``user.``)."""
    return not name.startswith("user.")
