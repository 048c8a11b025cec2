"""tests/hosts/checks.py's batch reading: every command a host's checks run goes through one SSH session, and
each answer is the one the command gives alone (testinfra's local backend runs both ways here)."""

from __future__ import annotations

import testinfra

from tests.hosts.checks import HostReadings, batch_script, parse_batch

COMMANDS = [
    "echo out; echo err >&2",
    "exit 3",
    "printf 'a b\\tc\\n\\n'",
    "cat",  # stdin is /dev/null: nothing, at once
    "printf '\\377\\000binary'",
    "echo ends in a comment # )",
    "echo 'single quotes' \"and $((1 + 1)) doubles\"",
    "sh -c 'exit 255'",
]


class CountingHost:
    """testinfra's local host, counting the commands it is asked to run."""

    def __init__(self) -> None:
        self.inner = testinfra.get_host("local://")
        self.backend = self.inner.backend
        self.calls: list[str] = []

    def run(self, command: str):
        self.calls.append(command)
        return self.inner.run(command)


def test_a_batch_answers_each_command_as_it_answers_alone():
    host = CountingHost()
    readings = HostReadings(host, {}, [])
    assert readings.read_all(COMMANDS) == len(COMMANDS)
    assert len(host.calls) == 1  # one session
    for command in COMMANDS:
        alone = host.inner.run(command)
        batched = readings.run(command)
        assert (batched.rc, batched.stdout_bytes, batched.stderr_bytes) == \
            (alone.rc, alone.stdout_bytes, alone.stderr_bytes), command
    assert len(host.calls) == 1  # every answer came from the batch


def test_a_command_nobody_foresaw_runs_alone_and_is_read_once():
    host = CountingHost()
    readings = HostReadings(host, {}, [])
    readings.read_all(["true"])
    assert readings.run("echo late").stdout == "late\n"
    assert readings.run("echo late").stdout == "late\n"
    assert host.calls[1:] == ["echo late"]
    assert readings.read_all(["true", "echo late"]) == 0  # nothing left to read: no session


def test_a_session_that_fails_reads_nothing_and_each_check_runs_its_own_command():
    class Unreachable(CountingHost):
        def run(self, command: str):
            self.calls.append(command)
            if command.startswith("t=$(mktemp"):
                raise RuntimeError("ssh: connect to host 127.0.0.1 port 1: Connection refused")
            return self.inner.run(command)

    host = Unreachable()
    readings = HostReadings(host, {}, [])
    assert readings.read_all(["echo a"]) == 0
    assert readings.run("echo a").stdout == "a\n"  # asked again, alone: its own error or answer


def test_lines_cut_short_or_forged_are_not_read_as_answers():
    good = "@@fleet-read 0 0 aGk= \n"
    assert parse_batch(good, 1) == {0: (0, b"hi", b"")}
    assert parse_batch("@@fleet-read 0 0 aGk=", 1) == {}  # cut short: no stderr field
    assert parse_batch("@@fleet-read 5 0 aGk= \n", 1) == {}  # no such command
    assert parse_batch("@@fleet-read 0 x aGk= \n", 1) == {}
    assert parse_batch("@@fleet-read 0 0 !!! \n", 1) == {}
    assert parse_batch("noise\n" + good + "more noise\n", 1) == {0: (0, b"hi", b"")}


def test_the_script_runs_each_command_in_its_own_subshell():
    script = batch_script(["cd /; exit 4", "pwd"])
    proc = testinfra.get_host("local://").run(f"cd /tmp && {script}")
    answers = parse_batch(proc.stdout, 2)
    assert answers[0][0] == 4 and answers[1] == (0, b"/tmp\n", b"")
