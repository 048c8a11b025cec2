"""ci/patch-window.sh, what the scheduled workflow runs, against the lab with the real `fleet` (issue 12
item 3): a window whose first wave preflight refuses (a UPS on battery) is red with an ::error::, no host
is changed, and the next window resumes the blocked run (still blocked: red again, still nothing changed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import lab_release
from tests.integration.test_rollout import HALL, LAB_POLICY, converge, lb_states, releases_on_hosts

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci/patch-window.sh"
FLEET = Path(sys.executable).parent / "fleet"


@pytest.fixture(scope="module")
def converged(lab):
    """Every lab host on one bundle and serving (2026-10 unless an earlier test left them all on 2026-11)."""
    if len(set(releases_on_hosts(lab).values())) != 1 or None in releases_on_hosts(lab).values():
        converge(lab, "2026-10")
    return lab


def window(tmp_path: Path, release: str, inventory: Path) -> subprocess.CompletedProcess:
    """One scheduled window: the script as the workflow runs it (the shipped workflow's schedule is checked
    against the lab policy, which has no windows: always open)."""
    env = {**os.environ, "FLEET": str(FLEET), "RELEASE": str(lab_release(release)), "INVENTORY": str(inventory),
           "POLICY": str(LAB_POLICY), "JOURNAL": str(tmp_path / "journal.db"), "REPORTS": str(tmp_path / "reports"),
           "LIMIT": HALL, "FLEET_CI_ON_PARTIAL": "fail"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("::error::")]


def test_a_blocked_window_is_red_and_changes_no_host(converged, tmp_path, clean_faults):
    lab = converged
    before, lb_before = releases_on_hosts(lab), lb_states(lab)
    target = "2026-10" if before["dgx-a1"] == "2026-11" else "2026-11"
    lab.fault("ups-a", "ups-on-battery")  # the hall's hosts (the canary dgx-a1 first) draw from ups-a

    first = window(tmp_path, target, lab.inventory)
    output = first.stdout + first.stderr
    assert first.returncode != 0, output[-4000:]
    assert first.returncode == 4, f"blocked is exit 4 (patching/states.py ExitCode.BLOCKED): {output[-4000:]}"
    [error] = errors(output)
    assert "blocked by preflight" in error and "UPS ups-a is not on line power" in error, error
    assert "agree" in output, "check-schedule ran first and passed"
    assert "--steal-lock" not in output
    assert releases_on_hosts(lab) == before
    assert lb_states(lab) == lb_before

    status = subprocess.run([str(FLEET), "patch", "status", "--brief", "--journal", str(tmp_path / "journal.db")],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert status.returncode == 0 and " status=blocked " in f" {status.stdout} " and "lock=free" in status.stdout

    # the next window resumes the blocked run (no new run, no lock to steal); still on battery: red again
    second = window(tmp_path, target, lab.inventory)
    output = second.stdout + second.stderr
    assert "is blocked: resuming it" in output and "patch resume" in output, output[-4000:]
    assert second.returncode == 4, output[-4000:]
    assert errors(output) and "UPS ups-a" in errors(output)[0]
    assert releases_on_hosts(lab) == before
    assert lb_states(lab) == lb_before
