"""Bad input as a hostile or careless user gives it (issue 11): every case exits 2, names the file, the field
and the value, prints no traceback, writes no file and answers within a bound."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import yaml

import patching.cli.app as cli
from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory
from tests.conftest import ROOT

RELEASE = ROOT / "releases/2026-11.yaml"
POLICY = yaml.safe_load((ROOT / "docs/policy.example.yaml").read_text())
STACK = (ROOT / "Pulumi.lab.yaml").read_text()


@pytest.fixture
def inventory(tmp_path) -> Path:
    data = build_inventory(load_stack("lab", ROOT))
    for hv in data["all"]["hosts"].values():
        hv["ansible_host"] = "192.0.2.1"
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def fleet(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fleet", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out + out.err


def policy_with(tmp_path: Path, name: str, path: list[str], value: object) -> Path:
    data = yaml.safe_load(yaml.safe_dump(POLICY))
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def raw(tmp_path: Path, name: str, content: bytes) -> Path:
    out = tmp_path / name
    out.write_bytes(content)
    return out


def stack_with(tmp_path: Path, old: str, new: str) -> Path:
    assert old in STACK
    (tmp_path / "Pulumi.bad.yaml").write_text(STACK.replace(old, new, 1))
    return tmp_path


def alias_bomb(tmp_path: Path, inventory: Path) -> Path:
    """The inventory with a var of 40 nested levels of 4 aliases each (4**40 leaves once expanded)."""
    levels = [b"    a: &l0 [x, x, x, x]\n"]
    levels += [b"    b%d: &l%d [*l%d, *l%d, *l%d, *l%d]\n" % (n, n, n - 1, n - 1, n - 1, n - 1) for n in range(1, 40)]
    text = inventory.read_bytes().replace(b"all:\n", b"all:\n  vars:\n" + b"".join(levels), 1)
    return raw(tmp_path, "bomb.yml", text)


BUNDLE_TEXT = RELEASE.read_bytes()

# (id, build(tmp_path, inventory) -> argv, what the message must name)
CASES = [
    ("bundle-not-utf8", lambda t, i: ["release", "check", raw(t, "b.yaml", BUNDLE_TEXT + b"\n# \xff\xfe\n")],
     "not UTF-8"),
    ("bundle-binary", lambda t, i: ["release", "check", raw(t, "b.yaml", b"\x00\x01\x02 release")], "binary"),
    ("bundle-bad-date", lambda t, i: ["release", "check", raw(t, "b.yaml", re.sub(
        rb"published: \S+", b"published: 2026-13-45", BUNDLE_TEXT, count=1))], "2026-13-45"),
    ("bundle-20MB", lambda t, i: ["release", "check", raw(t, "b.yaml", BUNDLE_TEXT + b"#" + b"x" * (20 << 20))],
     "larger than"),
    ("against-not-utf8", lambda t, i: ["release", "check", RELEASE, "--against", raw(t, "o.yaml", b"\xff")],
     "not UTF-8"),
    ("bundle-alias-bomb", lambda t, i: ["release", "check", raw(t, "b.yaml", b"a: &a [x]\n" + b"".join(
        b"b%d: [*a, *a, *a]\n" % n for n in range(60)))], "alias"),
    ("policy-not-utf8", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", raw(t, "p.yaml", b"\xfe")],
     "not UTF-8"),
    ("freeze-feb-30", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", raw(
        t, "p.yaml", b"freeze:\n  ranges:\n  - {start: 2026-02-30, end: 2026-03-02}\n")], "2026-02-30"),
    ("freeze-year-9999", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["freeze"], {"ranges": [{"start": "9999-12-30", "end": "9999-12-31"}]})], "freeze.ranges[0]"),
    ("duration-inf", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["timeouts", "apply"], ".inf")], "timeouts.apply"),
    ("duration-huge", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["timeouts", "apply"], "9999999999d")], "timeouts.apply"),
    ("apply-0s", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["timeouts", "apply"], "0s")], "timeouts.apply"),
    ("lock-stale-0s", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["timeouts", "lock_stale"], "0s")], "timeouts.lock_stale"),
    ("probe-interval-0s", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["gates", "soak", "probe_interval"], "0s")], "gates.soak.probe_interval"),
    ("wave-size-0", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["waves", "size"], 0)], "waves.size"),
    ("cron-never-fires", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--policy", policy_with(
        t, "p", ["windows"], [{"cron": "0 0 30 2 *", "duration": "6h"}])], "windows[0].cron"),
    ("limit-bad-regex", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--limit", "~h(1"], "--limit"),
    ("limit-matches-nothing-regex", lambda t, i: ["plan", "--release", RELEASE, "-i", i, "--limit", "~["],
     "--limit"),
    ("stack-not-utf8", lambda t, i: ["inventory", "--stack", "bad", "--project-dir", raw(
        t, "Pulumi.bad.yaml", b"config:\n  fleet:name: \xff\n").parent], "not UTF-8"),
    ("stack-bad-address", lambda t, i: ["inventory", "--stack", "bad", "--project-dir", stack_with(
        t, "address: 10.20.1.11", "address: 999.300.1.12")], "999.300.1.12"),
    ("stack-address-shell", lambda t, i: ["inventory", "--stack", "bad", "--project-dir", stack_with(
        t, "address: 10.20.1.11", "address: '10.20.1.12; rm -rf /'")], "rm -rf"),
    ("stack-host-name-collides-with-a-generated-one", lambda t, i: ["inventory", "--stack", "bad", "--project-dir",
                                                                   stack_with(t, "- name: dgx-a1", "- name: v3-aws-1")],
     "generates host 'v3-aws-1'"),
    ("stack-pool-count-huge", lambda t, i: ["inventory", "--stack", "bad", "--project-dir", stack_with(
        t, "count: 2,", "count: 20000000,")], "count"),
    ("inventory-output-is-a-directory", lambda t, i: ["inventory", "--stack", "lab", "--project-dir", ROOT,
                                                      "-o", t], "-o"),
    ("inventory-alias-bomb", lambda t, i: ["plan", "--release", RELEASE, "-i", alias_bomb(t, i)], "alias bomb"),
    ("journal-parent-is-a-file", lambda t, i: ["patch", "run", "--release", RELEASE, "-i", i, "--ignore-window",
                                               "--journal", raw(t, "file", b"x") / "journal.db"], "--journal"),
    ("output-without-dry-run", lambda t, i: ["patch", "run", "--release", RELEASE, "-i", i, "-o", t / "plan.json",
                                             "--journal", t / "j/journal.db"], "--dry-run"),
    ("status-of-an-empty-file", lambda t, i: ["patch", "status", "--journal", raw(t, "empty.db", b"")],
     "--journal"),
]


@pytest.mark.parametrize("build, names", [(b, n) for _, b, n in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_it(build, names, tmp_path, inventory, monkeypatch, capsys):
    argv = build(tmp_path, inventory)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    started = time.monotonic()
    code, out = fleet(monkeypatch, capsys, *argv)
    assert code == 2, out[-2000:]
    assert time.monotonic() - started < 10
    assert "Traceback" not in out and names in out, out[-2000:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before, "a file was written or changed"


def test_status_refuses_another_applications_sqlite_database_without_writing(tmp_path, monkeypatch, capsys):
    import sqlite3

    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    content = path.read_bytes()
    code, out = fleet(monkeypatch, capsys, "patch", "status", "--journal", path)
    assert code == 2 and "not a journal of ours" in out and "Traceback" not in out
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]
