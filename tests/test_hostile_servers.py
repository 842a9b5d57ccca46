"""Hostile servers: HTML where JSON is expected, rows of the wrong types or missing fields, a product list
paging through a million rows, crafted product names, dataURIs, obs_ids and S3 paths.

First against the MAST client directly (like tests/test_mast_client.py), then through a real mount: the
answer is a clear error (EIO, never a crash: the daemon lives on and the next good listing works), memory
stays bounded, and nothing is ever written outside the cache directory.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from contextlib import asynccontextmanager

import pytest
import trio
from mountutil import mounted
from reliability_util import (
    FAULT_MOUNT,
    SLACK_LIMIT,
    big_program_obs_ids,
    bounded,
    expected_entries,
    layout_of,
    observation_row,
    rss_bytes,
    sha256_of,
    total_requests,
)

from mastfs import namespace
from mastfs.config import Settings
from mastfs.errors import BadResponse
from mastfs.mast.client import MAX_ROWS, MastClient, make_http_client
from mastfs.mast.models import Product
from mastfs.twin import catalog as twin_catalog
from mastfs.twin import faults as twin_faults

OBS = twin_catalog.OBS_2733_MIRI_F1130W


def trio_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


@asynccontextmanager
async def mast_client(twin):
    settings = Settings.defaults(mast_url=twin.mast_url, resolver_url=twin.resolver_url, deadline=5.0,
                                 retries=3, collections=["JWST"])
    async with make_http_client(settings) as http:
        yield MastClient(http, settings)


def obsid_of(twin, obs_id: str) -> str:
    return str(observation_row(twin, obs_id)["obsid"])


def is_safe_name(name: str) -> bool:
    """A name the kernel can show as one directory entry that points nowhere else."""
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name and "\n" not in name
            and len(name.encode("utf-8", "surrogateescape")) <= namespace.NAME_MAX)


# ------------------------------------------------------------------------------------ the twin's new kinds


def test_hostile_kinds_are_armed_only_where_they_make_sense(clean_twin):
    with pytest.raises(twin_faults.FaultError):
        clean_twin.faults.add("s3", "html_200")
    with pytest.raises(twin_faults.FaultError):
        clean_twin.faults.add("download", "endless_paging")
    with pytest.raises(twin_faults.FaultError):
        clean_twin.faults.add("invoke", "mutate_rows", mode="sideways")
    with pytest.raises(twin_faults.FaultError):
        clean_twin.faults.add("invoke", "crafted_names", field="target_name")
    clean_twin.faults.add("path_lookup", "crafted_names")
    clean_twin.faults.add("whoami", "html_200")


def test_mutations_cover_types_and_missing_fields():
    row = {"obs_id": "a", "obsid": 1, "dataURI": "mast:x", "size": 10, "calib_level": 3,
           "productFilename": "x.fits", "t_obs_release": 60000.0, "s_ra": 1.0, "s_dec": 2.0}
    payload = {"status": "COMPLETE", "data": [dict(row) for _ in range(20)]}
    mutated = twin_faults.mutate_rows(payload)["data"]
    assert payload["data"][0] == row  # the input is untouched
    assert any(isinstance(r.get("obsid"), dict) for r in mutated)
    assert any(isinstance(r.get("size"), str) for r in mutated)
    assert any(r.get("size") == 2**70 for r in mutated)
    assert any("dataURI" not in r for r in mutated)
    assert any(r.get("calib_level") is None and "calib_level" in r for r in mutated)


# ------------------------------------------------------------------------------------------ client level


@trio_test
async def test_html_with_status_200_is_a_clear_bad_response_on_every_service(clean_twin):
    for endpoint in ("invoke", "path_lookup", "resolver", "whoami"):
        clean_twin.faults.add(endpoint, "html_200")
    async with mast_client(clean_twin) as client:
        calls = {
            "invoke": lambda: client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"]),
            "path_lookup": lambda: client.path_lookup([twin_catalog.BENCH_1GIB_URI]),
            "resolver": lambda: client.resolve_name("NGC 3132"),
            "whoami": client.whoami,
        }
        for call in calls.values():
            with pytest.raises(BadResponse, match="not JSON"):
                await call()


@trio_test
async def test_html_with_status_200_is_not_taken_for_a_file_size(clean_twin):
    clean_twin.faults.add("download", "html_200")
    async with mast_client(clean_twin) as client:
        with pytest.raises(BadResponse):
            await client.head(twin_catalog.NULL_SIZE_URI)


@trio_test
async def test_rows_of_the_wrong_types_are_dropped_or_read_sanely(clean_twin):
    clean_twin.faults.add("invoke", "mutate_rows", mode="types")
    async with mast_client(clean_twin) as client:
        observations = await client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])
        products = await client.products([obsid_of(clean_twin, OBS)])
    assert observations, "rows with usable identities must survive"
    for obs in observations:
        assert isinstance(obs.obs_id, str) and obs.obsid.isdigit(), obs.fields
    assert len(products) > 3000
    for product in products:
        size = product.size
        assert size is None or (isinstance(size, int) and 0 <= size < 2**53), (product.data_uri, size)
        assert product.level is None or 0 <= product.level <= 9


@trio_test
async def test_rows_with_missing_fields_lose_only_themselves(clean_twin):
    clean_twin.faults.add("invoke", "mutate_rows", mode="missing")
    async with mast_client(clean_twin) as client:
        observations = await client.observations_by_program(twin_catalog.BIG_PROGRAM, ["JWST"])
        products = await client.products([obsid_of(clean_twin, OBS)])
    # the rows a mutation stripped of an identity (obs_id and obsid; dataURI) go, and only they
    big = [row for row in clean_twin.catalog.observation_rows()
           if str(row["proposal_id"]) == twin_catalog.BIG_PROGRAM]
    kept = [row for row in twin_faults.mutate_rows({"data": big}, "missing")["data"]
            if row.get("obs_id") and row.get("obsid") is not None]
    assert {obs.obs_id for obs in observations} == {row["obs_id"] for row in kept}
    rows = clean_twin.catalog.product_rows(obsid_of(clean_twin, OBS))
    kept_uris = {row["dataURI"] for row in twin_faults.mutate_rows({"data": rows}, "missing")["data"]
                 if row.get("dataURI")}
    assert {product.data_uri for product in products} == kept_uris
    assert 0 < len(kept_uris) < len({row["dataURI"] for row in rows})


@trio_test
async def test_a_million_row_product_list_is_refused_after_one_page(clean_twin):
    clean_twin.faults.add("invoke", "endless_paging")
    async with mast_client(clean_twin) as client:
        for call in (lambda: client.products([obsid_of(clean_twin, OBS)]),
                     lambda: client.observations_by_program(twin_catalog.PROGRAM_2733, ["JWST"])):
            clean_twin.reset_stats()
            with trio.fail_after(SLACK_LIMIT), pytest.raises(BadResponse, match=f"more than the {MAX_ROWS}"):
                await call()
            assert total_requests(clean_twin) == 1


@trio_test
async def test_paging_that_does_not_add_up_is_refused_not_stored(clean_twin):
    """5 pages of 1,000 rows claimed, the real answer ends in page 4 with 59 rows (then repeats): the rows
    cannot add up to what was announced, so the answer is asked again, then refused (complete or nothing)."""
    clean_twin.faults.add("invoke", "endless_paging", pages=5)
    async with mast_client(clean_twin) as client:
        client.product_pagesize = 1000
        with pytest.raises(BadResponse, match="holds 59 rows"):
            await client.products([obsid_of(clean_twin, OBS)])
    assert total_requests(clean_twin) == 3 * 4  # three tries, each stopped at the short page 4


def test_crafted_product_names_never_become_unsafe_file_names(twin):
    rows = twin.catalog.product_rows(obsid_of(twin, OBS))
    for field_name in ("productFilename", "dataURI"):
        hostile = twin_faults.crafted_rows({"data": rows}, field_name)["data"]
        products = [Product.from_row(row) for row in hostile if str(row.get("dataURI") or "").strip()]
        layout = namespace.layout_products(products)
        for group, files in layout.groups.items():
            assert is_safe_name(group)
            for name in files:
                assert is_safe_name(name), (field_name, name)
                namespace.check_component(name)
        for path in layout.paths.values():
            assert not os.path.isabs(path) and ".." not in path.split("/")


# ------------------------------------------------------------------------------------------ mount level


@pytest.fixture(scope="module")
def hostile_mount(twin, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    twin.faults.clear()
    with mounted(twin, base, **FAULT_MOUNT) as live:
        live.base = base
        yield live
    twin.faults.clear()


@pytest.fixture(scope="module")
def fresh_observations(twin):
    """Observations of the big program, each used by one test only (so its metadata is not cached)."""
    return iter(big_program_obs_ids(twin)[100:])


def daemon_alive_and_good(mount, twin, fresh_observations) -> None:
    """The daemon still runs and a good listing of a never-seen observation works."""
    twin.faults.clear()
    assert mount.process.poll() is None, mount.log_text()
    obs_id = next(fresh_observations)
    listing = bounded(lambda: sorted(os.listdir(mount.join("obs", obs_id))))
    assert listing.ok and listing.value == expected_entries(twin, obs_id)


def outside_files(base) -> set[str]:
    """Every path under the test's base directory, except inside the mount and the cache directory."""
    found = set()
    for root, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in (str(base / "mnt"), str(base / "cache"))]
        found.update(os.path.join(root, name) for name in files + dirs)
    return found


@pytest.mark.mount
def test_mount_html_200_is_eio_and_the_daemon_lives_on(hostile_mount, clean_twin, fresh_observations):
    obs_id = next(fresh_observations)
    clean_twin.faults.add("invoke", "html_200")
    outcome = bounded(lambda: os.listdir(hostile_mount.join("obs", obs_id)))
    assert outcome.errno == errno.EIO
    daemon_alive_and_good(hostile_mount, clean_twin, fresh_observations)


@pytest.mark.mount
def test_mount_endless_paging_is_eio_at_once_with_bounded_memory(hostile_mount, clean_twin,
                                                                 fresh_observations):
    obs_id = next(fresh_observations)
    bounded(lambda: os.stat(hostile_mount.join("obs", obs_id)))  # the observation itself is fine
    rss_before = rss_bytes(hostile_mount.process.pid)
    clean_twin.reset_stats()
    clean_twin.faults.add("invoke", "endless_paging", match="Mast.Caom.Products")
    outcome = bounded(lambda: os.listdir(hostile_mount.join("obs", obs_id)))
    assert outcome.errno == errno.EIO
    assert total_requests(clean_twin) <= 3  # the first page (and retries of it), never page 2
    assert rss_bytes(hostile_mount.process.pid) - rss_before < 50 * 2**20
    daemon_alive_and_good(hostile_mount, clean_twin, fresh_observations)


def walk_everything(root: str, depth: int | None = None) -> dict[str, str]:
    """Every entry below ``root`` (down to ``depth`` levels of directories: 1 is ``root``'s own entries),
    listed and stat-ed through the kernel: 'ok' or the errno's name (a directory that cannot be listed is
    recorded under its own path)."""
    seen: dict[str, str] = {}
    def failed(exc: OSError) -> None:
        seen[exc.filename] = errno.errorcode[exc.errno]

    for directory, dirs, files in os.walk(root, onerror=failed):
        names = dirs + files
        level = 0 if directory == root else os.path.relpath(directory, root).count(os.sep) + 1
        if depth is not None and level + 1 >= depth:
            dirs.clear()  # stat these, but list no deeper
        for name in names:
            try:
                os.stat(os.path.join(directory, name))
                seen[os.path.join(directory, name)] = "ok"
            except OSError as exc:
                seen[os.path.join(directory, name)] = errno.errorcode[exc.errno]
    return seen


@pytest.mark.mount
def test_mount_rows_of_wrong_types_list_and_stat_without_a_crash(clean_twin, tmp_path, fresh_observations):
    program_ids = [next(fresh_observations) for _ in range(3)]
    with mounted(clean_twin, tmp_path, **FAULT_MOUNT) as mount:  # its own: its log must stay clean
        clean_twin.faults.add("invoke", "mutate_rows", mode="mixed")
        outcomes = [bounded(lambda o=o: walk_everything(mount.join("obs", o))) for o in program_ids]
        # The program: every observation row (mutated too) listed, and each observation's directories
        # listed and stat-ed (the files of three observations were walked above; all of the program's
        # would be some 30,000 kernel operations for no other row).
        outcomes.append(bounded(lambda: walk_everything(mount.join("program", twin_catalog.PROGRAM_2733), depth=2),
                                limit=120.0))
        for outcome in outcomes:
            assert outcome.ok or outcome.errno in (errno.EIO, errno.ENOENT), outcome.describe()
            if outcome.ok:
                assert set(outcome.value.values()) <= {"ok", "EIO", "ENOENT"}, outcome.value
        program_walk = outcomes[-1]
        assert program_walk.ok, program_walk.describe()
        listed_observations = {path.split(os.sep)[-2] for path, state in program_walk.value.items()
                               if state == "ok" and path.count(os.sep) - mount.join("program").count(os.sep) == 3}
        assert len(listed_observations) >= 5, program_walk.value  # observations listed, their entries stat-ed
        # every observation of the program with a usable identity is listed, whatever else its row says
        listing = bounded(lambda: os.listdir(mount.join("program", twin_catalog.PROGRAM_2733)))
        assert listing.ok, f"one odd row hid the whole listing: {listing.describe()}"
        assert len(listing.value) >= 5 and all(is_safe_name(name) for name in listing.value)
        log = mount.log_text()
        assert "Traceback" not in log and "failed unexpectedly" not in log, log[-3000:]
        daemon_alive_and_good(mount, clean_twin, fresh_observations)


def read_all(root: str) -> dict[str, str]:
    """sha256 (or the errno name) of every regular file below ``root``."""
    digests = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            try:
                digests[path] = sha256_of(path)
            except OSError as exc:
                digests[path] = errno.errorcode[exc.errno]
    return digests


@pytest.mark.mount
@pytest.mark.parametrize("field_name", ["productFilename", "dataURI"])
def test_mount_crafted_product_names_stay_inside(hostile_mount, clean_twin, field_name):
    obs_id = twin_catalog.OBS_2733_MIRI_F1130W if field_name == "productFilename" else \
        "jw02733-o002_t001_miri_f770w"
    before = outside_files(hostile_mount.base)
    bounded(lambda: os.stat(hostile_mount.join("obs", obs_id)))
    clean_twin.faults.add("invoke", "crafted_names", match="Mast.Caom.Products", field=field_name)
    root = hostile_mount.join("obs", obs_id)
    listing = bounded(lambda: walk_everything(root))
    assert listing.ok, listing.describe()
    clean_twin.faults.clear()
    for path in listing.value:
        assert path.startswith(root + "/")
        for part in os.path.relpath(path, root).split("/"):
            assert is_safe_name(part), path
    # each crafted row is hidden (then listed in products.csv only) or shown under a safe name whose
    # bytes are the product's
    rows = twin_faults.crafted_rows(
        {"data": clean_twin.catalog.product_rows(obsid_of(clean_twin, obs_id))}, field_name)["data"]
    paths = namespace.layout_products(
        [Product.from_row(row) for row in rows if str(row.get("dataURI") or "").strip()]).paths
    with open(os.path.join(root, namespace.PRODUCTS_SIDECAR), encoding="utf-8") as handle:
        csv_text = handle.read()
    for row in rows[: len(twin_faults.CRAFTED_NAMES)]:
        uri = str(row.get("dataURI") or "").strip()
        if not uri:
            continue
        assert uri.split("\n")[0] in csv_text
        if uri not in paths:
            continue
        target = os.path.join(root, paths[uri])
        assert listing.value.get(target) == "ok", (target, sorted(listing.value)[:5])
        outcome = bounded(lambda t=target: sha256_of(t))
        if clean_twin.catalog.product(uri) is None:  # a crafted dataURI MAST does not know: no bytes
            assert outcome.errno in (errno.ENOENT, errno.EIO), outcome.describe()
        else:
            assert outcome.value == clean_twin.catalog.sha256(uri)
    assert outside_files(hostile_mount.base) == before
    cache_names = [name for _root, dirs, files in os.walk(hostile_mount.cache_dir) for name in dirs + files]
    assert not any(".." in name or "escape" in name or "passwd" in name for name in cache_names)


@pytest.mark.mount
def test_mount_crafted_obs_ids_are_hidden(hostile_mount, clean_twin):
    clean_twin.faults.add("invoke", "crafted_names", match="Mast.Caom.Filtered", field="obs_id")
    outcome = bounded(lambda: os.listdir(hostile_mount.join("program", twin_catalog.BIG_PROGRAM)))
    clean_twin.faults.clear()
    assert outcome.ok, outcome.describe()
    crafted = set(twin_faults.CRAFTED_NAMES)
    assert len(outcome.value) > 400
    for name in outcome.value:
        assert is_safe_name(name) and name not in crafted and not name.startswith(".")


@pytest.mark.mount
def test_mount_crafted_s3_paths_fall_back_to_https(hostile_mount, clean_twin, fresh_observations):
    obs_id = next(fresh_observations)
    layout = layout_of(clean_twin, obs_id)
    bounded(lambda: os.listdir(hostile_mount.join("obs", obs_id)))
    before = outside_files(hostile_mount.base)
    clean_twin.faults.add("path_lookup", "crafted_names")
    public = [(uri, path) for uri, path in layout.paths.items() if not clean_twin.catalog.product(uri).exclusive]
    assert public
    for uri, path in public:
        # a hostile S3 path is no object of the bucket (or not even a valid key): the bytes come over HTTPS
        outcome = bounded(lambda p=path: sha256_of(hostile_mount.join("obs", obs_id, p)))
        assert outcome.value == clean_twin.catalog.sha256(uri), f"{path}: {outcome.describe()}"
    assert outside_files(hostile_mount.base) == before
    daemon_alive_and_good(hostile_mount, clean_twin, fresh_observations)


@pytest.mark.mount
def test_mount_cache_directory_is_private_and_holds_only_hashed_names(hostile_mount):
    assert stat.S_IMODE(os.stat(hostile_mount.cache_dir).st_mode) == 0o700
    for _root, _dirs, files in os.walk(os.path.join(hostile_mount.cache_dir, "blocks")):
        for name in files:
            assert name.isdigit() or name in ("verified", "version", "locks") or all(c in "0123456789abcdef" for c in name), name
