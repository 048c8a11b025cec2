"""Helpers of the host checks: what a host reports (read once per host) and how a check fails."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pytest

from patching.hosts import facts as hostfacts
from patching.release.pins import MANIFEST_PATH, PackageState, dpkg_query_command, parse_dpkg_query, parse_manifest

SMI_FIELDS = ("index", "name", "driver_version", "memory.total", "persistence_mode", "ecc.mode.current",
              "ecc.errors.uncorrected.volatile.total")


@dataclass
class HostReadings:
    """What one host reports, each tool run once per host (a worker keeps the host's checks)."""

    host: Any
    hostvars: dict[str, Any]
    pinned: list[str]
    _cache: dict[str, Any] = field(default_factory=dict)

    def run(self, command: str) -> Any:
        if command not in self._cache:
            self._cache[command] = self.host.run(command)
        return self._cache[command]

    @cached_property
    def smi(self) -> list[hostfacts.GpuInfo] | hostfacts.NvmlFailure | str:
        """Per-GPU facts, the NVML failure, or the error text when nvidia-smi cannot run at all."""
        result = self.run(f"nvidia-smi --query-gpu={','.join(SMI_FIELDS)} --format=csv,noheader,nounits")
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
        result = self.run(f"curl -fsS --max-time 10 {shlex.quote(url)}")
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
        result = self.run(f"sha256sum -- {shlex.quote(path)}")
        if result.rc != 0:
            return _error(f"sha256sum {path}", result)
        return result.stdout.split()[0] if result.stdout.split() else "no output from sha256sum"

    def upsc(self, ups: dict[str, Any]) -> hostfacts.UpsStatus:
        target = f"{ups['name']}@{ups['host']}:{ups.get('port', 3493)}"
        result = self.run(f"upsc {shlex.quote(target)}")
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
