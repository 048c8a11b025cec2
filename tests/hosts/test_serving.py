"""The serving unit runs the bundle's image and serves its release and weights, read as a real vLLM host gives
them: the running container's image digest from podman, /v1/models' `root` (the path the server loaded), that
file's sha256 on disk, /version."""

from __future__ import annotations

from patching.hosts.facts import image_digest, serving_container
from tests.hosts.checks import expect, serving_address, unit_state_command, weights_file


def _served(name, facts, hostvars, what, want) -> dict:
    models = facts.served_models(hostvars["fleet_serving_port"], serving_address(hostvars))
    if isinstance(models, str):
        expect(False, name, what, want, models)
    entry = next((m for m in models.get("data", []) if m.get("id") == hostvars["fleet_model"]), None)
    expect(entry is not None, name, what, want,
           f"/v1/models lists {', '.join(m.get('id', '?') for m in models.get('data', [])) or 'nothing'}")
    return entry


def test_serving_unit_active(name, facts, bundle):
    unit = f"{bundle.serving.engine}-serving"
    found = facts.run(unit_state_command(unit)).stdout.strip() or "unknown"
    expect(found == "active", name, f"{unit}.service", "active", found)


def test_serving_container_image(name, facts, bundle):
    container = serving_container(bundle.serving.engine)
    want = image_digest(bundle.serving.image)
    found = facts.container_image(container)
    expect(found.running and found.digest == want, name, f"{container} container's image (podman inspect)", want,
           found.describe())


def test_serving_model(name, facts, hostvars):
    _served(name, facts, hostvars, "served model", hostvars["fleet_model"])


def test_serving_weights_path(name, facts, hostvars, bundle):
    want = weights_file(hostvars, bundle)
    found = _served(name, facts, hostvars, "served weights path", want).get("root")
    expect(found == want, name, "served weights path (/v1/models root)", want, found)


def test_serving_weights_sha256(name, facts, hostvars, bundle):
    want = bundle.model(hostvars["fleet_model"]).weights.sha256
    path = _served(name, facts, hostvars, "served weights sha256", want).get("root")
    expect(isinstance(path, str) and path.startswith("/"), name, "served weights sha256", want,
           f"/v1/models root is {path!r}, not a path on the host")
    found = facts.sha256(path)
    expect(found == want, name, f"served weights sha256 ({path})", want, found)


def test_serving_version(name, facts, hostvars, bundle):
    want = bundle.serving.version
    answer = facts.served_version(hostvars["fleet_serving_port"], serving_address(hostvars))
    found = answer.get("version") if isinstance(answer, dict) else answer
    expect(found == want, name, "serving version (/version)", want, found)
