"""The Tree without the kernel: real services (Archive, BlockCache, fetchers, ByteReader) against the twin,
called directly. Inode stability, cache identity, single flight, xattr short cuts, refresh, statfs."""

from __future__ import annotations

import errno
import gc
import logging
import stat
import weakref

import pytest
import trio

from mastfs import namespace, services
from mastfs import tree as tree_module
from mastfs.config import Settings
from mastfs.errors import (
    InvalidName,
    NameTooLong,
    NoSuchAttribute,
    NotFound,
    Unauthorized,
    UnsupportedAttribute,
    errno_for,
)
from mastfs.tree import ROOT_INODE
from mastfs.twin import catalog as twin_catalog

PROGRAM = twin_catalog.PROGRAM_2733
OBS = twin_catalog.OBS_2733_MIRI_F1130W
SHARED_URI = "mast:JWST/product/jw02733001001_gs-id_1_image-cal.fits"


def run_with_tree(twin, tmp_path, body, token=None, **changes):
    """Run ``await body(tree)`` with a Tree over fresh services pointed at the twin."""
    settings = Settings.defaults(mast_url=twin.mast_url, resolver_url=twin.resolver_url,
                                 s3_endpoint=twin.s3_endpoint, cache_dir=str(tmp_path / "cache"), **changes)

    async def main():
        async with services.open_services(settings, token) as built:
            return await body(built.tree)

    return trio.run(main)


async def ino_of(tree, path):
    """The inode of ``path`` found as the kernel finds it: one LOOKUP per component from the root."""
    ino = ROOT_INODE
    for part in (p for p in path.split("/") if p):
        ino = (await tree.lookup(ino, part)).ino
    return ino


async def listing(tree, ino):
    """What readdirplus hands out of directory ``ino``: (name, attributes) of each entry."""
    return [(node.name, await tree.attributes(node)) for node in await tree.listdir(ino)]


def requests(twin, key=None):
    stats = twin.stats()
    if key is None:
        return stats["total_requests"]
    return stats["endpoints"].get(key, {}).get("requests", 0)


def test_inodes_are_stable_per_path(clean_twin, tmp_path):
    async def body(tree):
        obs_path = f"/program/{PROGRAM}/{OBS}"
        first = await ino_of(tree, obs_path)
        assert await ino_of(tree, obs_path) == first
        program_ino = await ino_of(tree, f"/program/{PROGRAM}")
        listed = dict(await listing(tree, program_ino))
        assert listed[OBS].ino == first
        assert (await tree.lookup(program_ino, OBS)).ino == first
        assert await ino_of(tree, f"/obs/{OBS}") != first  # one directory is never shown under two names
        assert (await tree.lookup(first, "..")).ino == program_ino
        assert (await tree.lookup(first, ".")).ino == first
        assert (await tree.getattr(ROOT_INODE)).is_dir

    run_with_tree(clean_twin, tmp_path, body)


def test_one_product_ref_per_data_uri(clean_twin, tmp_path):
    async def body(tree):
        handles = []
        for obs_id in ("jw02733-o001_t001_nircam_clear-f090w", "jw02733-o001_t001_nircam_clear-f187n"):
            node = await tree.resolve_path(f"/program/{PROGRAM}/{obs_id}")
            contents = await node.contents(tree)
            handles.append(await tree.open(await ino_of(tree, f"{node.path_text}/{namespace.layout_products(contents.products).paths[SHARED_URI]}")))
        first, second = (tree._handles[h].ref for h in handles)
        assert first is second and first.uri == SHARED_URI
        data = await tree.read(handles[0], 0, 100)
        assert data == clean_twin.catalog.read(SHARED_URI, 0, 100)
        for handle in handles:
            tree.release(handle)

    run_with_tree(clean_twin, tmp_path, body)


def test_product_refs_are_bounded_and_made_again_alike(clean_twin, tmp_path, monkeypatch):
    """Only the REFS_KEPT most recently opened products keep a ProductRef; a product opened again after
    its ref left gets an equal one (same cache identity), and its bytes read the same."""
    monkeypatch.setattr(tree_module, "REFS_KEPT", 3)

    async def body(tree):
        level2 = f"/program/{PROGRAM}/{OBS}/level2"
        level2_ino = await ino_of(tree, level2)
        names = [name for name, _ in await listing(tree, level2_ino)][:5]
        versions = {}
        for name in names:
            handle = await tree.open(await ino_of(tree, f"{level2}/{name}"))
            versions[name] = tree._handles[handle].ref.version_key
            tree.release(handle)
        assert len(tree.refs) == 3 and names[0] not in {ref.uri.rsplit("/", 1)[-1] for ref in tree.refs.values()}
        handle = await tree.open(await ino_of(tree, f"{level2}/{names[0]}"))
        ref = tree._handles[handle].ref
        assert ref.version_key == versions[names[0]] and len(tree.refs) == 3
        assert await tree.read(handle, 0, 100) == clean_twin.catalog.read(ref.uri, 0, 100)
        tree.release(handle)

    run_with_tree(clean_twin, tmp_path, body)


def test_concurrent_cold_listings_share_one_query(clean_twin, tmp_path):
    async def body(tree):
        obs_ino = await ino_of(tree, f"/program/{PROGRAM}/{OBS}")
        clean_twin.reset_stats()
        results = []

        async def list_it():
            results.append(await listing(tree, obs_ino))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(list_it)
        assert len(results) == 5 and all(r == results[0] for r in results)
        assert requests(clean_twin, "invoke:Mast.Caom.Products") == 1

    run_with_tree(clean_twin, tmp_path, body)


def test_attributes_of_groups_and_files(clean_twin, tmp_path):
    async def body(tree):
        level2 = await ino_of(tree, f"/program/{PROGRAM}/{OBS}/level2")
        entries = await listing(tree, level2)
        assert len(entries) == 80
        for _name, attributes in entries:
            assert stat.S_ISREG(attributes.mode) and stat.S_IMODE(attributes.mode) == 0o444
            assert attributes.size > 0 and attributes.nlink == 1
        group = await tree.getattr(level2)
        assert stat.S_IMODE(group.mode) == 0o555 and group.nlink == 2

    run_with_tree(clean_twin, tmp_path, body)


def test_system_xattrs_and_bad_names_cost_nothing(clean_twin, tmp_path):
    async def body(tree):
        obs_ino = await ino_of(tree, f"/program/{PROGRAM}/{OBS}")
        clean_twin.reset_stats()
        for name in ("security.selinux", "system.posix_acl_access", "system.posix_acl_default", "trusted.x"):
            with pytest.raises(UnsupportedAttribute) as info:
                await tree.getxattr(obs_ino, name)
            assert errno_for(info.value) == errno.EOPNOTSUPP
        with pytest.raises(NoSuchAttribute) as info:
            await tree.getxattr(obs_ino, "user.mast_nope")
        assert errno_for(info.value) == errno.ENODATA
        assert (await tree.getxattr(obs_ino, "user.mast_obs_id")) == OBS.encode()
        for parent, name in ((obs_ino, ".Trash-1000"), (obs_ino, "desktop.ini"), (ROOT_INODE, "autorun.inf"),
                             (await ino_of(tree, "/program"), "02733"), (await ino_of(tree, "/cone"), "1,2,3,4")):
            with pytest.raises(InvalidName):
                await tree.lookup(parent, name)
        with pytest.raises(NameTooLong):
            await tree.lookup(obs_ino, "x" * 256)
        assert requests(clean_twin) == 0

    run_with_tree(clean_twin, tmp_path, body)


def test_exclusive_open_is_refused_once_logged(clean_twin, tmp_path, caplog):
    uri = twin_catalog.EXCLUSIVE_URI
    obs_id = uri.rsplit("/", 1)[1].rsplit("_", 1)[0]
    path = f"/program/{twin_catalog.EXCLUSIVE_PROGRAM}/{obs_id}/level3/{uri.rsplit('/', 1)[1]}"

    async def body(tree):
        ino = await ino_of(tree, path)
        assert stat.S_IMODE((await tree.getattr(ino)).mode) == 0
        for _ in range(3):
            with pytest.raises(Unauthorized):
                await tree.open(ino)

    with caplog.at_level(logging.INFO, logger="mastfs.tree"):
        run_with_tree(clean_twin, tmp_path, body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "auth.mast.stsci.edu" in r.getMessage()]
    assert len(warnings) == 1


def test_refresh_asks_mast_again(clean_twin, tmp_path):
    async def body(tree):
        obs_path = f"/program/{PROGRAM}/{OBS}"
        await listing(tree, await ino_of(tree, obs_path))
        clean_twin.reset_stats()
        await listing(tree, await ino_of(tree, obs_path))
        assert requests(clean_twin) == 0
        inodes = await tree.refresh(obs_path)
        assert await ino_of(tree, obs_path) in inodes
        await listing(tree, await ino_of(tree, obs_path))
        assert requests(clean_twin, "invoke:Mast.Caom.Products") == 1

    run_with_tree(clean_twin, tmp_path, body)


def test_refresh_of_a_directory_the_kernel_forgot_asks_mast_again(clean_twin, tmp_path):
    """Under memory pressure the kernel forgets inodes at any time; ``mastfs refresh`` of such a
    directory must still drop its cached answer."""

    async def body(tree):
        program_path = f"/program/{PROGRAM}"
        program = await ino_of(tree, program_path)
        await tree.listdir(program)
        tree.forget(program, 1)  # the kernel drops its one reference: the node leaves memory
        assert tree.stats()["kernel_inodes"] == 1  # /program only
        clean_twin.reset_stats()
        await tree.refresh(program_path)
        await tree.listdir(await ino_of(tree, program_path))
        assert requests(clean_twin, "invoke:Mast.Caom.Filtered") >= 1

    run_with_tree(clean_twin, tmp_path, body)


def test_unknown_things_are_not_found(clean_twin, tmp_path):
    async def body(tree):
        for path in ("/program/99999", f"/program/{PROGRAM}/jw02733-o099_t001_none", "/obs/jw09999-o001_x",
                     f"/target/{twin_catalog.UNRESOLVABLE_NAME}", f"/program/{PROGRAM}/{OBS}/level9"):
            with pytest.raises(NotFound):
                await tree.resolve_path(path)

    run_with_tree(clean_twin, tmp_path, body)


def test_statfs_and_readme(clean_twin, tmp_path):
    async def body(tree):
        stats = tree.statfs()
        assert stats.block_size * stats.blocks == 2**30
        assert stats.blocks_free == stats.blocks  # nothing cached yet
        readme = await ino_of(tree, "/README.txt")
        handle = await tree.open(readme)
        assert await tree.read(handle, 0, 1 << 20) == namespace.README_TEXT.encode()
        tree.release(handle)

    run_with_tree(clean_twin, tmp_path, body, cache_size=2**30)


def test_walk_products_lists_every_file_of_a_directory(clean_twin, tmp_path):
    async def body(tree):
        found = [path async for path, _node in tree.walk_products(f"/program/{PROGRAM}/{OBS}/level2")]
        assert len(found) == 80 and all(path.endswith(".fits") for path in found)

    run_with_tree(clean_twin, tmp_path, body)


def test_prefetch_candidates_apply_the_filters_and_say_what_cannot_be_fetched(clean_twin, tmp_path):
    observation = f"/program/{PROGRAM}/{OBS}"
    uri = twin_catalog.EXCLUSIVE_URI
    exclusive_obs = f"/program/{twin_catalog.EXCLUSIVE_PROGRAM}/{uri.rsplit('/', 1)[1].rsplit('_', 1)[0]}"

    async def body(tree):
        every = await tree.prefetch_candidates(observation)
        walked = [path async for path, _node in tree.walk_products(observation)]
        assert [c.path for c in every] == walked and len(walked) > 80  # recommended/ not twice
        for candidate in every:
            assert candidate.size == await (await tree.resolve_path(candidate.path)).size(tree) > 0
        assert all(c.refusal is None for c in every)
        level2 = await tree.prefetch_candidates(observation, level=2)
        assert [c.path for c in level2] == [c.path for c in every if c.file.product.level == 2]
        assert {p for p in walked if "/level2/" in p} <= {c.path for c in level2} < set(walked)
        science = await tree.prefetch_candidates(observation, product_type="SCIENCE")
        assert science and all(c.file.product.product_type == "SCIENCE" for c in science)
        assert len(science) < len(every)
        recommended = await tree.prefetch_candidates(observation, recommended=True)
        assert recommended and all(namespace.is_recommended(c.file.product) for c in recommended)
        assert len(recommended) < len(every)
        both = await tree.prefetch_candidates(observation, level=2, product_type="PREVIEW")
        assert [c.path for c in both] == [c.path for c in every if c.file.product.level == 2
                                          and c.file.product.product_type == "PREVIEW"]
        assert 0 < len(both) < len(level2)
        locked = [c for c in await tree.prefetch_candidates(exclusive_obs) if c.file.product.data_uri == uri]
        assert len(locked) == 1 and locked[0].refusal == "exclusive-access data needs a token"

    run_with_tree(clean_twin, tmp_path, body)


def test_forgotten_nodes_leave_memory_and_keep_their_numbers(clean_twin, tmp_path):
    """Nodes live while the kernel references them (lookups and readdirplus entries, each counted);
    forgetting them frees them, and the same path gets the same number again."""

    async def body(tree):
        program = await ino_of(tree, f"/program/{PROGRAM}")
        obs = (await tree.lookup(program, OBS)).ino
        level3 = (await tree.lookup(obs, "level3")).ino
        listed = await listing(tree, level3)
        assert tree.stats()["nodes"] >= len(listed) + 3
        for _, attributes in listed[:2]:
            tree.remember(attributes.ino)  # readdir handed out two entries; the listing then ends
        tree.release_listing([attributes.ino for _, attributes in listed])
        assert tree.stats()["kernel_inodes"] == 6  # /program, its 2733, obs, level3 and the two entries
        kept = {attributes.ino for _, attributes in listed[:2]}
        assert {ino for ino in kept if (await tree.getattr(ino)).ino == ino} == kept
        before = tree.stats()["nodes"]
        for ino in (*kept, level3):
            tree.forget(ino, 1)
        assert tree.stats()["nodes"] == before - 3
        assert tree.stats()["kernel_inodes"] == 3
        # A number the kernel forgot a moment ago still answers (a safety margin) ...
        assert (await tree.getattr(level3)).is_dir
        # ... and a path looked up again gets its old number.
        assert (await tree.lookup(obs, "level3")).ino == level3
        name = listed[0][0]
        assert (await tree.lookup(level3, name)).ino == listed[0][1].ino
        assert tree.stats()["kernel_inodes"] == 5
        tree.forget(obs, 1)
        assert tree.stats()["kernel_inodes"] == 4

    run_with_tree(clean_twin, tmp_path, body)


def test_an_open_listing_keeps_its_entries_while_another_closes(clean_twin, tmp_path):
    """Two listings of one directory: closing the first must not drop nodes the second hands out later."""

    async def body(tree):
        level3 = await ino_of(tree, f"/program/{PROGRAM}/{OBS}/level3")
        first = await listing(tree, level3)
        second = await listing(tree, level3)
        tree.release_listing([attributes.ino for _, attributes in first])
        for _, attributes in second:  # handed out after the first listing closed
            tree.remember(attributes.ino)
        for _, attributes in second:
            assert (await tree.getattr(attributes.ino)).ino == attributes.ino
        tree.release_listing([attributes.ino for _, attributes in second])
        assert tree.stats()["listed"] == 0
        assert tree.stats()["kernel_inodes"] == len(second) + 4  # and /program, 2733, the obs, level3

    run_with_tree(clean_twin, tmp_path, body)


def test_inode_numbers_are_the_same_in_every_mount(clean_twin, tmp_path):
    async def body(tree):
        return await ino_of(tree, f"/program/{PROGRAM}/{OBS}/level3")

    first = run_with_tree(clean_twin, tmp_path, body)
    assert run_with_tree(clean_twin, tmp_path, body) == first > ROOT_INODE


def test_planned_observations_leave_the_listing_for_planned_csv(clean_twin, tmp_path):
    async def body(tree):
        program = await ino_of(tree, f"/program/{PROGRAM}")
        names = [name for name, _ in await listing(tree, program)]
        assert twin_catalog.PLANNED_2733_OBS_ID not in names and "planned.csv" in names
        planned = (await tree.lookup(program, "planned.csv")).ino
        handle = await tree.open(planned)
        text = bytes(await tree.read(handle, 0, 1 << 20)).decode()
        tree.release(handle)
        assert twin_catalog.PLANNED_2733_OBS_ID in text and "calib_level" in text.splitlines()[0]
        with pytest.raises(NotFound):
            await tree.lookup(await ino_of(tree, "/obs"), twin_catalog.PLANNED_2733_OBS_ID)

    run_with_tree(clean_twin, tmp_path, body)


def test_a_failed_s3_lookup_is_asked_again_on_the_next_open(clean_twin, tmp_path):
    async def body(tree):
        level2 = await ino_of(tree, f"/program/{PROGRAM}/{OBS}/level2")
        name, attributes = (await listing(tree, level2))[0]
        clean_twin.faults.add("path_lookup", "status", code=503)
        handle = await tree.open(attributes.ino)
        tree.release(handle)
        clean_twin.faults.clear()
        clean_twin.reset_stats()
        handle = await tree.open(attributes.ino)
        tree.release(handle)
        assert requests(clean_twin, "path_lookup") >= 1  # not remembered as "not in S3"
        source = (await tree.getxattr(attributes.ino, "user.mastfs.source")).decode()
        assert source.startswith("s3://"), source

    run_with_tree(clean_twin, tmp_path, body, retries=2, deadline=2.0)


def test_products_csv_is_made_part_by_part_and_adds_up(clean_twin, tmp_path):
    async def body(tree):
        obs = await ino_of(tree, f"/program/{PROGRAM}/{OBS}")
        csv_ino = (await tree.lookup(obs, "products.csv")).ino
        size = (await tree.getattr(csv_ino)).size
        handle = await tree.open(csv_ino)
        pieces, offset = [], 0
        while offset < size:  # kernel-sized reads crossing the parts' borders
            piece = bytes(await tree.read(handle, offset, 131072))
            pieces.append(piece)
            offset += len(piece)
        tree.release(handle)
        text = b"".join(pieces).decode()
        assert len(text.encode()) == size
        rows = text.splitlines()
        contents = await (await tree.resolve_path(f"/program/{PROGRAM}/{OBS}")).contents(tree)
        assert len(rows) == len(contents.products) + 1 > 3000
        assert rows[0].endswith(",mastfs_path,mastfs_kind,mastfs_observation_date")

    run_with_tree(clean_twin, tmp_path, body)


def test_a_reloaded_listing_keeps_the_contents_its_file_nodes_hold(clean_twin, tmp_path, monkeypatch):
    """When an observation's memo expires while the kernel holds its file nodes, the reload (from the
    metadata cache) finds the same rows and gives back the very contents those nodes hold: one product
    table and one layout in memory, not two, and the same nodes."""
    monkeypatch.setattr(tree_module, "MEMO_TTL", 0.0)  # every memo is expired as soon as it is made

    async def body(tree):
        obs_path = f"/program/{PROGRAM}/{OBS}"
        level2 = await ino_of(tree, obs_path + "/level2")
        held = await tree.listdir(level2)
        contents = held[0].files.contents
        clean_twin.reset_stats()
        again = await tree.listdir(level2)
        assert [node.ino for node in again] == [node.ino for node in held]
        assert all(new is old for new, old in zip(again, held, strict=True))
        assert await (await tree.resolve_path(obs_path)).contents(tree) is contents
        assert requests(clean_twin) == 0  # the rows came from the metadata cache

    run_with_tree(clean_twin, tmp_path, body)


def test_expired_listings_leave_memory_with_the_forgotten_nodes_of_their_files(clean_twin, tmp_path,
                                                                               monkeypatch):
    """Once the kernel forgot a listing's files and its memo expired, sweeping drops the memo and the
    forgotten file nodes still pointing at the observation's rows, so its table and layout are freed
    (the tree's stats count the rows memos hold: the daemon hands the heap back when they drop)."""
    monkeypatch.setattr(tree_module, "MEMO_TTL", 0.0)

    async def body(tree):
        level2 = await ino_of(tree, f"/program/{PROGRAM}/{OBS}/level2")
        listed = await tree.listdir(level2)
        contents = weakref.ref(listed[0].files.contents)  # the table (which the Archive may keep) and the layout
        rows = len(listed[0].files.contents.products)
        tree.release_listing([node.ino for node in listed])  # readdir handed none out: all forgotten
        del listed
        assert tree.stats()["forgotten_kept"] >= 80 and tree.stats()["memo_rows"] == rows > 3000
        tree.sweep_memos()
        assert tree.stats()["memos"] == tree.stats()["memo_rows"] == 0 and tree.stats()["forgotten_kept"] < 10
        gc.collect()
        assert contents() is None
        tree.compact()
        assert (await tree.getattr(level2)).is_dir  # what the kernel still holds is still there

    run_with_tree(clean_twin, tmp_path, body)
