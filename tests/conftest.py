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


def fixture_root() -> Path:
    """Root of the original GEM-3D test vectors (env GEM3D_ORIGINAL_FIXTURES)."""
    default = ROOT.parent / "shared" / "fixtures" / "original-gem3d"
    return Path(os.environ.get("GEM3D_ORIGINAL_FIXTURES", str(default)))


@pytest.fixture(scope="session")
def original_fixtures() -> Path:
    root = fixture_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"original GEM-3D fixtures not found at {root}; set GEM3D_ORIGINAL_FIXTURES to their folder"
        )
    return root


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield
