"""What MAST's dashboards show at a glance, through a real mount: `user.mastfs.kind` and
`user.mastfs.observation_date` (and the same two columns in products.csv), and each observation's
`recommended/` view of its "Minimum Recommended Products" (the same files, fetched once), with
`mastfs prefetch --recommended`."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from mountutil import endpoint_requests, mounted

from mastfs import namespace
from mastfs.mast.models import Observation, Product

OBS = "jw02733-o002_t001_miri_f770w"
MASTFS = os.path.join(os.path.dirname(sys.executable), "mastfs")


def product_named(filename: str, **fields) -> Product:
    return Product.from_row({"dataURI": f"mast:JWST/product/{filename}", "productFilename": filename, **fields})


def mjd_iso(mjd: float) -> str:
    moment = datetime(1858, 11, 17, tzinfo=timezone.utc) + timedelta(days=mjd)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(("filename", "kind"), [
    ("jw02733002001_02103_00001_mirimage_uncal.fits", "image"),
    ("jw02733002001_02103_00001_mirimage_rateints.fits", "image"),
    ("jw02733-o002_t001_miri_f770w_i2d.fits", "image"),
    ("jw01234-o001_t001_nirspec_clear-prism_s2d.fits", "image"),
    ("jw02733-o002_t001_miri_f770w_cat.ecsv", "table"),
    ("jw02733-o002_20230503t151256_image3_00123_asn.json", "table"),
    ("jw02733_20230503t151256_pool.csv", "table"),
    ("jw01234-o001_t001_nirspec_clear-prism_x1d.fits", "table"),
    ("jw01234001001_03101_00001_nrs1_x1dints.fits", "table"),
    ("jw01234-o001_t001_nirspec_clear-prism_s3d.fits", "cube"),
    ("jw01234-o001_t001_nirspec_clear-prism_c1d.fits", "spectrum"),
    ("jw02733-o002_t001_miri_f770w_i2d_thumb.jpg", "preview"),
    ("ib6w01a1q_trl.fits", "other"),
])
def test_kind_follows_the_documented_table(filename, kind):
    assert namespace.product_kind(product_named(filename)) == kind
    assert f"`{kind}`" in (namespace.README_TEXT)


def test_observation_date_falls_back_from_t_min_to_t_max_to_release():
    base = {"obs_id": "x", "obsid": "1"}
    assert namespace.observation_date(Observation.from_row({**base, "t_min": 59733.5, "t_max": 59734.0,
                                                            "t_obs_release": 59800.0})) == "2022-06-03T12:00:00Z"
    assert namespace.observation_date(Observation.from_row({**base, "t_max": 59734.0,
                                                            "t_obs_release": 59800.0})) == "2022-06-04T00:00:00Z"
    assert namespace.observation_date(Observation.from_row({**base, "t_obs_release": 62502.0})) == \
        "2030-01-01T00:00:00Z"
    assert namespace.observation_date(Observation.from_row(base)) is None


@pytest.mark.mount
def test_kind_and_observation_date_on_files_directories_and_in_products_csv(twin, clean_twin, tmp_path):
    row = next(r for r in twin.catalog.observation_rows() if r["obs_id"] == OBS)
    expected_date = mjd_iso(row["t_min"])
    with mounted(twin, tmp_path) as live:
        observation = live.join("program", "2733", OBS)
        assert os.getxattr(observation, "user.mastfs.observation_date").decode() == expected_date
        with open(os.path.join(observation, "products.csv"), encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        shown = [r for r in rows if r["mastfs_path"]]
        assert {r["mastfs_observation_date"] for r in rows} == {expected_date}
        kinds = {r["mastfs_kind"] for r in shown}
        assert {"image", "table", "preview"} <= kinds
        for r in shown[:: max(1, len(shown) // 40)]:
            path = os.path.join(observation, r["mastfs_path"])
            assert os.getxattr(path, "user.mastfs.kind").decode() == r["mastfs_kind"], path
            assert os.getxattr(path, "user.mastfs.observation_date").decode() == expected_date
            assert "user.mastfs.kind" in os.listxattr(path)
        i2d = os.path.join(observation, "level3", f"{OBS}_i2d.fits")
        assert os.getxattr(i2d, "user.mastfs.kind") == b"image"
        assert os.getxattr(os.path.join(observation, "level3", f"{OBS}_cat.ecsv"), "user.mastfs.kind") == b"table"


@pytest.mark.mount
def test_recommended_view_is_the_minimum_recommended_products_as_the_same_files(twin, clean_twin, tmp_path):
    obsid = next(r for r in twin.catalog.observation_rows() if r["obs_id"] == OBS)["obsid"]
    expected = {r["productFilename"] for r in twin.catalog.product_rows(obsid)
                if r["productGroupDescription"] == namespace.MINIMUM_RECOMMENDED}
    assert expected and f"{OBS}_i2d.fits" in expected
    with mounted(twin, tmp_path) as live:
        observation = live.join("obs", OBS)
        assert "recommended" in os.listdir(observation)
        recommended = os.path.join(observation, "recommended")
        assert set(os.listdir(recommended)) == expected
        with open(os.path.join(observation, "products.csv"), encoding="utf-8", newline="") as handle:
            where = {r["productFilename"]: r["mastfs_path"] for r in csv.DictReader(handle)}
        for name in expected:
            in_view, in_group = os.stat(os.path.join(recommended, name)), os.stat(os.path.join(observation, where[name]))
            assert in_view.st_ino == in_group.st_ino, name
        clean_twin.reset_stats()
        catalog_file = f"{OBS}_cat.ecsv"
        with open(os.path.join(observation, where[catalog_file]), "rb") as handle:
            first = handle.read()
        sent = clean_twin.stats()["total_bytes_sent"]
        assert sent >= len(first) > 0
        with open(os.path.join(recommended, catalog_file), "rb") as handle:
            assert handle.read() == first
        assert clean_twin.stats()["total_bytes_sent"] == sent  # one cache entry: no second download

        clean_twin.reset_stats()
        result = subprocess.run([MASTFS, "prefetch", "--recommended", observation], capture_output=True,
                                text=True, timeout=300, check=True)
        manifest = [line for line in result.stdout.splitlines() if line.startswith(("done", "skipped", "failed"))]
        assert len(manifest) == len(expected), result.stdout
        assert all(any(f"/{name}" in line for line in manifest) for name in expected), result.stdout
        assert endpoint_requests(clean_twin.stats(), "invoke:Mast.Caom.Products") == 0
