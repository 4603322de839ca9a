import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI and developers run the suite with pytest-xdist on 2 cores: one intra-op thread per worker avoids
# oversubscription (measured: a fixture test went from 22.6 s to 1.5 s under load).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


ORIGINAL_CLIP_LEN = 16  # slices per clip, fixed in the original's pseudo-3D UNet and data pipeline (fixture rows: clip-major)
FIXTURES_ENV = "GEM3D_ORIGINAL_FIXTURES"
REQUIRE_ENV = "GEM3D_REQUIRE_FIXTURES"  # "1" (set by .ci/run): missing fixtures are an error, never a skip


def fixture_root() -> Path:
    """Root of the original GEM-3D test vectors (env GEM3D_ORIGINAL_FIXTURES, else ../shared next to the repo)."""
    default = ROOT.parent / "shared" / "fixtures" / "original-gem3d"
    return Path(os.environ.get(FIXTURES_ENV, str(default)))


def missing_fixtures_message(root: Path) -> str:
    return f"original GEM-3D fixtures not found at {root} (set {FIXTURES_ENV} to their folder)"


def child_env(**extra: str) -> dict:
    """Environment for a child process (a script, main.py, pytest) that imports this checkout's gem3d, installed or
    not: this checkout first on PYTHONPATH, offline, one OpenMP thread."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def skip_missing_fixtures(message: str) -> None:
    """Skip the calling test because original fixtures are missing (``message`` says which); with
    GEM3D_REQUIRE_FIXTURES=1 fail it instead. Every skip for missing fixtures goes through here."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_ENV}=1 requires them", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def gem3d_cache_in_tmp(tmp_path_factory) -> Path:
    """The default cache root (``$GEM3D_CACHE``) in a temporary folder: tests never write to ~/.cache/gem3d."""
    root = tmp_path_factory.mktemp("gem3d_cache")
    previous = os.environ.get("GEM3D_CACHE")
    os.environ["GEM3D_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("GEM3D_CACHE", None)
    else:
        os.environ["GEM3D_CACHE"] = previous


@pytest.fixture(scope="session")
def original_fixtures() -> Path:
    """The fixture folder; absent: every test using it skips with one shared reason (an error with
    GEM3D_REQUIRE_FIXTURES=1)."""
    root = fixture_root()
    if not root.is_dir():
        skip_missing_fixtures(missing_fixtures_message(root))
    return root


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips for missing fixtures are reported at this file's fixture, so that ``-ra`` folds them into one line."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and missing_fixtures_message(fixture_root()) in str(
            report.longrepr[2]):
        fixture = getattr(original_fixtures, "__wrapped__", original_fixtures)
        report.longrepr = (__file__, getattr(getattr(fixture, "__code__", None), "co_firstlineno", 0), report.longrepr[2])


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield
