"""A Dask cluster of two worker processes maps over mast:// paths, sharing one cache directory."""

from __future__ import annotations

import numpy as np
import pytest

from mastfs.remote import MastFileSystem
from mastfs.twin import catalog as twin_catalog

OBS_DIR = f"program/{twin_catalog.PROGRAM_2733}/{twin_catalog.OBS_2733_MIRI_F1130W}"


def file_bytes_sent(stats):
    return sum(stats["endpoints"].get(key, {}).get("bytes_sent", 0) for key in ("s3:GetObject", "download"))


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        yield client


def test_dask_workers_compute_on_mast_paths_what_local_copies_give(cluster, twin, tmp_path):
    def sci_median(path, options):
        from astropy.io import fits

        with fits.open(f"mast://{path}", use_fsspec=True, fsspec_kwargs=options) as hdul:
            return float(np.nanmedian(hdul["SCI"].data))

    options = {"mast_url": twin.mast_url, "resolver_url": twin.resolver_url, "s3_endpoint": twin.s3_endpoint,
               "cache_dir": str(tmp_path / "shared-cache")}
    fs = MastFileSystem(**options)
    cal = [entry["name"] for entry in fs.ls(f"{OBS_DIR}/level2")
           if entry["name"].endswith("_cal.fits") and entry["mast_productType"] == "SCIENCE"]
    assert len(cal) >= 2
    workers = sorted(cluster.scheduler_info()["workers"])
    assert len(workers) == 2

    twin.reset_stats()
    per_worker = [cluster.map(sci_median, cal, options=options, workers=[worker], allow_other_workers=False,
                              pure=False) for worker in workers]
    medians = [cluster.gather(futures) for futures in per_worker]
    shared_bytes = file_bytes_sent(twin.stats())

    # the same work by one worker on a cold cache of its own: what one transfer of each block costs
    alone = {**options, "cache_dir": str(tmp_path / "alone-cache")}
    twin.reset_stats()
    cluster.gather(cluster.map(sci_median, cal, options=alone, workers=[workers[0]], pure=False))
    assert shared_bytes == file_bytes_sent(twin.stats()) > 0  # both workers on every product: no more

    local = tmp_path / "local"
    fs.get(cal, str(local) + "/")
    from astropy.io import fits

    expected = []
    for name in cal:
        with fits.open(local / name.rsplit("/", 1)[1]) as hdul:
            expected.append(float(np.nanmedian(hdul["SCI"].data)))
    assert medians[0] == medians[1] == expected
