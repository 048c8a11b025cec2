"""Every loader against mutated input (issue 11): a corpus of real files (the shipped bundles, policy, stacks,
an inventory, an iCalendar, a journal) mutated byte- and line-wise with a fixed seed. Each mutant either
loads or is an InputError/JournalError (exit 2): never another exception, never longer than a bound, and
nothing but the input is in the directory afterwards. The seed and the number of mutants are fixed, so a
failure is reproduced by its test id."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.model.errors import InputError
from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory
from patching.inventory.reader import load_inventory
from patching.journal.store import Journal, JournalError
from patching.release.bundle import load_bundle
from patching.rollout.policy import load_policy
from tests.conftest import ROOT

MUTANTS = 300  # per loader (a third for the slow ones); the whole file runs in well under a minute
BOUND_S = 10.0
TOKENS = [b"\xff", b"\x00", b": ", b"- ", b"&a ", b"*a", b"!!python/object:os.system ", b"'", b'"', b"{", b"[",
          b"\n  ", b"9999999999", b"-1", b".inf", b"2026-13-45", b"~", b"%", b"\t", b"\xc3("]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random edits: flip a byte, insert a token, drop or duplicate a line, truncate."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(5)
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[pos:pos] = rng.choice(TOKENS)
        elif kind == 2:
            lines = bytes(out).split(b"\n")
            del lines[rng.randrange(len(lines))]
            out = bytearray(b"\n".join(lines))
        elif kind == 3:
            lines = bytes(out).split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            out = bytearray(b"\n".join(lines))
        else:
            out = out[:pos]
    return bytes(out)


def _bundle(path: Path) -> Any:
    return load_bundle(path)


def _policy(path: Path) -> Any:
    return load_policy(path)


def _stack(path: Path) -> Any:
    return load_stack("fuzz", path.parent)


def _inventory(path: Path) -> Any:
    return load_inventory([path])


def _ical_policy(path: Path) -> Any:
    policy = path.parent / "policy.yaml"
    policy.write_text(yaml.safe_dump({"freeze": {"ical": path.name}}))
    return load_policy(policy)


def _journal(path: Path) -> Any:
    journal = Journal(path)
    try:
        journal.runs()
    finally:
        journal.close()


ICAL = b"""BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//fleet tests//EN\r
BEGIN:VEVENT\r
UID:freeze-1@fleet\r
DTSTAMP:20261101T000000Z\r
DTSTART;VALUE=DATE:20261221\r
DTEND;VALUE=DATE:20270104\r
RRULE:FREQ=YEARLY;UNTIL=20301231\r
SUMMARY:year-end freeze\r
END:VEVENT\r
END:VCALENDAR\r
"""


def _inventory_seed() -> bytes:
    data = build_inventory(load_stack("lab", ROOT))
    for hv in data["all"]["hosts"].values():
        hv["ansible_host"] = "192.0.2.1"
    return yaml.safe_dump(data).encode()


def _journal_seed(tmp: Path) -> bytes:
    path = tmp / "seed.db"
    journal = Journal(path)
    plan = {"waves": [{"index": 0, "kind": "canary", "hosts": ["a1"], "predicted_s": 60.0}], "skipped": {}}
    run = journal.create_run(release="2026-11", owner="fuzz", bundle_path="b.yaml", bundle={}, releases_dir=".",
                             inventory=["i.yml"], limit=None, policy_path=None, policy={}, plan=plan)
    run.add_event("run", {"event": "started"})
    journal.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    return path.read_bytes()


LOADERS: dict[str, tuple[str, Callable[[Path], Any], Callable[[Path], bytes]]] = {
    "bundle": ("bundle.yaml", _bundle, lambda t: (ROOT / "releases/2026-11.yaml").read_bytes()),
    "policy": ("policy.yaml", _policy, lambda t: (ROOT / "docs/policy.example.yaml").read_bytes()),
    "stack": ("Pulumi.fuzz.yaml", _stack, lambda t: (ROOT / "Pulumi.example-hybrid.yaml").read_bytes()),
    "inventory": ("inventory.yml", _inventory, lambda t: _inventory_seed()),
    "icalendar": ("freeze.ics", _ical_policy, lambda t: ICAL),
    "journal": ("journal.db", _journal, _journal_seed),
}


@pytest.mark.parametrize("kind", list(LOADERS))
def test_mutated_input_loads_or_is_bad_input(kind, tmp_path):
    name, load, seed_of = LOADERS[kind]
    seed = seed_of(tmp_path)
    rng = random.Random(f"fleet-fuzz-{kind}")
    refused = 0
    count = MUTANTS if kind not in ("inventory", "journal") else MUTANTS // 3  # Ansible's parser is slow
    for i in range(count):
        case = tmp_path / f"case-{i}"
        case.mkdir()
        path = case / name
        mutant = mutate(seed, rng)
        path.write_bytes(mutant)
        started = time.monotonic()
        try:
            load(path)
        except (InputError, JournalError):
            refused += 1
        except sqlite3.DatabaseError as exc:  # the failure this test exists to find
            pytest.fail(f"{kind} mutant {i}: sqlite3 error escaped: {exc}")
        except Exception as exc:  # anything else is a traceback the user would see
            pytest.fail(f"{kind} mutant {i}: {type(exc).__name__}: {exc}\n{mutant[:300]!r}")
        elapsed = time.monotonic() - started
        assert elapsed < BOUND_S, f"{kind} mutant {i} took {elapsed:.1f}s"
        left = sorted(p.name for p in case.iterdir())
        allowed = {name, "policy.yaml", f"{name}-wal", f"{name}-shm"} if kind in ("icalendar", "journal") else {name}
        assert set(left) <= allowed, f"{kind} mutant {i} left {left}"
    assert refused > 0, "the mutations never produced bad input: the test would prove nothing"


def test_mutation_is_deterministic():
    a = [mutate(b"release: 2026-11\n", random.Random("x")) for _ in range(5)]
    b = [mutate(b"release: 2026-11\n", random.Random("x")) for _ in range(5)]
    assert a == b and dt.date.today()  # same seed, same corpus
