"""The fixtures of the multi-host tests: the hosts (network namespaces; skipped, saying why, where
they cannot be made) and datumflow's cluster deployed on them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.cluster.deployment import HOSTS, Deployment, deployed
from tests.hosts import Hosts, hosts, unavailable


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """The hosts the test module names in HOSTS (by default those of deployment.py)."""
    why = unavailable()
    if why:
        pytest.skip(f"cannot make hosts as network namespaces here: {why}")
    with hosts(getattr(request.module, "HOSTS", HOSTS)) as made:
        yield made
    assert not made.leftovers(), f"left behind: {made.leftovers()}"


@pytest_asyncio.fixture
async def deployment(lab: Hosts, tmp_path: Path, aws_env: None) -> AsyncIterator[Deployment]:
    async with deployed(lab, tmp_path) as d:
        yield d
