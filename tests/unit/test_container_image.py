"""Reading the serving container's image digest as podman reports it (patching/hosts/facts.py)."""

from __future__ import annotations

import subprocess

import pytest

from patching.hosts.facts import (
    CONTAINER_IMAGE_FORMAT,
    container_image_command,
    image_digest,
    parse_container_image,
    serving_container,
)

DIGEST = "sha256:" + "ab" * 32


def test_running_container_and_its_digest():
    found = parse_container_image(f"true {DIGEST}\nrc=0\n")
    assert (found.running, found.digest, found.error) == (True, DIGEST, None)
    assert found.describe() == DIGEST


def test_stopped_container_is_not_running():
    found = parse_container_image(f"false {DIGEST}\nrc=0\n")
    assert not found.running and found.digest == DIGEST
    assert found.describe() == f"not running (image {DIGEST})"


def test_missing_container():
    # podman 4.3.1 (Debian 12), seen in a lab host: `podman container inspect --format ... nope`
    found = parse_container_image("Error: inspecting object: no such container nope\nrc=125\n")
    assert not found.running and found.digest is None and found.error == "no such container"


@pytest.mark.parametrize("output, shown", [
    ("bash: line 1: podman: command not found\nrc=127\n", "podman: command not found"),
    ("true <no value>\nrc=0\n", "unexpected output"),  # a podman before 4.3 has no ImageDigest
    ("", "no output"),
])
def test_what_podman_could_not_say_is_named(output, shown):
    found = parse_container_image(output)
    assert not found.running and found.digest is None and shown in found.describe()


def test_command_quotes_the_go_template_and_reports_the_exit_code():
    command = container_image_command("vllm-serving")
    assert CONTAINER_IMAGE_FORMAT in command and command.endswith("echo rc=$?")
    # the shell passes the template through as one argument
    out = subprocess.run(["bash", "-c", command.replace("podman container inspect", "printf '%s|%s|%s|%s\\n'")],
                         capture_output=True, text=True).stdout
    assert out.splitlines()[0] == f"--format|{CONTAINER_IMAGE_FORMAT}|vllm-serving|"


def test_names_and_digests():
    assert serving_container("vllm") == "vllm-serving"
    assert image_digest(f"docker.io/vllm/vllm-openai@{DIGEST}") == DIGEST


def _drift_answer(container: str) -> str:
    from patching.hosts import drift

    return (f"{drift.SEPARATOR}\n{{\"release\": \"2026-10\"}}\n{drift.EFA_SEPARATOR}\n"
            f"{drift.CONTAINER_SEPARATOR}\n{container}")


@pytest.mark.parametrize("container, found", [
    (f"true {DIGEST}\nrc=0\n", "not this digest"),
    ("Error: inspecting object: no such container vllm-serving\nrc=125\n", "no such container"),
    (None, None),  # the bundle's own digest: no difference
])
def test_drift_names_both_digests_of_the_serving_container(container, found):
    from patching.hosts.drift import differences, read_command
    from patching.release.bundle import load_bundle

    bundle = load_bundle("releases/2026-10.yaml")
    want = image_digest(bundle.serving.image)
    assert container_image_command("vllm-serving") in read_command(bundle)
    answer = _drift_answer(container or f"true {want}\nrc=0\n")
    rows = [d for d in differences("h1", bundle, {"fleet_gpu_count": 8}, answer) if d.item.endswith("container image")]
    if found is None:
        assert rows == []
        return
    [row] = rows
    assert row.item == "vllm-serving container image" and row.expected == want
    assert row.found == (DIGEST if found == "not this digest" else found)
    # a host without GPUs runs no server: nothing compared
    no_gpus = differences("h1", bundle, {"fleet_gpu_count": 0}, answer)
    assert [d for d in no_gpus if d.item.endswith("container image")] == []
