"""Shared pytest setup for resify's tests: fixtures that several test files use.

The tests import their helpers as top-level modules (``from reference import ...``, ``import styles``)
and the benchmarks as the package ``benchmarks`` (``from benchmarks.zoo import check_model``). Both
folders reach ``sys.path`` through the ``pythonpath`` setting of ``[tool.pytest.ini_options]`` in
pyproject.toml (the repository root and ``tests/``), not through code here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from reference import SEED_SIZES, ImprovedResidualNetwork

import resify


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the rest of the module, the former count restored after it.

    Small matrices run faster and far steadier on one thread on a shared machine, and some figures
    are compared to the bit; restoring the count keeps the next test file's setting its own.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def seed_network() -> Callable[..., tuple[ImprovedResidualNetwork, torch.Tensor]]:
    """Build the seed guide's plain network and its input: ``seed_network(seed)`` gives a fresh
    ``(ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False), torch.randn(10, 128))``, drawn in
    that order after ``torch.manual_seed(seed)``."""

    def build(seed: int = 0) -> tuple[ImprovedResidualNetwork, torch.Tensor]:
        torch.manual_seed(seed)
        model = ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False)
        return model, torch.randn(10, 128)

    return build


@pytest.fixture(scope="session")
def seed_reports(seed_network):
    """The seed network's plan, its report before and after the default conversion, and their comparison."""
    model, x = seed_network(0)
    converted = resify.apply(model, x)
    before, after = resify.gradient_flow(model, x), resify.gradient_flow(converted, x)
    return {
        "plan": resify.plan(model, x),
        "before": before,
        "after": after,
        "comparison": resify.compare(before, after),
    }
