"""The top-level folders operators/, plans/ and connectors/ install as flowrl.operators, ...;
each module must exist once, under its flowrl.* name (pytest must not import it again as a
top-level package, which makes `except flowrl.connectors.DatasetError` miss the other copy)."""

import importlib
import pkgutil
import sys

import flowrl

FOLDERS = ("operators", "plans", "connectors")


def flowrl_modules():
    names = ["flowrl"]
    for info in pkgutil.walk_packages(flowrl.__path__, "flowrl."):
        names.append(info.name)
    return names


def test_every_module_is_imported_once_under_its_flowrl_name():
    for name in flowrl_modules():
        importlib.import_module(name)
    doubles = sorted(n for n in sys.modules if n.split(".")[0] in FOLDERS)
    assert doubles == [], f"imported a second time as top-level packages: {doubles}"
    import flowrl.connectors
    import flowrl.connectors.safe_unpack as safe_unpack

    assert flowrl.connectors.safe_unpack is safe_unpack
    assert safe_unpack.UnsafePickleError.__module__ == "flowrl.connectors.safe_unpack"


def test_the_subpackages_are_the_installed_folders():
    from pathlib import Path

    root = Path(flowrl.__file__).resolve().parent.parent
    for folder in FOLDERS:
        module = importlib.import_module(f"flowrl.{folder}")
        assert Path(module.__file__).resolve().parent == root / folder
