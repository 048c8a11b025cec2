"""`HostKeys`: a cloud instance's SSH host keys, read from its console output before anyone connects to it.

At first boot cloud-init's `keys_to_console` module prints the instance's public host keys and their
fingerprints to the serial console (`/usr/lib/cloud-init/write-ssh-key-fingerprints`). EC2 hands that console to
whoever may call `ec2:GetConsoleOutput` on the instance: an out-of-band channel the instance's network (and a
machine in the middle of it) cannot write to. The provider's `create` polls it every `interval_s` until
`infra.model.access.host_keys_from_console` finds the keys (checked against the fingerprints printed beside them),
for at most `timeout_s`, and records them as `host_keys`; the inventory hands them on as `fleet_ssh_host_keys`
and `fleet known-hosts` writes them into the controller's known_hosts. No first connection is trusted blindly,
the private keys never leave the instance, and nothing secret travels in user data or Pulumi state.

Why not generate the keys in the program and hand them to cloud-init (`ssh_keys:` in user data)? User data is
readable by every process on the instance that can reach IMDS (http://169.254.169.254/latest/user-data), the
serving containers included (the hop limit is 2 for them, infra/aws_common.py): the private host key would be
readable by any code the host runs, and it would sit in Pulumi's state and in the launch template.

Like `BareMetalHost` (infra/onprem.py), the provider is pickled by reference and runs in `python -m
pulumi.dynamic`: importing this module has no side effects, and boto3 is imported where it is used. AWS
credentials come from that process's environment (the one `pulumi up` runs in), the region from the inputs.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from infra.model.access import host_keys_from_console

TIMEOUT_S = 15 * 60
INTERVAL_S = 15
# inputs whose change means another machine: the keys must be read again from that machine's console
IDENTITY_INPUTS = ("instance_id", "region")
# EC2's answer for an instance id it does not know yet (eventual consistency right after RunInstances)
_NOT_YET = ("InvalidInstanceID.NotFound",)
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


def console_text(response: dict[str, Any]) -> str:
    """The console text of a GetConsoleOutput answer ("" while the instance has printed nothing yet).

    The API sends `Output` base64-encoded; botocore decodes it before boto3 returns it (its after-call handler
    `decode_console_output`), so what arrives is normally text already. Decoding it a second time would mangle
    it (a lenient decoder drops every character outside the alphabet): only a value that is strict base64 (no
    whitespace, which every console line holds) is decoded here, for a client that hands the raw answer over."""
    output = response.get("Output")
    if not output:
        return ""
    try:
        return base64.b64decode(output, validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return str(output)  # text already (botocore decoded it)


class HostKeysProvider(ResourceProvider):
    """Create reads the host keys off the instance's console; nothing else touches anything."""

    def __init__(self, client_factory: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        # the EC2 client for a region: boto3's by default; tests hand in a stubbed one
        self._client_factory = client_factory

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Refuse inputs no GetConsoleOutput call could work with (unknown at preview: checked at `up`)."""
        from pulumi.runtime import rpc

        failures = []
        instance_id = news.get("instance_id")
        if instance_id != rpc.UNKNOWN and not (isinstance(instance_id, str) and _INSTANCE_ID.match(instance_id)):
            failures.append(CheckFailure("instance_id", f"expected an EC2 instance id (i-...), got {instance_id!r}"))
        if not news.get("region"):
            failures.append(CheckFailure("region", "required"))
        timeout, interval = news.get("timeout_s", TIMEOUT_S), news.get("interval_s", INTERVAL_S)
        if not _seconds(timeout) or timeout <= 0:
            failures.append(CheckFailure("timeout_s", f"must be a positive number of seconds, got {timeout!r}"))
        if not _seconds(interval) or interval < 0:
            failures.append(CheckFailure("interval_s", f"must be a number of seconds >= 0, got {interval!r}"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Another instance (or region) is another machine: replace, reading its keys anew. The polling knobs
        change nothing on any machine: no diff."""
        replaces = [k for k in IDENTITY_INPUTS if olds.get(k) != news.get(k)]
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Poll the console output until cloud-init's host keys are in it; the keys, or a clear error naming the
        instance when the timeout passes."""
        keys = self.wait_for_keys(str(props["instance_id"]), str(props["region"]),
                                  float(props.get("timeout_s", TIMEOUT_S)), float(props.get("interval_s", INTERVAL_S)))
        return CreateResult(str(props["instance_id"]), self._outs(props, keys))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """What was recorded: the first-boot block scrolls out of the console (64 KiB) and a later one may be
        missing, so `pulumi refresh` keeps the keys read at create."""
        return ReadResult(id_, self._outs(props, list(props.get("host_keys") or [])))

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Only the polling knobs can change in place: keep the keys."""
        return UpdateResult(self._outs(news, list(olds.get("host_keys") or [])))

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        """Nothing to undo: the keys belong to the instance, which its own resource deletes."""

    def wait_for_keys(self, instance_id: str, region: str, timeout_s: float, interval_s: float) -> list[str]:
        """The instance's host keys from its console output, polled every `interval_s` for at most `timeout_s`."""
        from botocore.exceptions import ClientError

        client = self._client(region)
        deadline = time.monotonic() + timeout_s
        latest, polls, seen = True, 0, 0
        while True:
            polls += 1
            try:
                # Latest: the console as it is now (Nitro instances); without it, EC2 returns a buffer posted at
                # the last state transition, which may predate cloud-init's final stage
                response = client.get_console_output(InstanceId=instance_id, Latest=latest)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code == "UnsupportedOperation" and latest:  # not a Nitro instance: the buffered output
                    latest = False
                    continue
                if code not in _NOT_YET:
                    raise RuntimeError(f"{instance_id} ({region}): GetConsoleOutput failed: {exc}") from exc
                response = {}
            text = console_text(response)
            seen = max(seen, len(text))
            try:
                keys = host_keys_from_console(text)
            except ValueError as exc:
                raise RuntimeError(f"{instance_id} ({region}): {exc}") from exc
            if keys:
                return keys
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{instance_id} ({region}): no SSH host keys in its console output after {timeout_s:g}s "
                    f"({polls} GetConsoleOutput call(s), at most {seen} characters of output). cloud-init prints "
                    "them at first boot (module keys_to_console): is the instance booting, and does its user "
                    "data or image turn keys_to_console off (ssh_key_console_blacklist, ssh_quiet_keygen)?")
            time.sleep(interval_s)

    def _client(self, region: str) -> Any:
        if self._client_factory is not None:
            return self._client_factory(region)
        import boto3

        return boto3.client("ec2", region_name=region)

    @staticmethod
    def _outs(props: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        return {**{k: v for k, v in props.items() if not k.startswith("__")}, "host_keys": keys}


def _seconds(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class HostKeys(pulumi.dynamic.Resource, module="fleet", name="HostKeys"):
    """An instance's SSH host keys from its console output; type `pulumi-python:dynamic/fleet:HostKeys`."""

    host_keys: pulumi.Output[list[str]]

    def __init__(self, name: str, instance_id: pulumi.Input[str], region: str, timeout_s: int = TIMEOUT_S,
                 interval_s: int = INTERVAL_S, opts: pulumi.ResourceOptions | None = None):
        props = {"instance_id": instance_id, "region": region, "timeout_s": timeout_s, "interval_s": interval_s,
                 "host_keys": None}
        super().__init__(HostKeysProvider(), name, props, opts)
