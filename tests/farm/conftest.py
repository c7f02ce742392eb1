"""The farm's fixtures: one throwaway PostgreSQL cluster per test session,
a database of its own for each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.farm.pg import Cluster, FarmDatabase, available

_CLUSTER: list[Cluster] = []


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    if not available():
        if __import__("os").environ.get("CI"):
            pytest.fail("postgresql-15 is not installed (.ci/run installs it)")
        pytest.skip("postgresql-15 is not installed (apt-get install postgresql-15)")
    cluster = Cluster()
    try:
        cluster.init()
    except Exception:
        cluster.destroy()
        raise
    yield cluster
    cluster.destroy()


@pytest.fixture
def farm_db(pg_cluster: Cluster) -> Iterator[FarmDatabase]:
    """A fresh database; the cluster is running again after each test."""
    db = FarmDatabase(pg_cluster, pg_cluster.new_database())
    yield db
    pg_cluster.start()  # a test that stopped it and failed before starting it again
