import dataclasses

import pytest

from mastfs.cli import build_parser
from mastfs.config import OPTIONS, Settings, config_path, load_settings, parse_duration, parse_size


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """A temporary HOME and XDG_CONFIG_HOME, so no test reads the user's real ~/.config/mastfs."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("MASTFS_CONFIG", raising=False)
    return home


def test_every_option_is_a_settings_field():
    assert [f.name for f in dataclasses.fields(Settings)] == [o.name for o in OPTIONS]
    for option in OPTIONS:
        assert option.help and option.why, option.name


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('source = "http"\ncache_size = "2G"\ntransfers = 3\n')
    env = {"MASTFS_CACHE_SIZE": "3G", "MASTFS_TRANSFERS": "4"}
    settings = load_settings({"transfers": "5"}, env=env, path=path)
    assert settings.transfers == 5
    assert settings.cache_size == 3 * 2**30
    assert settings.source == "http"
    assert settings.deadline == 30.0


def test_bad_values_name_the_option_and_source(tmp_path):
    with pytest.raises(ValueError, match="source from MASTFS_SOURCE"):
        load_settings(env={"MASTFS_SOURCE": "ftp"}, path=tmp_path / "none.toml")
    path = tmp_path / "config.toml"
    path.write_text("no_such_option = 1\n")
    with pytest.raises(ValueError, match="unknown settings no_such_option"):
        load_settings(env={}, path=path)


@pytest.mark.parametrize(("text", "expected"), [("512M", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("4096", 4096),
                                                ("20GiB", 20 * 2**30)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("90", 90.0), ("15m", 900.0), ("2h", 7200.0), ("30d", 2592000.0)])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


def test_config_path_follows_the_environment(private_home, tmp_path):
    assert config_path({}) == private_home / ".config" / "mastfs" / "config.toml"
    assert config_path({"XDG_CONFIG_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "mastfs" / "config.toml"
    assert config_path({"MASTFS_CONFIG": str(tmp_path / "x.toml")}) == tmp_path / "x.toml"


def test_the_default_config_file_is_read(private_home):
    path = private_home / ".config" / "mastfs" / "config.toml"
    path.parent.mkdir()
    path.write_text('source = "http"\n')
    assert load_settings(env={}).source == "http"


def test_mount_flags_reach_settings():
    args = build_parser().parse_args(["mount", "/mnt/x", "--collection", "JWST,HST", "--source", "s3",
                                      "--cache-size", "1G", "--allow-other"])
    settings = load_settings(vars(args), env={})
    assert settings.collections == ["JWST", "HST"]
    assert settings.source == "s3"
    assert settings.cache_size == 2**30
    assert settings.allow_other is True
