import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# ansible-runner and testinfra start `ansible-playbook` & co. by name: use the ones beside this Python
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


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
