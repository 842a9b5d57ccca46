"""mastfs.mast.models against every recorded real MAST answer shipped in the astroquery wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mastfs.errors import BadResponse
from mastfs.mast.models import (
    Identity,
    Observation,
    Paging,
    Product,
    level_from_filename,
    normalise_id,
    parse_count,
    parse_invoke_response,
    parse_path_lookup,
    parse_resolver_response,
    parse_rows,
    s3_key_from_path,
)


def _recorded_dir() -> Path:
    spec = importlib.util.find_spec("astroquery")
    assert spec is not None and spec.origin, "astroquery is part of the test extra"
    return Path(spec.origin).parent / "mast" / "tests" / "data"


RECORDED = _recorded_dir()


def recorded(name: str):
    return json.loads((RECORDED / name).read_text())


# Every JSON answer astroquery records, by the parser that must accept it. Answers of services mastfs does
# not use (catalogs, missions, cutouts, column configs) are not invoke answers: parse_invoke_response must
# refuse them with BadResponse rather than misread them, or parse them as generic rows (catalog services
# speak the invoke shape).
OBSERVATION_FILES = {"caom.json": 19, "advSearch.json": 3, "advSearchPos.json": 12}
GENERIC_INVOKE_FILES = {"dd.json": 7, "hsc.json": 28, "matchid.json": 9, "spectra.json": 26, "tic.json": 7}
NOT_INVOKE_FILES = {
    "bundleResponse.json", "columnsconfig.json", "ddcolumns.json", "ddcolumns_filtered.json",
    "mission_columns.json", "mission_products.json", "mission_results.json", "panstarrs.json",
    "panstarrs_columns.json", "tess_sector.json", "ticcolumns.json", "ticcolumns_filtered.json",
    "zcut_survey.json", "resolver.json", "mast_relative_path.json",
}
SPECIAL_FILES = {"products.json", "countsResp.json"}


def test_every_recorded_answer_is_covered():
    shipped = {path.name for path in RECORDED.glob("*.json")}
    covered = set(OBSERVATION_FILES) | set(GENERIC_INVOKE_FILES) | NOT_INVOKE_FILES | SPECIAL_FILES
    assert shipped == covered


@pytest.mark.parametrize("name", sorted(NOT_INVOKE_FILES))
def test_non_invoke_answers_are_refused(name):
    with pytest.raises(BadResponse):
        parse_invoke_response(recorded(name))


@pytest.mark.parametrize("name,count", sorted(GENERIC_INVOKE_FILES.items()))
def test_catalog_answers_parse_as_rows(name, count):
    rows, paging, status, msg = parse_invoke_response(recorded(name))
    assert (len(rows), status, msg) == (count, "COMPLETE", "")
    # Recorded paging is not always consistent with the rows (spectra.json: rowsFiltered 45762, 26 rows):
    # the client trusts pagesFiltered only.
    assert paging.page == 1 and paging.pages_filtered == 1


@pytest.mark.parametrize("name,count", sorted(OBSERVATION_FILES.items()))
def test_recorded_observations_parse(name, count):
    rows, paging, status, _ = parse_invoke_response(recorded(name))
    assert status == "COMPLETE"
    assert paging == Paging(page=1, page_size=50000, pages_filtered=1, rows_filtered=count)
    observations = parse_rows(rows, Observation)
    assert len(observations) == count
    for obs in observations:
        assert isinstance(obs.obsid, str) and obs.obsid.isdigit()  # JSON numbers in the recording
        assert obs.obs_id and obs.obs_collection
        assert obs.calib_level in (1, 2, 3)
        assert isinstance(obs.t_obs_release, float)
        assert obs.data_rights is None and not obs.is_exclusive  # column absent in these recordings
        assert Observation.from_row(obs.fields) == obs  # the cache round trip


def test_caom_field_values():
    rows, *_ = parse_invoke_response(recorded("caom.json"))
    first, galex = Observation.from_row(rows[0]), Observation.from_row(rows[-1])
    assert first.obs_id == "U27XCS01T"
    assert first.obsid == "2003585980"
    assert first.fields["objID"] == "2012765872"
    assert first.proposal_id == "5371"
    assert first.obs_collection == "HST"
    assert first.instrument_name == "WFPC2/WFC"
    assert first.filters == "F814W"
    assert first.t_obs_release == pytest.approx(50121.7945)
    assert first.t_min == pytest.approx(49756.25506) and first.t_max == pytest.approx(49756.27242)
    assert first.s_ra == pytest.approx(23.11817129395) and first.s_dec == pytest.approx(60.64213575852)
    assert first.fields["distance"] == pytest.approx(293.0973439304444)  # extra columns are kept
    assert "_selected_" in first.fields and first.fields["_selected_"] is None
    assert galex.obs_collection == "GALEX" and galex.proposal_id is None and galex.calib_level == 2


def test_position_search_ids_as_numbers_become_text():
    rows, *_ = parse_invoke_response(recorded("advSearchPos.json"))
    obs = Observation.from_row(rows[1])
    assert obs.obs_id == "3212159586576367616"
    assert obs.obsid == "1000004956"
    assert obs.proposal_id == "177"
    assert obs.fields["objID1"] == "1000004937"
    assert obs.obs_collection == "GALEX" and obs.calib_level == 2


def test_recorded_products_parse():
    rows, paging, status, _ = parse_invoke_response(recorded("products.json"))
    assert status == "COMPLETE" and paging.rows_filtered == 22
    products = parse_rows(rows, Product)
    assert len(products) == 22
    first = products[0]
    assert first.data_uri == "mast:HST/product/u9o40504m_c3m.fits"
    assert first.filename == "u9o40504m_c3m.fits"
    assert first.size == 207360
    assert first.product_type == "AUXILIARY"
    assert first.subgroup == "C3M"
    assert first.obsid == "2003738726"  # obsID, a JSON number in the recording
    assert first.obs_id == "U9O40504M"
    assert first.calib_level is None and first.level is None  # HST names imply no level
    assert first.data_rights is None and not first.is_exclusive
    science = [p for p in products if p.product_type == "SCIENCE"]
    assert len(science) == 7
    assert max(products, key=lambda p: p.size).filename == "u9o40504m_drz.fits"
    assert all(Product.from_row(p.fields) == p for p in products)
    assert len(set(products) | set(parse_rows(rows, Product))) == 22  # hashable, equal by content


def test_recorded_count():
    rows, *_ = parse_invoke_response(recorded("countsResp.json"))
    assert parse_count(rows) == 599


def test_recorded_resolver():
    assert parse_resolver_response(recorded("resolver.json")) == pytest.approx(
        (124.531756290083, -68.3129998725044))


def test_recorded_path_lookup():
    payload = recorded("mast_relative_path.json")
    uris = list(payload)
    assert parse_path_lookup(payload, uris) == {
        "mast:HST/product/u9o40504m_c3m.fits": "hst/public/u9o4/u9o40504m/u9o40504m_c3m.fits",
        "mast:HST/product/does_not_exist.fits": None,
    }


# --- tolerance beyond the recordings -------------------------------------------------------------------


def test_ids_as_numbers_or_strings():
    assert normalise_id(2003738726) == "2003738726"
    assert normalise_id(2003738726.0) == "2003738726"
    assert normalise_id(" 87602 ") == "87602"
    assert normalise_id(None) is None and normalise_id("") is None


def test_observation_without_identity_is_refused_and_dropped_from_listings():
    good = {"obs_id": "jw02733-o002_t001_miri_f1130w", "obsid": 87602}
    with pytest.raises(BadResponse):
        Observation.from_row({"obs_id": None, "obsid": 1})
    with pytest.raises(BadResponse):
        Observation.from_row(["not", "a", "row"])
    parsed = parse_rows([good, {"obsid": 2}], Observation)
    assert [obs.obsid for obs in parsed] == ["87602"]


def test_nulls_and_missing_newer_columns():
    obs = Observation.from_row({"obs_id": "x", "obsid": "1", "t_obs_release": None, "s_ra": "nan"})
    assert obs.t_obs_release is None and obs.s_ra is None and obs.calib_level is None
    assert obs.data_rights is None and not obs.is_exclusive
    exclusive = Observation.from_row({"obs_id": "x", "obsid": "1", "dataRights": "exclusive_access"})
    assert exclusive.data_rights == "EXCLUSIVE_ACCESS" and exclusive.is_exclusive


def test_product_defaults_for_nulls():
    product = Product.from_row({
        "dataURI": "mast:JWST/product/jw02733002001_02103_00001_mirimage_cal.fits",
        "productFilename": None, "productType": None, "size": None, "calib_level": None,
        "obsID": 87602, "parent_obsid": "87600", "dataRights": "PUBLIC", "newColumn": [1, 2],
    })
    assert product.filename == "jw02733002001_02103_00001_mirimage_cal.fits"
    assert product.product_type == "UNKNOWN"
    assert product.size is None
    assert product.level == 2
    assert product.obsid == "87602" and product.parent_obsid == "87600"
    assert product.fields["newColumn"] == [1, 2]
    assert Product.from_row({"dataURI": "mast:X/y.fits", "size": -1}).size is None
    assert Product.from_row({"dataURI": "mast:X/y.fits", "size": "2880"}).size == 2880
    assert Product.from_row({"dataURI": "mast:X/y.fits", "calib_level": 3}).level == 3
    with pytest.raises(BadResponse):
        Product.from_row({"dataURI": None, "productFilename": "a.fits"})


@pytest.mark.parametrize("filename,level", [
    ("jw02733002001_02103_00001_mirimage_uncal.fits", 1),
    ("jw02733002001_02103_00001_mirimage_rate.fits", 2),
    ("jw02733002001_02103_00001_mirimage_rateints.fits", 2),
    ("jw02733002001_02103_00001_mirimage_cal.fits", 2),
    ("jw02733002001_02103_00001_mirimage_i2d.fits", 2),
    ("jw02733002001_02103_00001_mirimage_crf.fits", 3),
    ("jw02733-o002_t001_miri_f1130w_i2d.fits", 3),
    ("jw02733-o002_t001_miri_f1130w_segm.fits", 3),
    ("jw02733-o002_t001_miri_f1130w_cat.ecsv", 3),
    ("jw02733-c1001_t001_miri_f1130w_i2d.fits", 3),
    ("jw02733-o002_t001_miri_f1130w_i2d.jpg", None),
    ("jw02733-o002_20220713t152326_image3_00001_asn.json", None),
    ("u9o40504m_c3m.fits", None),
])
def test_level_from_jwst_filename(filename, level):
    assert level_from_filename(filename) == level


@pytest.mark.parametrize("payload", [
    [], "COMPLETE", {"status": "DONE", "data": []}, {"status": "COMPLETE"},
    {"status": "COMPLETE", "data": [1, 2]}, {"status": "COMPLETE", "data": [], "paging": []},
    {"status": "COMPLETE", "data": [], "paging": {"page": 0, "pagesFiltered": 1}},
])
def test_invoke_shape_errors(payload):
    with pytest.raises(BadResponse):
        parse_invoke_response(payload)


def test_invoke_executing_and_error():
    assert parse_invoke_response({"status": "EXECUTING", "msg": "", "data": None})[2] == "EXECUTING"
    rows, _, status, msg = parse_invoke_response({"status": "ERROR", "msg": "Must be logged in"})
    assert (rows, status, msg) == ([], "ERROR", "Must be logged in")
    rows, paging, *_ = parse_invoke_response({"status": "COMPLETE", "data": [{"a": 1}]})
    assert rows == [{"a": 1}] and paging == Paging()


def test_count_shape_errors():
    with pytest.raises(BadResponse):
        parse_count([])
    with pytest.raises(BadResponse):
        parse_count([{"Column1": None}])


def test_resolver_unresolvable_and_bad_shapes():
    assert parse_resolver_response({"resolvedCoordinate": [], "status": ""}) is None
    assert parse_resolver_response({"resolvedCoordinate": None, "status": ""}) is None
    for bad in ([], {"foo": 1}, {"resolvedCoordinate": "x", "status": ""}):
        with pytest.raises(BadResponse):
            parse_resolver_response(bad)


def test_path_lookup_mappings_and_gaps():
    payload = {
        "a": {"status_code": 200, "path": "/jwst/public/jw02733/L3/t/o002/x_i2d.fits"},
        "b": {"status_code": 404, "path": None},
        "c": {"status_code": 200, "path": "/mast/galex/x.fits"},
    }
    assert parse_path_lookup(payload, ["a", "b", "c", "missing"]) == {
        "a": "jwst/public/jw02733/L3/t/o002/x_i2d.fits", "b": None, "c": "galex/x.fits", "missing": None}
    assert s3_key_from_path("/ps1/public/x.fits") == "panstarrs/ps1/public/public/x.fits"
    assert s3_key_from_path("/hlsp_local/public/foo/x.fits") == "mast/foo/x.fits"
    with pytest.raises(BadResponse):
        parse_path_lookup(["a"], ["a"])
    with pytest.raises(BadResponse):
        parse_path_lookup({"a": "path"}, ["a"])


def test_identity():
    anon = Identity.from_payload({"anon": True, "ezid": "anonymous"})
    assert anon.anonymous and anon.ezid == "anonymous" and anon.display_name is None
    user = Identity.from_payload({"anon": False, "ezid": "jdoe", "attrib": {"display_name": "J Doe"},
                                  "scopes": ["mast:exclusive_access"]})
    assert not user.anonymous and user.display_name == "J Doe" and user.scopes == ("mast:exclusive_access",)
    with pytest.raises(BadResponse):
        Identity.from_payload({"ezid": "x"})
