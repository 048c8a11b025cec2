"""`fleet converge`: playbooks/site.yml through ansible-runner, with a per-host recap from its events.

It is the playbook users run themselves (`ansible-playbook -i INVENTORY playbooks/site.yml -e
bundle_file=...`), with the repository's ansible.cfg; the runner's events give each host's counts and
the first task that failed on it, so a failure is named without reading Ansible's output.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patching.hosts.ansible_env import describe_ssh_failure, run_ansible
from patching.hosts.toolpath import put_our_bin_first
from patching.inventory.target import ANSIBLE_CFG, PLAYBOOKS, ROOT

STATS = ("ok", "changed", "failures", "dark", "skipped", "rescued", "ignored")


@dataclass
class HostRecap:
    """One host's counts (Ansible's PLAY RECAP) and the first failure, if any."""

    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0
    first_failure: str | None = None
    changed_tasks: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """No task failed on the host and it stayed reachable."""
        return not self.failed and not self.unreachable


@dataclass
class ConvergeResult:
    """A converge run: its status, per-host recaps and how long it took."""

    status: str
    rc: int
    hosts: dict[str, HostRecap]
    seconds: float

    @property
    def succeeded(self) -> bool:
        """ansible-runner exited 0 and every host succeeded."""
        return self.rc == 0 and all(h.succeeded for h in self.hosts.values())

    @property
    def changed(self) -> int:
        """Changed tasks over all hosts."""
        return sum(h.changed for h in self.hosts.values())


class PlayRecap:
    """The ansible-runner event handler that builds each host's HostRecap; `on_task` sees each task as it starts."""

    def __init__(self, on_task: Callable[[str], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None):
        self.hosts: dict[str, HostRecap] = {}
        self.on_task = on_task
        self.on_failure = on_failure

    def recap(self, host: str) -> HostRecap:
        """The host's recap, started on first use."""
        return self.hosts.setdefault(host, HostRecap(host))

    def __call__(self, event: Mapping[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host") or data.get("remote_addr")
        if kind == "playbook_on_task_start" and self.on_task:
            name = data.get("task") or data.get("name") or ""
            self.on_task(f"{data['role']} : {name}" if data.get("role") else name)
        elif kind == "runner_on_ok" and host and data.get("res", {}).get("changed"):
            self.recap(host).changed_tasks.append(data.get("task", ""))
        elif kind in ("runner_on_failed", "runner_on_unreachable") and host and not data.get("ignore_errors"):
            recap = self.recap(host)
            message = _message(data.get("res") or {})
            if kind == "runner_on_unreachable":
                message = describe_ssh_failure(str((data.get("res") or {}).get("msg") or message))
            if recap.first_failure is None:
                recap.first_failure = f"{data.get('task', '?')}: {message}"
            if self.on_failure:
                self.on_failure(host, f"{data.get('task', '?')}: {message}")
        elif kind == "playbook_on_stats":
            for stat, attr in zip(STATS, ("ok", "changed", "failed", "unreachable", "skipped", "rescued", "ignored"),
                                  strict=True):
                for name, count in (data.get(stat) or {}).items():
                    setattr(self.recap(name), attr, count)
            for name in data.get("processed") or {}:
                self.recap(name)
        return True


def _message(res: Mapping[str, Any]) -> str:
    """The gist of a failed task's result: its msg, else stderr/stdout's last line."""
    for key in ("msg", "stderr", "stdout", "module_stderr", "module_stdout"):
        value = res.get(key)
        if value:
            text = str(value).strip().splitlines()
            if text:
                return text[-1] if key != "msg" else " ".join(line.strip() for line in text)[:500]
    return "failed"


def run_converge(bundle_path: Path, inventory: Path, limit: str | None = None, playbook: str = "site.yml",
                 envvars: Mapping[str, str] | None = None, extravars: Mapping[str, Any] | None = None,
                 on_task: Callable[[str], None] | None = None,
                 on_failure: Callable[[str, str], None] | None = None) -> ConvergeResult:
    """Run a playbook of playbooks/ over the inventory with ansible-runner (host keys checked, the environment
    cut: patching/hosts/ansible_env.py); inputs must be validated already."""
    put_our_bin_first()
    recap = PlayRecap(on_task, on_failure)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fleet-converge-") as private:
        runner = run_ansible(
            Path(private),
            project_dir=str(ROOT),
            playbook=str(PLAYBOOKS / playbook),
            inventory=str(Path(inventory).absolute()),
            extravars={"bundle_file": str(Path(bundle_path).absolute()), **(extravars or {})},
            limit=limit,
            envvars={"ANSIBLE_CONFIG": str(ANSIBLE_CFG), "ANSIBLE_FORCE_COLOR": "0", **(envvars or {})},
            event_handler=recap,
            quiet=True,
        )
    return ConvergeResult(runner.status, runner.rc, recap.hosts, time.monotonic() - started)
