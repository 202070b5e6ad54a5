import os
import signal

import pytest
from hypothesis import settings

os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# A shell's background job (`make test &`) starts with SIGINT ignored, and the processes the
# tests start inherit that: the Ctrl-C tests' subprocesses would never see their SIGINT. Handle
# it here as Python does when started from a terminal (a handler, unlike SIG_IGN, ends at exec).
signal.signal(signal.SIGINT, signal.default_int_handler)

# Property tests check correctness, not speed: no per-example deadline, which would fail at
# random on a loaded machine (CI shares its cores).
settings.register_profile("flowrl", deadline=None)
settings.load_profile("flowrl")


@pytest.fixture(scope="session")
def _ray_at_exit():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_session(_ray_at_exit):
    """The test session's Ray, 2 CPUs: started by the first test that asks for it and kept (ray.init
    costs ~4 s). A module that needs another Ray (tests/test_tune.py) shuts this one down first;
    the next test that asks for it starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray


@pytest.fixture(params=["local", "ray"])
def executor(request):
    """Every engine and operator test runs once per executor; the answers must agree."""
    from flowrl import make_executor

    if request.param == "ray":
        request.getfixturevalue("ray_session")
        return make_executor("ray")
    return make_executor("local")
