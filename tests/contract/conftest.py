"""Fixtures for the contract tests: the protocol v1 contract loaded from docs/asyncapi.yaml."""

from __future__ import annotations

import pytest

from tests.contract.schemas import Contract, load_contract


@pytest.fixture(scope="session")
def contract() -> Contract:
    """The strict contract: undeclared fields in messages are violations."""
    return load_contract()


@pytest.fixture(scope="session")
def lenient_contract() -> Contract:
    """The contract as a v1 client reads it: unknown fields are ignored."""
    return load_contract(strict=False)
