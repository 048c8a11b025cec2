import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def lab_stack() -> dict:
    """The lab stack file's content, a fresh copy to mutate."""
    return copy.deepcopy(yaml.safe_load((ROOT / "Pulumi.lab.yaml").read_text()))


@pytest.fixture
def bundle_data() -> dict:
    return copy.deepcopy(yaml.safe_load((ROOT / "releases/2026-11.yaml").read_text()))


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
