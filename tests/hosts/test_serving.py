"""The serving unit runs and serves the bundle's release and weights (sha256 as the server computed it)."""

from __future__ import annotations

from tests.hosts.checks import expect


def _address(hostvars) -> str:
    bind = hostvars.get("fleet_serving_bind_address") or "127.0.0.1"
    return "127.0.0.1" if bind in ("0.0.0.0", "::") else bind


def _served(name, facts, hostvars, what, want) -> dict:
    models = facts.served_models(hostvars["fleet_serving_port"], _address(hostvars))
    if isinstance(models, str):
        expect(False, name, what, want, models)
    entry = next((m for m in models.get("data", []) if m.get("id") == hostvars["fleet_model"]), None)
    expect(entry is not None, name, what, want,
           f"/v1/models lists {', '.join(m.get('id', '?') for m in models.get('data', [])) or 'nothing'}")
    return entry


def test_serving_unit_active(name, host, bundle):
    unit = f"{bundle.serving.engine}-serving"
    found = host.run(f"systemctl is-active {unit}").stdout.strip() or "unknown"
    expect(found == "active", name, f"{unit}.service", "active", found)


def test_serving_model(name, facts, hostvars):
    _served(name, facts, hostvars, "served model", hostvars["fleet_model"])


def test_serving_weights_sha256(name, facts, hostvars, bundle):
    want = bundle.model(hostvars["fleet_model"]).weights.sha256
    found = _served(name, facts, hostvars, "served weights sha256", want).get("weights_sha256")
    expect(found == want, name, "served weights sha256", want, found)


def test_serving_version(name, facts, hostvars, bundle):
    want = bundle.serving.version
    found = _served(name, facts, hostvars, "serving version", want).get("serving_version")
    expect(found == want, name, "serving version", want, found)
