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
import numpy as np
import pytest
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
    assert len(table) == 11
    assert set(table["obs_id"]) == catalog_obs_ids(clean_twin, "2733")
    assert set(table["obs_collection"]) == {"JWST", "OPO"}
    assert table["s_ra"].dtype == np.float64 and table["calib_level"].dtype.kind == "i"


def test_query_criteria_count(observations):
    assert observations.query_criteria_count(proposal_id=2733) == 11


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
