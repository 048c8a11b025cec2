"""Run a dynamic provider the way the Pulumi engine does, without the CLI.

Pulumi pickles a dynamic provider with dill (`pulumi.dynamic.dynamic.serialize_provider`), stores the
base64 text in the resource's `__provider` input, and at `up`/`refresh`/`destroy` time starts
`python -m pulumi.dynamic` (the `pulumi-resource-pulumi-python` plugin), which prints the port of its
gRPC ResourceProvider service; the engine then calls Configure (the stack's config), Check, Create,
Read, Delete with `__provider` in the properties, and the process unpickles the provider from it.

`DynamicProviderProcess` starts that very module in a fresh interpreter (isolated mode, in a directory
that is not the project's) and speaks the same gRPC calls.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.runtime import rpc
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc
from pulumi.runtime.sync_await import _sync_await

URN = "urn:pulumi:test::gpu-fleet::pulumi-python:dynamic/fleet:BareMetalHost::{name}"


def serialized(provider: Any) -> str:
    """The `__provider` value Pulumi would store for this provider object."""
    return serialize_provider(provider)


def _struct(props: dict[str, Any]):
    return _sync_await(rpc.serialize_properties(props, {}))


class DynamicProviderProcess:
    """`python -I -m pulumi.dynamic` in `cwd`, and a gRPC stub to it; stop() ends that process (by its PID)."""

    def __init__(self, cwd: Path):
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-u", "-m", "pulumi.dynamic"], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", "PULUMI_PROJECT": "gpu-fleet"})
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().strip()
        if not line.isdigit():
            self.stop()
            raise RuntimeError(f"pulumi.dynamic did not print its port: {line!r}")
        self.pid = self._proc.pid
        self._channel = grpc.insecure_channel(f"127.0.0.1:{line}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self._channel)

    def configure(self, config: dict[str, Any]) -> None:
        self.stub.Configure(provider_pb2.ConfigureRequest(args=_struct(config)))

    def check(self, name: str, news: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        resp = self.stub.Check(provider_pb2.CheckRequest(urn=URN.format(name=name), olds=_struct({}),
                                                         news=_struct(news)))
        return rpc.deserialize_properties(resp.inputs), [(f.property, f.reason) for f in resp.failures]

    def diff(self, name: str, id_: str, olds: dict[str, Any], news: dict[str, Any]):
        return self.stub.Diff(provider_pb2.DiffRequest(urn=URN.format(name=name), id=id_, olds=_struct(olds),
                                                       news=_struct(news)))

    def create(self, name: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self.stub.Create(provider_pb2.CreateRequest(urn=URN.format(name=name), properties=_struct(props)))
        return resp.id, rpc.deserialize_properties(resp.properties)

    def read(self, name: str, id_: str, props: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        resp = self.stub.Read(provider_pb2.ReadRequest(urn=URN.format(name=name), id=id_, properties=_struct(props)))
        return resp.id, rpc.deserialize_properties(resp.properties)

    def delete(self, name: str, id_: str, props: dict[str, Any]) -> None:
        self.stub.Delete(provider_pb2.DeleteRequest(urn=URN.format(name=name), id=id_, properties=_struct(props)))

    def stop(self) -> str:
        """End the provider process; return what it wrote on stderr (tracebacks of failed calls)."""
        if getattr(self, "_channel", None) is not None:
            self._channel.close()
        self._proc.terminate()
        try:
            _, err = self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        return err.decode(errors="replace")


@contextlib.contextmanager
def provider_process(cwd: Path, config: dict[str, Any]) -> Iterator[DynamicProviderProcess]:
    """A configured `pulumi.dynamic` process for the body; stopped after it, which must leave no traceback."""
    proc = DynamicProviderProcess(cwd)
    try:
        proc.configure(config)
        yield proc
    finally:
        stderr = proc.stop()
    assert "Traceback" not in stderr, stderr
