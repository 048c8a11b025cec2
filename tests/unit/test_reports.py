"""Per-run reports: report.json, junit.xml (one case per host per gate), summary.md, events.jsonl."""

import json
import xml.etree.ElementTree as ET

import pytest

from patching.journal.reports import write_reports
from tests.unit.fakefleet import NEW
from tests.unit.test_runner import Harness


@pytest.fixture
def failed_run(tmp_path):
    """Canary a1 fails its SLO gate on the new bundle and also cannot be rolled back; a4 is unreachable."""
    h = Harness(tmp_path, {"rollback": "wave"})
    h.fleet.slow[("a1", "*")] = 480.0
    h.fleet.hosts["a4"]["reachable"] = False
    h.run()
    return h


def test_junit_has_one_case_per_host_per_gate(failed_run, tmp_path):
    paths = write_reports(failed_run.journal.of_run(1), tmp_path / "reports")
    root = ET.parse(paths["junit.xml"]).getroot()
    assert root.tag == "testsuites"
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    for gate in ("ansible", "testinfra", "slo", "soak"):
        assert ("a1", gate) in cases and ("b1", gate) in cases
    slo = cases[("a1", "slo")].find("failure")
    assert slo is not None
    assert slo.get("message").startswith("p99 480.0 ms >= 200 ms; latency: p99 480.0 ms vs baseline")
    figures = json.loads(slo.text)
    assert figures["measurements"]["p99_ms"] == 480.0 and figures["thresholds"]["p99_ms"] == 200
    assert cases[("a1", "soak")].find("skipped") is not None  # never reached
    assert cases[("b1", "soak")].find("failure") is None and cases[("b1", "soak")].find("skipped") is None
    # the rollback's gates are cases too, on the old bundle
    assert cases[("a1", "rollback slo")].find("failure") is not None
    assert cases[("b1", "rollback slo")].find("failure") is None
    assert cases[("a4", "preflight")].find("skipped").get("message").startswith("unreachable at preflight")
    assert int(root.get("tests")) == len(cases) and int(root.get("failures")) >= 2


def test_summary_says_what_failed_and_why(failed_run, tmp_path, monkeypatch):
    step_summary = tmp_path / "step-summary.md"
    step_summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    paths = write_reports(failed_run.journal.of_run(1), tmp_path / "reports")
    summary = paths["summary.md"].read_text()
    assert summary.startswith("# Patch run 1: release 2026-11 - FAILED")
    assert "> [!CAUTION]" in summary and "ROLLBACK FAILED on 1 host(s), left drained: **a1**" in summary
    assert "| a1 | 0 | rollout | slo | p99 480.0 ms >= 200 ms; latency: p99 480.0 ms vs baseline" in summary
    assert "p99_ms=480.0" in summary
    assert "| rolled_back | 1 |" in summary and "- a4: skipped unreachable: unreachable at preflight" in summary
    assert step_summary.read_text() == "# earlier step\n" + summary + "\n"


def test_report_json_and_events_jsonl(failed_run, tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    paths = write_reports(failed_run.journal.of_run(1), tmp_path / "reports")
    report = json.loads(paths["report.json"].read_text())
    assert report["run"]["status"] == "failed" and report["run"]["rollback"] == "wave"
    assert report["hosts"]["a1"]["state"] == "rollback_failed" and report["hosts"]["a1"]["previous_bundle"] == "2026-10"
    assert [s["state"] for s in report["hosts"]["b1"]["history"]][-2:] == ["rolling_back", "rolled_back"]
    assert report["waves"][0]["failures"] == 1 and report["counts"]["pending"] == 4
    events = [json.loads(line) for line in paths["events.jsonl"].read_text().splitlines()]
    assert events[0]["kind"] == "run" and events[-1]["data"]["event"] == "finished"
    assert any(e["kind"] == "gate" and e["host"] == "a1" and not e["data"]["ok"] for e in events)


def test_no_secret_reaches_any_report(failed_run, tmp_path):
    # the fake SLO probe returns an Authorization value among its measurements
    paths = write_reports(failed_run.journal.of_run(1), tmp_path / "reports")
    for path in paths.values():
        text = path.read_text()
        assert "abcdefghijklmnop" not in text, path.name
    assert '"auth": "***"' in paths["report.json"].read_text()


def test_clean_run_summary(tmp_path):
    h = Harness(tmp_path)
    h.run()
    summary = write_reports(h.journal.of_run(1), tmp_path / "r")["summary.md"].read_text()
    assert "DONE" in summary and f"7 of 7 selected host(s) on {NEW}" in summary and "Failed gates" not in summary
