"""Shared fixtures: the MAST twin (real HTTP + S3 servers on loopback), started once per session."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Tell mountutil whether this test may mount (the ``mount`` marker must be truthful)."""
    import mountutil

    mountutil.MOUNT_MARKED = item.get_closest_marker("mount") is not None


@pytest.fixture(scope="session")
def twin():
    """The MAST twin at scale 0.001 (small files), shared by the whole session.

    Tests that inject faults must clear them (use the ``clean_twin`` fixture) so others see a healthy twin.
    """
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.001) as handle:
        yield handle


@pytest.fixture
def clean_twin(twin):
    """The session twin with no faults, a loopback link, its built-in tokens and zeroed counters, restored
    to no faults, a loopback link and the built-in tokens afterwards."""
    twin.faults.clear()
    twin.link.set(0, 0)
    twin.catalog.reset_tokens()
    twin.reset_stats()
    yield twin
    twin.faults.clear()
    twin.link.set(0, 0)
    twin.catalog.reset_tokens()


@pytest.fixture(scope="module")
def own_twin():
    """A twin of the test module's own (scale 0.001), for tests that reprocess or alter products: those
    changes last for the twin's life and must not reach other modules."""
    from mastfs.twin.server import Twin

    with Twin.start(scale=0.001) as handle:
        yield handle
