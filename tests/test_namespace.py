"""The namespace grammar: name validation, product layout, sidecars and values (pure, no I/O)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mastfs import namespace
from mastfs.errors import InvalidName, NameTooLong
from mastfs.mast.models import Observation, Product


def product(filename, product_type="SCIENCE", calib_level=2, uri=None, **extra):
    row = {
        "obsID": "87602001",
        "dataURI": uri or f"mast:JWST/product/{filename}",
        "productFilename": filename,
        "productType": product_type,
        "calib_level": calib_level,
        "size": 1234,
        "dataRights": "PUBLIC",
        **extra,
    }
    return Product.from_row(row)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", [
    ".hidden", ".Trash", ".Trash-1000", ".xdg-volume-info", ".git", ".DS_Store", ".directory",
    "autorun.inf", "AUTORUN.INF", "desktop.ini", "Thumbs.db", "lost+found", "", "..", ".",
    "a\x01b", "tab\tname", "50%", "M*", "x;drop table", "' OR 1=1", 'quote"d', "back\\slash",
])
def test_hostile_and_probe_names_are_invalid(name):
    with pytest.raises(InvalidName):
        namespace.check_component(name)


def test_too_long_name_is_name_too_long():
    with pytest.raises(NameTooLong):
        namespace.check_component("a" * 256)
    namespace.check_component("a" * 255)


@pytest.mark.parametrize("name", ["2733", "1", "1234567"])
def test_program_ids_accepted(name):
    assert namespace.parse_program_id(name) == name


@pytest.mark.parametrize("name", ["02733", "0", "27a3", "abc", "-1", "12345678", "2733 ", "2733.0", "jw02733"])
def test_program_ids_rejected(name):
    with pytest.raises(InvalidName):
        namespace.parse_program_id(name)


@pytest.mark.parametrize("name", [
    "jw02733-o002_t001_miri_f1130w", "STSCI_PR_2022-033", "hst_12345_01_wfc3_uvis_f555w", "ib1f01010",
])
def test_obs_ids_accepted(name):
    assert namespace.parse_obs_id(name) == name


@pytest.mark.parametrize("name", ["-leading-dash", "a..b", "a b", "a/b", "x" * 129, "obs%"])
def test_obs_ids_rejected(name):
    with pytest.raises(InvalidName):
        namespace.parse_obs_id(name)


@pytest.mark.parametrize("name", ["NGC 3132", "M101", "2MASS J12345678+1234567", "alf Cen", "Southern Ring Nebula"])
def test_target_names_accepted(name):
    assert namespace.parse_target_name(name) == name


@pytest.mark.parametrize("name", ["NGC 3132 ", " M101", "a--b", "x" * 101, "Barnard's", "M101;", "NGC%"])
def test_target_names_rejected(name):
    with pytest.raises(InvalidName):
        namespace.parse_target_name(name)


def test_cone_parsing():
    assert namespace.parse_cone("151.755,-40.437") == namespace.Cone(151.755, -40.437, 0.2)
    assert namespace.parse_cone("0,90,1") == namespace.Cone(0.0, 90.0, 1.0)
    assert namespace.parse_cone("359.9,-90,.05") == namespace.Cone(359.9, -90.0, 0.05)


@pytest.mark.parametrize("name", [
    "360,0", "-1,0", "10,91", "10,-90.5", "10,10,0", "10,10,-1", "10,10,1.5", "10", "10,20,30,40",
    "1e2,3", "nan,1", "inf,1", "10;20", "ra,dec", "10, 20", "10,,20",
])
def test_malformed_cones_rejected(name):
    with pytest.raises(InvalidName):
        namespace.parse_cone(name)


@given(st.text(max_size=40))
def test_parsers_raise_only_invalid_name(text):
    for parse in (namespace.parse_program_id, namespace.parse_obs_id, namespace.parse_target_name,
                  namespace.parse_cone):
        try:
            parse(text)
        except InvalidName:
            pass


# ----------------------------------------------------------------------------------------------- layout


def test_science_products_grouped_by_level_and_types_by_directory():
    products = [
        product("jw02733002001_02103_00001_mirimage_uncal.fits", calib_level=1),
        product("jw02733002001_02103_00001_mirimage_cal.fits", calib_level=2),
        product("jw02733-o002_t001_miri_f1130w_i2d.fits", calib_level=3),
        product("jw02733-o002_t001_miri_f1130w_i2d.jpg", product_type="PREVIEW", calib_level=3),
        product("jw02733-o002_t001_miri_f1130w_i2d_thumb.jpg", product_type="THUMBNAIL", calib_level=3),
        product("jw02733-o002_20220601t000000_image3_00001_asn.json", product_type="INFO", calib_level=3),
        product("jw02733002001_gs-fg_00001_cal.fits", product_type="AUXILIARY", calib_level=2),
        product("weird.dat", product_type="SOMETHINGNEW", calib_level=2),
    ]
    layout = namespace.layout_products(products)
    assert list(layout.groups) == ["level1", "level2", "level3", "auxiliary", "info", "preview",
                                   "thumbnail", "other"]
    assert list(layout.groups["level2"]) == ["jw02733002001_02103_00001_mirimage_cal.fits"]
    assert layout.paths["mast:JWST/product/weird.dat"] == "other/weird.dat"


def test_products_without_level_or_type_are_placed_by_file_name():
    products = [
        product("jw02733002001_02103_00001_mirimage_rate.fits", calib_level=None),
        product("jw02733-o002_t001_miri_f1130w_i2d.fits", calib_level=None),
        product("mystery.fits", calib_level=None),
        product("jw02733-o002_t001_miri_f1130w_i2d_thumb.jpg", product_type=None, calib_level=None),
        product("jw02733-o002_t001_miri_f1130w_i2d.jpg", product_type=None, calib_level=None),
        product("jw02733-o002_20220601t000000_image3_00001_asn.json", product_type=None, calib_level=None),
        product("jw02733002001_02103_00001_mirimage_uncal.fits", product_type=None, calib_level=None),
        product("notes.txt", product_type=None, calib_level=None),
    ]
    paths = namespace.layout_products(products).paths
    prefix = "mast:JWST/product/"
    assert paths[prefix + "jw02733002001_02103_00001_mirimage_rate.fits"].startswith("level2/")
    assert paths[prefix + "jw02733-o002_t001_miri_f1130w_i2d.fits"].startswith("level3/")
    assert paths[prefix + "mystery.fits"] == "other/mystery.fits"
    assert paths[prefix + "jw02733-o002_t001_miri_f1130w_i2d_thumb.jpg"].startswith("thumbnail/")
    assert paths[prefix + "jw02733-o002_t001_miri_f1130w_i2d.jpg"].startswith("preview/")
    assert paths[prefix + "jw02733-o002_20220601t000000_image3_00001_asn.json"].startswith("info/")
    assert paths[prefix + "jw02733002001_02103_00001_mirimage_uncal.fits"].startswith("level1/")
    assert paths[prefix + "notes.txt"] == "other/notes.txt"


def test_duplicates_by_uri_collapse_and_name_clashes_are_disambiguated():
    products = [
        product("a_cal.fits"),
        product("a_cal.fits"),  # same dataURI: one file
        product("a_cal.fits", uri="mast:JWST/product/elsewhere/a_cal.fits"),
        product("../evil", uri="mast:JWST/product/x/..", productFilename=None),
    ]
    layout = namespace.layout_products(products)
    assert list(layout.groups["level2"]) == ["a_cal.fits", "a_cal.fits~2"]
    assert len(layout.paths) == 2


def test_hostile_product_file_names_fall_back_to_the_uri_name():
    layout = namespace.layout_products([product(".hidden_cal.fits", uri="mast:JWST/product/good_cal.fits")])
    assert layout.paths == {"mast:JWST/product/good_cal.fits": "level2/good_cal.fits"}


# ---------------------------------------------------------------------------------------------- values


def test_field_xattrs_are_text_and_omit_nulls():
    xattrs = namespace.field_xattrs({"obs_id": "jw1", "calib_level": 3, "t_min": 59800.5, "dataRights": None,
                                     "mtFlag": False, "bad name": "x", "s_ra": float("nan")})
    assert xattrs == {
        "user.mast_obs_id": b"jw1",
        "user.mast_calib_level": b"3",
        "user.mast_t_min": b"59800.5",
        "user.mast_mtFlag": b"false",
    }


def test_sidecars_hold_every_field():
    observation = Observation.from_row({"obs_id": "jw1", "obsid": 87602001, "t_max": None, "extra": "x"})
    data = json.loads(namespace.observation_json(observation))
    assert data == {"obs_id": "jw1", "obsid": "87602001", "t_max": None, "extra": "x"}

    products = [product("a_cal.fits"), product("b_uncal.fits", calib_level=1, newcol="n, with comma")]
    layout = namespace.layout_products(products)
    rows = list(csv.DictReader(io.StringIO(namespace.products_csv(products, layout.paths).decode())))
    assert len(rows) == 2
    assert rows[0]["dataURI"] == "mast:JWST/product/a_cal.fits"
    assert rows[0]["mastfs_path"] == "level2/a_cal.fits"
    assert rows[0]["newcol"] == ""
    assert rows[1]["newcol"] == "n, with comma"
    assert rows[1]["size"] == "1234"


def test_mjd_conversion():
    assert namespace.mjd_to_unix(40587) == 0.0
    assert namespace.mjd_to_unix(59770.0) == (59770 - 40587) * 86400
    assert namespace.mjd_to_unix(None) is None
    assert namespace.mjd_to_unix(float("nan")) is None


def test_readme_text_is_the_namespace_document():
    doc = Path(__file__).resolve().parent.parent / "docs" / "namespace.md"
    assert doc.read_text() == namespace.README_TEXT
