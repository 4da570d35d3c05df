"""The public API is what ``ordpool.__all__`` says, and every public callable is documented."""

from __future__ import annotations

import concurrent.futures
import configparser
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ordpool


def test_all_lists_exactly_the_public_names() -> None:
    public = {name for name in vars(ordpool) if not name.startswith("_")}
    # submodules are reachable as attributes once imported; they are not API
    public -= {name for name, obj in vars(ordpool).items() if inspect.ismodule(obj)}
    assert set(ordpool.__all__) - {"__version__"} == public
    assert len(ordpool.__all__) == len(set(ordpool.__all__))
    assert ordpool.__all__ == sorted(ordpool.__all__)


def test_every_public_callable_has_a_docstring() -> None:
    for name in ordpool.__all__:
        obj = getattr(ordpool, name)
        if name == "__version__":
            assert isinstance(obj, str)
            assert obj.count(".") == 2
            continue
        assert inspect.getdoc(obj), f"ordpool.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert inspect.getdoc(member), f"ordpool.{name}.{attr} has no docstring"


def test_error_hierarchy() -> None:
    assert issubclass(ordpool.BrokenPool, concurrent.futures.BrokenExecutor)
    assert issubclass(ordpool.WorkerInitError, ordpool.BrokenPool)
    for name in ("BrokenPool", "WorkerCrashed", "WorkerInitError", "PoolClosed", "QueueFull"):
        assert issubclass(getattr(ordpool, name), ordpool.OrdpoolError)
    assert issubclass(ordpool.PoolClosed, RuntimeError)


def test_importing_ordpool_does_not_import_ray() -> None:
    code = "import sys, ordpool; print('ray' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


@pytest.mark.timeout(60)
def test_install_requires_is_exactly_what_import_ordpool_imports():
    """The library's install needs only the third-party packages its runtime imports."""
    probe = "import sys, ordpool; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    imported = {
        name
        for name in out
        if name not in sys.stdlib_module_names and name != "ordpool" and not name.startswith("_")
    }
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    required = {
        re.split(r"[<>=!~\[ ;]", line.strip())[0].lower()
        for line in config["options"]["install_requires"].strip().splitlines()
    }
    assert imported == required == {"cloudpickle", "psutil"}
