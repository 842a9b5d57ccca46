"""Hostile names at every level of a real mount: over a thousand generated names (very long, unicode,
control characters, dots, huge numbers, ``2733' OR 1=1``, ``%``, ``*``, ``;`` ...).

A name that cannot be valid is ENOENT (or EINVAL), or ENAMETOOLONG past 255 bytes, and costs no request
at all (the twin's counters do not move). A name that can be valid is sent to MAST exactly as written, as
one filter value or one resolver name (the twin's request log shows what arrived): no filter injection.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
from mountutil import mounted
from reliability_util import FAULT_MOUNT, bounded, total_requests, twin_requests

from mastfs import namespace
from mastfs.errors import InvalidName
from mastfs.twin import catalog as twin_catalog

OBS = twin_catalog.OBS_2733_MIRI_F1130W
NOT_FOUND = {errno.ENOENT, errno.EINVAL}
SEED = 6

INJECTIONS = [
    "2733' OR 1=1", "2733' OR '1'='1", "2733; DROP TABLE caom", "2733 OR 1=1--", "%", "%%", "*", ";", "?",
    "2733%", "2733*", "27_3%", "'", '"', "`id`", "$(id)", "${HOME}", "a|b", "a&b", "<x>", "{}", "a\\b", "#",
    "=", "!", "^", "2733\"", "obs_id=*", '{"paramName": "obs_id"}', "%00", "%2F", "..%2F..%2Fetc",
    "jw02733*", "jw02733-o002_t001_miri_f1130w;x", "M101' --", "NGC 3132%",
]
DOTS = ["...", "....", ".hidden", ".git", ".Trash-1000", ".DS_Store", ".xdg-volume-info", "..x", ". ", ".."
        + "x" * 10]
PROBES = ["autorun.inf", "desktop.ini", "Thumbs.db", "AUTORUN.INF", "lost+found"]
INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"abc\x80", b"\xed\xa0\x80", b"2733\xfe", b"\xf8\x88\x80\x80\x80"]
UNICODE_RANGES = [(0xA1, 0x17F), (0x370, 0x3FF), (0x590, 0x6FF), (0x2000, 0x206F), (0x3040, 0x30FF),
                  (0x4E00, 0x4FFF), (0xFF10, 0xFF5A), (0x1F300, 0x1F6FF), (0x300, 0x36F)]


def unicode_name(rng: random.Random) -> str:
    """A name with at least one non-ASCII character (which no MAST id, target or cone can hold)."""
    low, high = rng.choice(UNICODE_RANGES)
    chars = [chr(rng.randint(low, high)) for _ in range(rng.randint(1, 30))]
    chars += rng.choices("abc0123456789 -_", k=rng.randint(0, 10))
    rng.shuffle(chars)
    text = "".join(chars).strip()
    return text if any(ord(c) > 127 for c in text) and not text.startswith(".") else "\u00e9" + text


def control_name(rng: random.Random) -> str:
    control = chr(rng.choice([*range(1, 32), 127]))
    base = rng.choice(["2733", OBS, "NGC 3132", "151.7,-40.4", "x"])
    cut = rng.randint(0, len(base))
    return base[:cut] + control + base[cut:]


def long_name(rng: random.Random) -> str:
    """More than 255 bytes (the kernel itself refuses past 1,024)."""
    length = rng.choice([256, 257, 300, 511, 1000, 1024, 1500, 4000])
    unit = rng.choice(["9", "x", "\u00e9", "\U0001F600", "jw02733-o002_"])
    return unit * -(-length // len(unit.encode()))


def generated_invalid_names(count: int, seed: int) -> list[str | bytes]:
    """``count`` names no level of the tree can hold, plus the fixed hostile lists."""
    rng = random.Random(seed)
    makers = [unicode_name, control_name, long_name]
    names: list[str | bytes] = [*INJECTIONS, *DOTS, *PROBES, *INVALID_UTF8]
    while len(names) < count:
        names.append(rng.choice(makers)(rng))
    return names


def byte_length(name: str | bytes) -> int:
    return len(name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape"))


LEVELS = {
    "root": (),
    "program": ("program",),
    "program_2733": ("program", twin_catalog.PROGRAM_2733),
    "obs": ("obs",),
    "observation": ("obs", OBS),
    "level_dir": ("obs", OBS, "level3"),
    "target": ("target",),
    "cone": ("cone",),
}

# Names the grammar of one level rejects although they look like the right kind of thing.
LEVEL_EXTRAS = {
    "program": ["9" * n for n in range(8, 60, 3)] + ["0", "02733", "-1", "+2733", "2733.0", "1e5", "0x2733",
                                                    "\uff12\uff17\uff13\uff13", " 2733", "2733 ", "2 733"],
    "obs": ["a..b", "x" * 129, "-abc", "_abc", "+abc", "jw02733 o002", "jw02733-o002..t001"],
    "target": ["a--b", "x" * 101, " NGC 3132", "NGC 3132 ", "NGC..3132", "-M101", "_M101"],
    "cone": ["999,0", "0,91", "10,10,0", "10,10,2", "nan,nan", "inf,0", "1e400,0", "10,10,-1", "10;10",
             "10 10", "10,10,0.5,1", "+-1,0", "0x10,0", "360,0", "-0.1,0", "10,", ",10", "10,10,"],
}
LEVEL_GRAMMAR = {"program": namespace.parse_program_id, "obs": namespace.parse_obs_id,
                 "target": namespace.parse_target_name, "cone": namespace.parse_cone}


@pytest.fixture(scope="module")
def mount(twin, tmp_path_factory):
    twin.faults.clear()
    with mounted(twin, tmp_path_factory.mktemp("names"), **FAULT_MOUNT) as live:
        # Warm the directories whose names are looked up below, so only the names themselves count.
        os.listdir(live.join("program", twin_catalog.PROGRAM_2733))
        os.listdir(live.join("obs", OBS, "level3"))
        yield live


def path_of(mount, level: tuple[str, ...], name: str | bytes) -> str | bytes:
    if isinstance(name, bytes):
        return os.path.join(os.fsencode(mount.join(*level)), name)
    return mount.join(*level, name)


def stat_errno(path: str | bytes) -> int | None:
    outcome = bounded(lambda: os.stat(path))
    return outcome.errno


def test_the_generated_names_really_break_every_grammar():
    for name in generated_invalid_names(180, SEED):
        text = name if isinstance(name, str) else os.fsdecode(name)
        for parse in LEVEL_GRAMMAR.values():
            with pytest.raises(InvalidName):
                parse(text)
    for level, names in LEVEL_EXTRAS.items():
        for name in names:
            with pytest.raises(InvalidName):
                LEVEL_GRAMMAR[level](name)


@pytest.mark.mount
def test_a_thousand_invalid_names_at_every_level_cost_no_request(mount, twin):
    names = generated_invalid_names(180, SEED)
    twin.faults.clear()
    requests_before = total_requests(twin)
    tried = 0
    wrong: list[tuple[str, object, str]] = []
    for level_name, level in LEVELS.items():
        for name in [*names, *LEVEL_EXTRAS.get(level_name, [])]:
            code = stat_errno(path_of(mount, level, name))
            tried += 1
            expected = {errno.ENAMETOOLONG} if byte_length(name) > namespace.NAME_MAX else NOT_FOUND
            if code not in expected:
                wrong.append((level_name, name, errno.errorcode.get(code, "ok") if code else "ok"))
    assert tried >= 1000
    assert not wrong, wrong[:20]
    assert total_requests(twin) == requests_before, twin.stats()
    assert mount.process.poll() is None


@pytest.mark.mount
def test_names_that_cannot_be_listed_are_not_created_by_a_listing(mount):
    # The kernel never sees a hostile name in a listing either: every entry shown is a plain component.
    for level in LEVELS.values():
        for name in os.listdir(mount.join(*level)):
            namespace.check_component(name)


def requests_since(twin, seq: int) -> list[dict]:
    return [entry for entry in twin_requests(twin) if entry["seq"] > seq]


def last_seq(twin) -> int:
    entries = twin_requests(twin)
    return entries[-1]["seq"] if entries else 0


PLAUSIBLE_OBS_IDS = [
    "jw02733-o002_t001_miri_f1130w+x", "A.B-C_D+E", "1" * 128, "x+y", "o.o", "jw02733-o002_t001_miri_f1130W",
    "hst_11599_01_wfc3_uvis_f502n+or+1", "0",
]
PLAUSIBLE_TARGETS = [
    "NGC 3132+x", "M101 (core)", "ABC [x] 12:34,56", "a_b.c-d", "Sgr A+", "WR 140, 2", "NGC 3132 OR 1",
    "x" * 100, "a (b) [c]: d, e",
]


@pytest.mark.mount
def test_plausible_obs_ids_arrive_intact_as_one_filter_value(mount, twin):
    twin.faults.clear()
    for name in PLAUSIBLE_OBS_IDS:
        namespace.parse_obs_id(name)
        seq = last_seq(twin)
        assert stat_errno(mount.join("obs", name)) == errno.ENOENT
        invokes = [entry for entry in requests_since(twin, seq) if entry["endpoint"] == "invoke"]
        assert len(invokes) == 1, invokes
        filters = invokes[0]["params"]["filters"]
        obs_filters = [flt for flt in filters if flt["paramName"] == "obs_id"]
        assert obs_filters == [{"paramName": "obs_id", "values": [name]}], filters
        assert {flt["paramName"] for flt in filters} <= {"obs_id", "obs_collection"}


@pytest.mark.mount
def test_plausible_target_names_arrive_intact_as_one_resolver_name(mount, twin):
    twin.faults.clear()
    for name in PLAUSIBLE_TARGETS:
        namespace.parse_target_name(name)
        seq = last_seq(twin)
        assert stat_errno(mount.join("target", name)) == errno.ENOENT
        lookups = [entry for entry in requests_since(twin, seq) if entry["endpoint"] == "resolver"]
        # The name as written first; a hyphenated one (MAST's own target_name spelling) once more with
        # its hyphens as blanks, as docs/namespace.md says. Nothing else is sent.
        expected = [[name]] + ([[" ".join(name.replace("-", " ").split())]] if "-" in name else [])
        assert [entry["names"] for entry in lookups] == expected, lookups
        assert not [entry for entry in requests_since(twin, seq) if entry["endpoint"] == "invoke"]


@pytest.mark.mount
def test_a_valid_cone_sends_exactly_its_numbers(mount, twin):
    twin.faults.clear()
    seq = last_seq(twin)
    listing = os.listdir(mount.join("cone", "151.755,-40.437,0.05"))
    assert OBS in listing
    invokes = [entry for entry in requests_since(twin, seq) if entry["endpoint"] == "invoke"]
    assert len(invokes) == 1
    params = invokes[0]["params"]
    sent = params.get("position") or f"{params.get('ra')}, {params.get('dec')}, {params.get('radius')}"
    assert [float(part) for part in str(sent).split(",")] == [151.755, -40.437, 0.05]
