import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A fresh, reported seed per test: random data, never zeros, reproducible from the log."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("PYDECOUPLE_TEST_SEED") is None \
        else int(os.environ["PYDECOUPLE_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        seed = dict(item.user_properties).get("seed")
        rep.sections.append(("seed", f"rerun with PYDECOUPLE_TEST_SEED={seed}"))


@pytest.fixture
def backend(monkeypatch):
    """Force one backend for the duration of a test."""
    def use(name):
        monkeypatch.setenv("PYDECOUPLE_BACKEND", name)
    return use


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine, OpenMP
    regions of 2 threads stall on a descheduled worker (tests ran 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
