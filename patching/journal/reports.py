"""Per-run reports, all built from the journal: report.json, junit.xml, summary.md, events.jsonl.

junit.xml has one test case per host per gate (the Ansible result, testinfra, the SLO probe, the soak),
so CI shows which gate failed on which host; the failure text carries the measured figures and the
thresholds. A gate that could not measure is a JUnit `error`, one that judged and failed a `failure`.
summary.md is also appended to `$GITHUB_STEP_SUMMARY` when that is set. Event data is masked for secrets
when it is journaled; the whole report is masked again before it is written.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from patching.journal.redact import redact
from patching.journal.store import EventRow, RunJournal
from patching.states import EXIT_MEANING, ON_BUNDLE, ExitCode, Gate, HostState, Phase, Verdict, host_outcome


def build_report(journal: RunJournal) -> dict[str, Any]:
    """Everything known about a run, as JSON data."""
    run = journal.record()
    plan = run.plan
    history = journal.host_history()
    events = journal.events()
    previous = journal.previous_bundles()
    finished = next((e.data for e in reversed(events) if e.kind == "run" and e.data.get("event") == "finished"), {})
    hosts: dict[str, dict[str, Any]] = {}
    for row in history:
        entry = hosts.setdefault(row.host, {"wave": row.wave, "pool": plan["hosts"].get(row.host, {}).get("pool"),
                                            "history": [], "gates": []})
        entry.update(state=row.state.value, detail=row.detail)
        if row.wave is not None:
            entry["wave"] = row.wave
        entry["history"].append({"state": row.state.value, "at": _iso(row.at), "detail": row.detail})
    for name, entry in hosts.items():
        entry["previous_bundle"] = previous.get(name)
        entry["outcome"] = host_outcome(HostState(entry["state"]), entry["detail"]).value
    for event in events:
        if event.kind == "gate" and event.host in hosts:
            hosts[event.host]["gates"].append(_gate(event))
    waves = [
        {"index": w.index, "kind": w.kind, "hosts": w.hosts, "status": w.status, "failures": w.failures,
         "predicted_s": w.predicted_s, "started_at": _iso(w.started_at), "finished_at": _iso(w.finished_at),
         "duration_s": round(max(w.finished_at - w.started_at - w.downtime_s, 0), 3)
         if w.started_at and w.finished_at else None,
         "downtime_s": round(w.downtime_s, 3)}
        for w in journal.waves()
    ]
    return redact({
        "run": {"id": run.id, "release": run.release, "status": run.status, "message": run.message,
                "stop_reason": run.stop_reason, "stop_wave": run.stop_wave, "owner": run.owner,
                "created_at": _iso(run.created_at), "finished_at": _iso(run.finished_at),
                "bundle": run.bundle_path, "inventory": run.inventory, "limit": run.limit,
                "policy": run.policy_path, "rollback": run.policy.get("rollback")},
        "counts": dict(Counter(h["state"] for h in hosts.values())),
        "outcomes": dict(Counter(h["outcome"] for h in hosts.values())),
        "exit_code": finished.get("exit_code"),
        "waves": waves,
        "hosts": hosts,
        "skipped": plan.get("skipped", {}),
        "notes": plan.get("notes", []),
    })


def write_reports(journal: RunJournal, out_dir: Path) -> dict[str, Path]:
    """Write the four reports into `out_dir`; append the summary to $GITHUB_STEP_SUMMARY when set."""
    report = build_report(journal)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("report.json", "junit.xml", "summary.md", "events.jsonl")}
    paths["report.json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["junit.xml"].write_bytes(junit_xml(report))
    summary = summary_md(report)
    paths["summary.md"].write_text(summary)
    with paths["events.jsonl"].open("w") as fh:
        for event in journal.events():
            line = {"id": event.id, "at": _iso(event.at), "kind": event.kind, "wave": event.wave,
                    "host": event.host, "data": event.data}
            fh.write(json.dumps(redact(line)) + "\n")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a") as fh:
            fh.write(summary + "\n")
    return paths


def junit_xml(report: dict[str, Any]) -> bytes:
    """One test case per host per gate; gates a host never reached are skipped cases with the reason."""
    run = report["run"]
    suites = ET.Element("testsuites", name=f"fleet patch run {run['id']} ({run['release']})")
    by_wave: dict[Any, list[tuple[str, dict[str, Any]]]] = {}
    for name, host in sorted(report["hosts"].items()):
        by_wave.setdefault(host["wave"], []).append((name, host))
    totals = Counter[str]()
    for wave, members in sorted(by_wave.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        suite = ET.SubElement(suites, "testsuite", name="not planned" if wave is None else f"wave {wave}")
        counts = Counter[str]()
        for name, host in members:
            for case in _cases(name, host):
                suite.append(case)
                counts["tests"] += 1
                if case.find("failure") is not None:
                    counts["failures"] += 1
                if case.find("error") is not None:
                    counts["errors"] += 1
                if case.find("skipped") is not None:
                    counts["skipped"] += 1
        for key in ("tests", "failures", "errors", "skipped"):
            suite.set(key, str(counts[key]))
        totals += counts
    for key in ("tests", "failures", "errors", "skipped"):
        suites.set(key, str(totals[key]))
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def _cases(name: str, host: dict[str, Any]) -> list[ET.Element]:
    classname = name
    if host["state"] == HostState.SKIPPED:
        case = ET.Element("testcase", classname=classname, name="preflight")
        ET.SubElement(case, "skipped", message=host["detail"])
        return [case]
    cases = []
    gates = host["gates"]
    for phase in Phase:
        ran = [g for g in gates if g["phase"] == phase]
        if phase == Phase.ROLLBACK and not ran:
            continue
        for gate in Gate:
            results = [g for g in ran if g["gate"] == gate]
            label = gate.value if phase == Phase.ROLLOUT else f"rollback {gate.value}"
            case = ET.Element("testcase", classname=classname, name=label)
            if not results:
                if phase == Phase.ROLLOUT:
                    ET.SubElement(case, "skipped", message=f"not reached (host {host['state']}: {host['detail']})")
                else:
                    continue
            else:
                last = results[-1]  # a resumed run may have measured again: the last word counts
                if not last["ok"]:
                    kind = "error" if last["verdict"] == Verdict.COULD_NOT_MEASURE else "failure"
                    failure = ET.SubElement(case, kind, message=last["detail"] or "failed",
                                            type="timeout" if last["timed_out"] else last["verdict"])
                    failure.text = json.dumps({"measurements": last["measurements"],
                                               "thresholds": last["thresholds"]}, sort_keys=True)
                else:
                    out = ET.SubElement(case, "system-out")
                    out.text = json.dumps({"detail": last["detail"], "measurements": last["measurements"]},
                                          sort_keys=True)
            cases.append(case)
    return cases


def summary_md(report: dict[str, Any]) -> str:
    """The run in Markdown for people (and the CI step summary)."""
    run = report["run"]
    lines = [f"# Patch run {run['id']}: release {run['release']} - {run['status'].upper()}", "", run["message"], ""]
    if report["exit_code"] is not None:
        code = ExitCode(report["exit_code"])
        lines += [f"Exit {int(code)}: {EXIT_MEANING[code]}.", ""]
    broken = sorted(n for n, h in report["hosts"].items() if h["state"] == HostState.ROLLBACK_FAILED)
    if broken:
        lines += ["> [!CAUTION]", f"> ROLLBACK FAILED on {len(broken)} host(s), left drained: "
                  + ", ".join(f"**{n}** ({report['hosts'][n]['detail']})" for n in broken), ""]
    lines += ["| state | hosts |", "|---|---|"]
    lines += [f"| {state} | {count} |" for state, count in sorted(report["counts"].items())]
    lines += ["", "| wave | kind | hosts | status | failures | duration |", "|---|---|---|---|---|---|"]
    for w in report["waves"]:
        duration = f"{w['duration_s']:.0f}s" if w["duration_s"] is not None else "-"
        lines.append(f"| {w['index']} | {w['kind']} | {w['hosts']} | {w['status']} | {w['failures']} | {duration} |")
    canary = {w["index"] for w in report["waves"] if w["kind"] == "canary"}
    judged = [(name, g) for name, h in sorted(report["hosts"].items()) if h["wave"] in canary for g in h["gates"]
              if g["phase"] == Phase.ROLLOUT and g["gate"] not in (Gate.ANSIBLE, Gate.TESTINFRA)]
    if judged:  # what the canary's gates compared, against what (report.json has every figure of every host)
        lines += ["", "## The canary's gates", "", "| host | gate | verdict | figures, baseline and why |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {g['gate']} | {g['verdict']} | {g['detail']} |" for name, g in judged]
    failed = [(name, g) for name, h in sorted(report["hosts"].items()) for g in h["gates"] if not g["ok"]]
    if failed:
        lines += ["", "## Failed gates", "", "| host | wave | phase | gate | why | verdict | figures |",
                  "|---|---|---|---|---|---|---|"]
        for name, g in failed:
            figures = ", ".join(f"{k}={v}" for k, v in sorted(g["measurements"].items())
                                if not isinstance(v, dict | list))
            lines.append(f"| {name} | {g['wave']} | {g['phase']} | {g['gate']} | {g['detail']} | {g['verdict']} "
                         f"| {figures} |")
    missing = {n: h for n, h in sorted(report["hosts"].items()) if h["outcome"] not in ON_BUNDLE}
    if missing:
        lines += ["", f"## Not on the bundle ({len(missing)} of {len(report['hosts'])})", ""]
        lines += [f"- {name}: {h['outcome'].replace('_', ' ')}" + (f": {h['detail']}" if h["detail"] else "")
                  for name, h in missing.items()]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _gate(event: EventRow) -> dict[str, Any]:
    d = event.data
    verdict = d.get("verdict") or (Verdict.PASSED if d["ok"] else Verdict.FAILED)  # journals before verdicts
    return {"gate": d["gate"], "phase": d["phase"], "release": d["release"], "ok": d["ok"], "verdict": verdict,
            "timed_out": d["timed_out"], "detail": d["detail"], "measurements": d["measurements"],
            "thresholds": d["thresholds"], "wave": event.wave, "at": _iso(event.at)}


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat() if ts is not None else None
