"""Doctests of flowrl.operators, flowrl.plans and flowrl.connectors, run through their
installed names (pytest collects flowrl/ itself with --doctest-modules)."""

import doctest
import importlib
import pkgutil

import pytest

import flowrl.connectors
import flowrl.operators
import flowrl.plans

MODULES = sorted(info.name for package in (flowrl.operators, flowrl.plans, flowrl.connectors)
                 for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."))


def test_there_are_doctests_to_run():
    assert "flowrl.connectors.safe_unpack" in MODULES and "flowrl.operators.train" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
