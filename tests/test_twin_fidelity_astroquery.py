"""astroquery 0.4.11, an independent MAST client, run against the twin: if astroquery gets the right
answers from it, the twin speaks MAST's wire protocol (and our production client is tested against the
real protocol, not our own idea of it).

astroquery is pointed at the twin the way its own tests intercept it (PortalAPI URLs, conf.server,
``utils._simple_request`` for the hard-coded resolver and path_lookup hosts) except that every request
still travels over real HTTP; boto3 finds the S3 twin through ``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

import hashlib
import warnings

import boto3
import httpx
import numpy as np
import pytest
import requests
from astropy import units as u
from astropy.coordinates import SkyCoord
from botocore import UNSIGNED
from botocore.config import Config

from mastfs.twin import catalog as twin_catalog

astroquery_mast = pytest.importorskip("astroquery.mast")

REAL_MAST = "https://mast.stsci.edu"
REAL_RESOLVER = "http://mastresolver.stsci.edu/Santa-war/query"
NGC3132 = SkyCoord(151.755 * u.deg, -40.437 * u.deg)


@pytest.fixture
def observations(clean_twin, monkeypatch, tmp_path):
    """A fresh ``ObservationsClass`` whose every request goes to the twin."""
    from astroquery.mast import conf, utils
    from astroquery.mast.discovery_portal import PortalAPI

    mast_url = clean_twin.mast_url
    monkeypatch.setattr(conf, "server", mast_url)
    monkeypatch.setattr(PortalAPI, "MAST_REQUEST_URL", mast_url + "/api/v0/invoke")
    monkeypatch.setattr(
        PortalAPI, "COLUMNS_CONFIG_URL", mast_url + "/portal/Mashup/Mashup.asmx/columnsconfig"
    )
    monkeypatch.setattr(PortalAPI, "MAST_DOWNLOAD_URL", mast_url + "/api/v0.1/Download/file")
    monkeypatch.setattr(PortalAPI, "MAST_BUNDLE_URL", mast_url + "/api/v0.1/Download/bundle")
    monkeypatch.setattr(PortalAPI, "_column_configs", {})
    real_simple_request = utils._simple_request

    def simple_request_to_twin(url, params=None):
        url = url.replace(REAL_RESOLVER, clean_twin.resolver_url).replace(REAL_MAST, mast_url)
        return real_simple_request(url, params)

    monkeypatch.setattr(utils, "_simple_request", simple_request_to_twin)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", clean_twin.s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("MAST_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield astroquery_mast.ObservationsClass()


def catalog_obs_ids(twin, program: str) -> set[str]:
    return {row["obs_id"] for row in twin.catalog.observation_rows() if row["proposal_id"] == program}


def f1130w_row(observations):
    table = observations.query_criteria(obs_id=twin_catalog.OBS_2733_MIRI_F1130W)
    assert len(table) == 1
    return table[0]


def test_query_criteria_program_2733(observations, clean_twin):
    table = observations.query_criteria(proposal_id=2733)
    assert len(table) == 12  # 11 executed observations and one planned
    assert set(table["obs_id"]) == catalog_obs_ids(clean_twin, "2733")
    assert set(table["obs_collection"]) == {"JWST", "OPO"}
    assert table["s_ra"].dtype == np.float64 and table["calib_level"].dtype.kind == "i"
    (planned,) = table[table["calib_level"] == -1]
    assert planned["obs_id"] == twin_catalog.PLANNED_2733_OBS_ID
    assert planned["t_obs_release"] == twin_catalog.PLANNED_RELEASE_MJD
    assert len(observations.get_product_list(planned)) == 0


def test_query_criteria_count(observations):
    assert observations.query_criteria_count(proposal_id=2733) == 12


def test_query_criteria_by_dataproduct_type_finds_the_spectra(observations, clean_twin):
    table = observations.query_criteria(dataproduct_type="spectrum")
    assert list(table["obs_id"]) == [twin_catalog.SPECTRA_OBS_ID]
    (obs,) = table
    products = observations.get_product_list(obs)
    x1d = observations.filter_products(products, productSubGroupDescription="X1D", calib_level=[3])
    assert list(x1d["productFilename"]) == [f"{twin_catalog.SPECTRA_OBS_ID}_x1d.fits"]
    assert set(products["dataproduct_type"]) >= {"spectrum"}


def test_query_criteria_with_wildcard_and_range(observations, clean_twin):
    rows = [
        row for row in clean_twin.catalog.observation_rows() if row["proposal_id"] == "2733" and row["t_min"]
    ]
    low = min(row["t_min"] for row in rows)
    table = observations.query_criteria(obs_id="jw02733-o002*", t_min=[low - 1, low + 1000])
    expected = {
        row["obs_id"]
        for row in rows
        if row["obs_id"].startswith("jw02733-o002") and low - 1 <= row["t_min"] <= low + 1000
    }
    assert expected and set(table["obs_id"]) == expected


def test_query_region_matches_an_astropy_cone(observations, clean_twin):
    table = observations.query_region(NGC3132, radius=0.2 * u.deg)
    expected = {
        row["obs_id"]
        for row in clean_twin.catalog.observation_rows()
        if row["s_ra"] is not None
        and NGC3132.separation(SkyCoord(row["s_ra"] * u.deg, row["s_dec"] * u.deg)) <= 0.2 * u.deg
    }
    assert expected and set(table["obs_id"]) == expected
    assert "distance" in table.colnames
    assert twin_catalog.PLANNED_2733_OBS_ID in set(table["obs_id"])


def test_query_object_resolves_the_name_through_santa(observations, clean_twin):
    table = observations.query_object("NGC 3132", radius=0.1 * u.deg)
    assert catalog_obs_ids(clean_twin, "2733") & set(table["obs_id"])
    with pytest.raises(astroquery_mast.utils.ResolverError):
        observations.query_object(twin_catalog.UNRESOLVABLE_NAME)


def test_product_list_and_filter_products(observations, clean_twin):
    obs = f1130w_row(observations)
    products = observations.get_product_list(obs)
    expected_rows = clean_twin.catalog.product_rows(str(obs["obsid"]))
    assert len(products) == len(expected_rows) >= 3000
    science = observations.filter_products(products, calib_level=[2], productType="SCIENCE")
    expected_science = [
        row for row in expected_rows if row["calib_level"] == 2 and row["productType"] == "SCIENCE"
    ]
    assert len(science) == len(expected_science) > 0


def test_download_products_over_http(observations, clean_twin, tmp_path):
    obs = f1130w_row(observations)
    products = observations.filter_products(
        observations.get_product_list(obs), productSubGroupDescription="CAL"
    )
    chosen = products[:2]
    manifest = observations.download_products(chosen, download_dir=str(tmp_path), cache=False, verbose=False)
    assert list(manifest["Status"]) == ["COMPLETE", "COMPLETE"]
    for path, uri in zip(manifest["Local Path"], chosen["dataURI"], strict=True):
        with open(path, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == clean_twin.catalog.sha256(uri)
    assert clean_twin.stats()["endpoints"]["download"]["requests"] >= 2
    assert "s3" not in clean_twin.stats()["endpoints"]


def test_download_products_from_the_cloud(observations, clean_twin, tmp_path):
    obs = f1130w_row(observations)
    products = observations.filter_products(
        observations.get_product_list(obs), productSubGroupDescription="CAL"
    )
    chosen = products[:2]
    observations.enable_cloud_dataset(verbose=False)
    assert observations.get_cloud_uris(chosen, verbose=False) == [
        f"s3://stpubdata/{clean_twin.catalog.product(uri).s3_key}" for uri in chosen["dataURI"]
    ]
    clean_twin.reset_stats()
    manifest = observations.download_products(chosen, download_dir=str(tmp_path), cache=False, verbose=False)
    assert list(manifest["Status"]) == ["COMPLETE", "COMPLETE"]
    for path, uri in zip(manifest["Local Path"], chosen["dataURI"], strict=True):
        with open(path, "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == clean_twin.catalog.sha256(uri)
    endpoints = clean_twin.stats()["endpoints"]
    assert endpoints["s3:GetObject"]["bytes_sent"] == sum(
        clean_twin.catalog.product(uri).size for uri in chosen["dataURI"]
    )
    assert "download" not in endpoints


def test_cloud_uri_of_an_http_only_product_is_none(observations, clean_twin):
    observations.enable_cloud_dataset(verbose=False)
    public = next(p for p in clean_twin.catalog.products() if p.s3_key and not p.exclusive)
    uris = observations.get_cloud_uris(
        [public.uri, twin_catalog.HTTP_ONLY_URI], verbose=False, return_uri_map=True
    )
    assert uris == {public.uri: f"s3://stpubdata/{public.s3_key}", twin_catalog.HTTP_ONLY_URI: None}


def test_login_session_info_and_exclusive_download(observations, clean_twin, tmp_path):
    assert observations.session_info(verbose=False)["anon"] is True
    exclusive = clean_twin.catalog.product(twin_catalog.EXCLUSIVE_URI)
    status, message, _ = observations.download_file(
        exclusive.uri, local_path=str(tmp_path / "anon.fits"), cache=False, verbose=False
    )
    assert status == "ERROR" and "401" in message
    observations.login(token=twin_catalog.VALID_TOKEN)
    assert observations.session_info(verbose=False)["anon"] is False
    target = tmp_path / exclusive.filename
    status, _, _ = observations.download_file(
        exclusive.uri, local_path=str(target), cache=False, verbose=False
    )
    assert status == "COMPLETE"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == clean_twin.catalog.sha256(exclusive.uri)


def test_login_with_an_expired_token_fails(observations):
    from astroquery.exceptions import LoginError

    with pytest.raises(LoginError):
        observations.login(token=twin_catalog.EXPIRED_TOKEN)


def test_boto3_unsigned_finds_the_twin_through_the_environment(observations, clean_twin):
    product = next(p for p in clean_twin.catalog.products() if p.s3_key and p.size > 10_000)
    s3 = boto3.client("s3", config=Config(signature_version=UNSIGNED))
    assert s3.head_object(Bucket="stpubdata", Key=product.s3_key)["ContentLength"] == product.size
    ranged = s3.get_object(Bucket="stpubdata", Key=product.s3_key, Range="bytes=2880-5759")
    assert ranged["Body"].read() == clean_twin.catalog.read(product.uri, 2880, 2880)


# ---- issue 10: the real archive's size and limits ---------------------------------------------------


def invoke_log(twin) -> list[dict]:
    with httpx.Client(base_url=twin.mast_url, timeout=30) as http:
        return [entry for entry in http.get("/__twin__/requests").json()["requests"] if entry["endpoint"] == "invoke"]


def test_query_criteria_shows_shared_obs_ids_as_separate_rows(observations):
    table = observations.query_criteria(obs_id=twin_catalog.SHARED_OBS_ID)
    assert len(table) == 2 and len(set(table["obsid"])) == 2


def test_get_product_list_pages_through_the_300000_product_observation(observations, clean_twin):
    (obs,) = observations.query_criteria(obs_id=twin_catalog.MOSAIC_OBS_ID)
    clean_twin.reset_stats()
    products = observations.get_product_list(obs)
    rows = clean_twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    # astroquery 0.4.11 asks pages of 50,000 and follows pagesFiltered: it gets every row, once.
    pages = [(entry["page"], entry["pagesize"]) for entry in invoke_log(clean_twin)
             if entry["service"] == "Mast.Caom.Products"]
    assert pages == [(page, 50_000) for page in range(1, -(-len(rows) // 50_000) + 1)]
    assert len(products) == len(rows) >= 300_000
    assert len(set(products["dataURI"])) == len(rows)
    assert products["dataURI"][-1] == rows[len(rows) - 1]["dataURI"]
    auxiliary = observations.filter_products(products, productType="AUXILIARY")
    assert len(auxiliary) > 0.9 * len(products)


def mosaic_cal_uris(twin, count: int) -> list[str]:
    """``count`` cloud-hosted cal/rate products of the mosaic (exposures' and guide stars')."""
    rows = twin.catalog.product_rows(twin_catalog.MOSAIC_OBSID)
    return [row["dataURI"] for row in rows[7:5000] if row["productFilename"].endswith(("_cal.fits", "_rate.fits"))
            and twin.catalog.product(row["dataURI"]).s3_key][:count]


def test_get_cloud_uris_of_40_mosaic_products_passes_the_url_limit(observations, clean_twin):
    observations.enable_cloud_dataset(verbose=False)
    uris = mosaic_cal_uris(clean_twin, 40)
    assert observations.get_cloud_uris(uris, verbose=False) == [
        f"s3://stpubdata/{clean_twin.catalog.product(uri).s3_key}" for uri in uris]


def test_get_cloud_uris_sends_50_uris_a_request_and_gets_414(observations, clean_twin):
    """astroquery 0.4.11 still batches path_lookup by 50 (MAST's 414 made later versions send 40)."""
    observations.enable_cloud_dataset(verbose=False)
    with pytest.raises(requests.HTTPError, match="414"):
        observations.get_cloud_uris(mosaic_cal_uris(clean_twin, 50), verbose=False)


def test_get_cloud_uris_in_batches_of_40_resolves_every_product(observations, clean_twin, monkeypatch):
    from astroquery.mast import utils

    real_split = utils.split_list_into_chunks
    monkeypatch.setattr(utils, "split_list_into_chunks", lambda items, chunk_size: real_split(items, 40))
    observations.enable_cloud_dataset(verbose=False)
    uris = mosaic_cal_uris(clean_twin, 120)
    clean_twin.reset_stats()
    assert observations.get_cloud_uris(uris, verbose=False) == [
        f"s3://stpubdata/{clean_twin.catalog.product(uri).s3_key}" for uri in uris]
    assert clean_twin.stats()["endpoints"]["path_lookup"]["requests"] == 3
