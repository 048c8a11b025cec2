"""The lab's secret files are never readable by others, not even between their creation and a chmod."""

from __future__ import annotations

import os
import stat

from lab.services import write_private


def test_a_secret_file_is_created_private(tmp_path):
    path = tmp_path / "secrets.json"
    old = os.umask(0)
    try:
        write_private(path, '{"bmc": "x"}')
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == '{"bmc": "x"}'


def test_an_existing_file_loses_its_wider_mode(tmp_path):
    path = tmp_path / "upsd.users"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "[monitor]\n", 0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "[monitor]\n"
