"""Helpers of the host checks: what a host reports (read once per host, in one SSH session) and how a check
fails."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import PurePosixPath
from typing import Any

import pytest

from patching.hosts import facts as hostfacts
from patching.release.bundle import Bundle
from patching.release.pins import (
    MANIFEST_PATH,
    PackageState,
    dpkg_query_command,
    efa_read_command,
    parse_dpkg_query,
    parse_manifest,
)

SMI_FIELDS = ("index", "name", "driver_version", "memory.total", "persistence_mode", "ecc.mode.current",
              "ecc.errors.uncorrected.volatile.total")
SMI_CSV_COMMAND = f"nvidia-smi --query-gpu={','.join(SMI_FIELDS)} --format=csv,noheader,nounits"


def curl_command(port: int, address: str, path: str) -> str:
    return f"curl -fsS --max-time 10 {shlex.quote(f'http://{address}:{int(port)}{path}')}"


def sha256_command(path: str) -> str:
    return f"sha256sum -- {shlex.quote(path)}"


def upsc_command(ups: dict[str, Any]) -> str:
    target = f"{ups['name']}@{ups['host']}:{ups.get('port', 3493)}"
    return f"upsc {shlex.quote(target)}"


FABRIC_MANAGER_VERSION = "nv-fabricmanager --version"
FI_INFO = "/opt/amazon/efa/bin/fi_info -p efa -t FI_EP_RDM"
WEIGHTS_DIR = "/var/lib/model-serving/weights"  # the model_serving role's default
_MARK = "@@fleet-read"


def unit_state_command(unit: str) -> str:
    return f"systemctl is-active {shlex.quote(unit)}"


def nvcc_command(cuda_minor: str) -> str:
    return f"/usr/local/cuda-{cuda_minor}/bin/nvcc --version"


def serving_address(hostvars: dict[str, Any]) -> str:
    """Where the host itself reaches its server: its bind address, loopback for a wildcard."""
    bind = hostvars.get("fleet_serving_bind_address") or "127.0.0.1"
    return "127.0.0.1" if bind in ("0.0.0.0", "::") else bind


def weights_file(hostvars: dict[str, Any], bundle: Bundle) -> str:
    """Where the role stages this bundle's weights for the host's model: <dir>/<model>/<revision>/<file>."""
    weights = bundle.model(hostvars["fleet_model"]).weights
    base = hostvars.get("model_serving_weights_dir") or WEIGHTS_DIR
    return f"{base}/{hostvars['fleet_model']}/{weights.revision}/{PurePosixPath(weights.path).name}"


def batch_script(commands: list[str]) -> str:
    """One shell script running `commands` in turn, each in a subshell with no stdin, printing per command a line
    `@@fleet-read INDEX RC STDOUT STDERR` (the outputs base64 encoded), so one SSH session carries them all."""
    lines = ['t=$(mktemp -d) || exit 97']
    for i, command in enumerate(commands):
        lines.append(f'( {command}\n) < /dev/null > "$t/o" 2> "$t/e"; r=$?; '
                     f'printf \'{_MARK} {i} %s %s %s\\n\' "$r" "$(base64 -w0 < "$t/o")" "$(base64 -w0 < "$t/e")"')
    lines.append('rm -rf "$t"')
    return "\n".join(lines)


def parse_batch(stdout: str, count: int) -> dict[int, tuple[int, bytes, bytes]]:
    """index -> (rc, stdout, stderr) of each command whose line `batch_script` printed whole."""
    out: dict[int, tuple[int, bytes, bytes]] = {}
    for line in stdout.splitlines():
        fields = line.split(" ")
        if len(fields) != 5 or fields[0] != _MARK:
            continue
        try:
            index, rc = int(fields[1]), int(fields[2])
            out[index] = (rc, base64.b64decode(fields[3], validate=True), base64.b64decode(fields[4], validate=True))
        except (ValueError, binascii.Error):
            continue
    return {i: v for i, v in out.items() if 0 <= i < count}


@dataclass
class HostReadings:
    """What one host reports, each tool run once per host; `read_all` runs every command the checks will ask
    for in one SSH session (a command it did not foresee still runs alone, when asked)."""

    host: Any
    hostvars: dict[str, Any]
    pinned: list[str]
    bundle: Bundle | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    def run(self, command: str) -> Any:
        if command not in self._cache:
            self._cache[command] = self.host.run(command)
        return self._cache[command]

    def commands(self) -> list[str]:
        """The commands the checks run on this host, as its inventory vars and the bundle say they will."""
        v = self.hostvars
        out = [SMI_CSV_COMMAND, "nvidia-smi -q", dpkg_query_command(self.pinned), f"cat {MANIFEST_PATH}"]
        if v.get("fleet_nvswitch"):
            out += [unit_state_command("nvidia-fabricmanager"), FABRIC_MANAGER_VERSION]
        if v.get("fleet_ib"):
            out.append("ibstat")
        if v.get("fleet_efa"):
            out += [FI_INFO, efa_read_command()]
        if v.get("fleet_ups"):
            out += [upsc_command(u) for u in v["fleet_ups"]] + [unit_state_command("nut-monitor")]
        if self.bundle is not None:
            out.append(nvcc_command(self.bundle.cuda_minor))
            engine = self.bundle.serving.engine
            out += [unit_state_command(f"{engine}-serving"),
                    hostfacts.container_image_command(hostfacts.serving_container(engine))]
            if v.get("fleet_serving_port") and v.get("fleet_model"):
                address, port = serving_address(v), v["fleet_serving_port"]
                out += [curl_command(port, address, "/v1/models"), curl_command(port, address, "/version")]
                with contextlib.suppress(KeyError, AttributeError):  # a model the bundle lacks: its checks say so
                    out.append(sha256_command(weights_file(v, self.bundle)))
        return out

    def read_all(self, commands: Iterable[str] | None = None) -> int:
        """Run the commands not read yet in one SSH session; returns how many it read. A session that fails
        (host unreachable) reads nothing: each check then runs its command alone and reports what it gets."""
        todo = [c for c in dict.fromkeys(self.commands() if commands is None else commands) if c not in self._cache]
        if not todo:
            return 0
        try:
            result = self.host.run(batch_script(todo))
        except Exception:  # testinfra raises RuntimeError on ssh's 255; each check will say why
            return 0
        answers = parse_batch(result.stdout, len(todo))
        for index, (rc, stdout, stderr) in answers.items():
            command = todo[index]
            self._cache[command] = self.host.backend.result(rc, self.host.backend.encode(command), stdout, stderr)
        return len(answers)

    @cached_property
    def smi(self) -> list[hostfacts.GpuInfo] | hostfacts.NvmlFailure | str:
        """Per-GPU facts, the NVML failure, or the error text when nvidia-smi cannot run at all."""
        result = self.run(SMI_CSV_COMMAND)
        failure = hostfacts.nvml_failure(result.stdout + result.stderr)
        if failure:
            return failure
        if result.rc != 0:
            return _error("nvidia-smi", result)
        return hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(result.stdout, SMI_FIELDS))

    @cached_property
    def smi_query(self) -> hostfacts.SmiQuery | hostfacts.NvmlFailure | str:
        result = self.run("nvidia-smi -q")
        failure = hostfacts.nvml_failure(result.stdout + result.stderr)
        if failure:
            return failure
        if result.rc != 0:
            return _error("nvidia-smi -q", result)
        return hostfacts.parse_smi_query(result.stdout)

    @cached_property
    def dpkg(self) -> dict[str, PackageState]:
        return parse_dpkg_query(self.run(dpkg_query_command(self.pinned)).stdout)

    @cached_property
    def ibstat(self) -> list[hostfacts.IbCa] | str:
        result = self.run("ibstat")
        return _error("ibstat", result) if result.rc != 0 else hostfacts.parse_ibstat(result.stdout)

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        result = self.run(f"cat {MANIFEST_PATH}")
        return parse_manifest(result.stdout) if result.rc == 0 else None

    def _get_json(self, port: int, address: str, path: str) -> Any:
        """GET `path` from the server as the host itself reaches it, as JSON, or the error text."""
        url = f"http://{address}:{int(port)}{path}"
        result = self.run(curl_command(port, address, path))
        if result.rc != 0:
            return _error(f"GET {url}", result)
        try:
            return json.loads(result.stdout)
        except ValueError:
            return f"GET {path}: not JSON: {result.stdout[:200]!r}"

    def served_models(self, port: int, address: str) -> dict[str, Any] | str:
        """/v1/models as the host itself reaches its server, or the error."""
        return self._get_json(port, address, "/v1/models")

    def served_version(self, port: int, address: str) -> dict[str, Any] | str:
        """/version as the host itself reaches its server ({"version": ...}), or the error."""
        answer = self._get_json(port, address, "/version")
        return answer if isinstance(answer, dict | str) else f"GET /version: not an object: {answer!r}"

    def container_image(self, container: str) -> hostfacts.ContainerImage:
        """A container's state and image digest as the host's podman reports them (root's containers)."""
        return hostfacts.parse_container_image(self.run(hostfacts.container_image_command(container)).stdout)

    def sha256(self, path: str) -> str:
        """The sha256 of a file on the host, or the error."""
        result = self.run(sha256_command(path))
        if result.rc != 0:
            return _error(f"sha256sum {path}", result)
        return result.stdout.split()[0] if result.stdout.split() else "no output from sha256sum"

    def upsc(self, ups: dict[str, Any]) -> hostfacts.UpsStatus:
        result = self.run(upsc_command(ups))
        status = hostfacts.parse_upsc(result.stdout + "\n" + result.stderr)
        if result.rc != 0 and status.error is None:
            return hostfacts.UpsStatus({}, (result.stderr or result.stdout).strip() or f"upsc exited {result.rc}")
        return status


def _error(what: str, result: Any) -> str:
    text = (result.stderr or result.stdout or "").strip().splitlines()
    return f"{what} exited {result.rc}" + (f": {text[-1]}" if text else "")


def expect(ok: bool, name: str, what: str, expected: object, found: object) -> None:
    """Fail the check with '<host>: <what>: expected <expected>, found <found>' unless ok."""
    if not ok:
        pytest.fail(f"{name}: {what}: expected {expected}, found {found}", pytrace=False)


def gpus_or_fail(facts: HostReadings, name: str, what: str, expected: object) -> list[hostfacts.GpuInfo]:
    """The host's GPUs; a check whose fact NVML cannot give fails with NVML's own words."""
    gpus = facts.smi
    if isinstance(gpus, hostfacts.NvmlFailure):
        expect(False, name, what, expected, f"no answer from NVML ({gpus.message})")
    if isinstance(gpus, str):
        expect(False, name, what, expected, gpus)
    assert isinstance(gpus, list)
    return gpus


def only_where(flag: bool, name: str, why: str) -> None:
    """Skip a check that does not apply to this host's hardware (the inventory's flag says so)."""
    if not flag:
        pytest.skip(f"{name}: {why}")
