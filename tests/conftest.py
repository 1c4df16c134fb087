"""Shared test setup: real data from ../shared/data unless NIN_DATA says otherwise."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"
if "NIN_DATA" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["NIN_DATA"] = str(_DEFAULT_DATA)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data folder (MNIST, Fashion-MNIST, the CIFAR-10 copy); skips when absent."""
    root = Path(os.environ.get("NIN_DATA", _DEFAULT_DATA))
    if not (root / "mnist").is_dir():
        pytest.skip(f"real data not found under {root}")
    return root
