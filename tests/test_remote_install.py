"""`pip install` of mastfs into a fresh virtualenv makes `fsspec.filesystem("mast")` work, no mount needed."""

from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import json, sys, importlib.metadata as md
import fsspec
fs = fsspec.filesystem("mast", **json.loads(sys.argv[1]))
print(json.dumps({"programs": fs.ls("program/2733", detail=False)[:1],
                  "installed_at": str(md.distribution("mastfs").locate_file("")),
                  "mastfs_dists": sum(1 for d in md.distributions() if d.metadata["Name"] == "mastfs"),
                  "fuse_loaded": "pyfuse3" in sys.modules}))
"""


def test_pip_install_into_a_fresh_venv_registers_the_mast_protocol(twin, tmp_path):
    import json

    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    python = str(target / "bin" / "python")
    # dependencies come from this test run's environment, minus its own mastfs install and minus pyfuse3:
    # a plain install (no `fuse` extra) must not need the FUSE library
    deps = tmp_path / "deps"
    deps.mkdir()
    for own in [p for p in site.getsitepackages() if os.path.isdir(p)]:
        for entry in os.scandir(own):
            wanted = not any(name in entry.name for name in ("mastfs", "pyfuse3")) and not entry.name.endswith(".pth")
            if wanted and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry.path)
    (Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  text=True).strip()) / "deps.pth").write_text(str(deps) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "-e", str(REPO)], check=True, timeout=240, cwd=tmp_path)
    options = {"mast_url": twin.mast_url, "resolver_url": twin.resolver_url, "s3_endpoint": twin.s3_endpoint,
               "cache_dir": str(tmp_path / "cache")}
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([python, "-c", CHECK, json.dumps(options)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["programs"] == ["program/2733/jw02733-o001_t001_nircam_clear-f090w"]
    assert answer["mastfs_dists"] == 1 and answer["installed_at"].startswith(str(target))
    assert answer["fuse_loaded"] is False  # mast:// never loads the FUSE library
    requires = json.loads(subprocess.run(
        [python, "-c", "import json, importlib.metadata as md; print(json.dumps(md.requires('mastfs')))"],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout)
    fuse_requirements = [req for req in requires if req.startswith("pyfuse3")]
    assert fuse_requirements and all('extra == "fuse"' in req for req in fuse_requirements)
    # the mount says what to install instead of a traceback
    mastfs = str(target / "bin" / "mastfs")
    mount = subprocess.run([mastfs, "mount", str(tmp_path / "mnt")], capture_output=True, text=True,
                           timeout=60, env=env, cwd=tmp_path)
    assert mount.returncode == 1
    assert "pip install 'mastfs[fuse]'" in mount.stderr and "Traceback" not in mount.stderr
    assert not (tmp_path / "mnt").exists()
