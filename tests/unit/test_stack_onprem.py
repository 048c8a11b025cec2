"""The on-prem hall under mocks: BareMetalHost per BMC, the BMC password kept out of everything, power checked,
and the provider surviving Pulumi's serialization into a fresh `python -m pulumi.dynamic` process."""

import base64
import copy
import json
from types import SimpleNamespace

import pulumi
import pytest
from pulumi.dynamic import Config, ConfigureRequest
from pulumi.runtime import rpc

from infra.model.fleet import load_stack
from infra.onprem import BareMetalHostProvider
from tests.dynamic_provider import provider_process, serialized
from tests.stack_mocks import hybrid_secrets, run_program, stack_config

BMH = "pulumi-python:dynamic/fleet:BareMetalHost"
PASSWORD = "bmc-pass-7Kq2"
HOSTS = ["dgx-h01", "dgx-h02", "dgx-h03", "dgx-h04"]


@pytest.fixture(scope="module")
def run():
    return run_program(stack_config(), hybrid_secrets(PASSWORD))


def test_one_bare_metal_host_per_bmc(run):
    hosts = {r.name: r for r in run.of_type(BMH)}
    assert sorted(hosts) == HOSTS
    for i, name in enumerate(HOSTS, start=1):
        inputs = hosts[name].inputs
        assert inputs["endpoint"] == f"https://10.64.2.1{i}" and inputs["system_id"] == "System.Embedded.1"
        assert inputs["username"] == "admin" and inputs["verify_tls"] is True
        # the hall asks for nothing: registering reads the machine, never powers it
        assert (inputs["pxe_once"], inputs["power_on"], inputs["power_off_on_delete"]) == (False, False, False)
        assert inputs["__provider"]


def test_bmc_password_is_in_no_input_output_or_pickled_provider(run):
    scanned = 0
    for resource in run.resources:
        text = json.dumps([resource.inputs, resource.state], default=str)
        assert PASSWORD not in text, resource.name
        provider = rpc.unwrap_rpc_secret(resource.inputs.get("__provider"))
        if provider:
            assert PASSWORD.encode() not in base64.b64decode(provider)
        scanned += 1
    assert scanned == len(run.resources) > 60
    assert PASSWORD not in json.dumps(run.outputs)
    dgx = run.outputs["ansible_inventory"]["all"]["hosts"]["dgx-h01"]
    assert dgx["fleet_bmc"] == {"endpoint": "https://10.64.2.11", "system_id": "System.Embedded.1",
                                "username": "admin", "verify_tls": True}


def test_missing_bmc_password_fails_naming_the_config_key():
    with pytest.raises(pulumi.RunError, match=r"config\.fleet:bmcPassword: required for the BMCs of dgx-h01, "):
        run_program(stack_config(), {})


def test_plain_text_bmc_password_is_refused():
    config = dict(stack_config(), **{"fleet:bmcPassword": PASSWORD})   # set without --secret
    with pytest.raises(pulumi.RunError, match="stored in plain text: set it again with `pulumi config set --secret"):
        run_program(config)


def test_power_violation_fails_the_program_naming_host_and_ups():
    config = copy.deepcopy(stack_config())
    hall = next(s for s in config["fleet:sites"] if s["name"] == "hall-a")
    hall["ups"][1]["capacity_w"] = 20000          # 16 kW derated: 13 kW fine, 26 kW with ups-a down is not
    dgx2 = next(h for h in config["fleet:hosts"] if h["name"] == "dgx-h02")
    dgx2["ib_hcas"][0]["port"] = 2                # dgx-h01 mlx5_0 is on leaf-rail0 port 2
    with pytest.raises(pulumi.RunError) as info:
        run_program(config, hybrid_secrets())
    text = str(info.value)
    assert "N+1: with UPS 'ups-a' failed, UPS 'ups-b' would carry 26000 W, over its derated capacity 16000 W" in text
    assert "switch port leaf-rail0 port 2 is cabled to both dgx-h01 mlx5_0 and dgx-h02 mlx5_0" in text


def test_stack_file_with_the_secret_still_loads(tmp_path, root):
    # `pulumi config set --secret fleet:bmcPassword` writes the key into the stack file; `fleet inventory`
    # reads the same file and must not call it an unknown fleet key
    text = (root / "Pulumi.example-hybrid.yaml").read_text()
    text = text.replace("config:\n", "config:\n  fleet:bmcPassword:\n    secure: AAABAHn0tARealCiphertext\n", 1)
    (tmp_path / "Pulumi.s.yaml").write_text(text)
    assert len(load_stack("s", tmp_path).hosts) == 14


def test_provider_pickles_by_reference_without_state():
    provider = BareMetalHostProvider()
    raw = base64.b64decode(serialized(provider))
    assert b"infra.onprem" in raw and b"BareMetalHostProvider" in raw
    # by reference: no class body or function code travels (that is what breaks, pulumi issue 7453)
    assert b"_create_type" not in raw and b"_create_function" not in raw and b"_create_code" not in raw
    provider.configure(ConfigureRequest(Config({"fleet:bmcPassword": PASSWORD}, "gpu-fleet")))
    assert PASSWORD.encode() not in base64.b64decode(serialized(BareMetalHostProvider()))


class FakeSystem:
    """What sushy's System gives the provider: a power state and a boot target (enum-like: `.value`)."""

    def __init__(self, power: str = "On", boot: str | None = None):
        self.power_state = SimpleNamespace(value=power)
        self.boot = SimpleNamespace(target=SimpleNamespace(value=boot) if boot else None)


def provider_seeing(system: FakeSystem | Exception) -> BareMetalHostProvider:
    provider = BareMetalHostProvider()

    def answer(_props):
        if isinstance(system, Exception):
            raise system
        return system

    provider._system = answer  # the BMC the provider asks, as a fake (the emulator: tests/integration)
    return provider


def test_provider_check_and_diff():
    provider = provider_seeing(FakeSystem("On"))
    good = {"host": "h", "endpoint": "https://10.0.0.1", "username": "admin", "timeout_s": 60}
    assert provider.check({}, good).failures == []
    failures = provider.check({}, dict(good, endpoint="10.0.0.1", password="x", timeout_s=0)).failures
    assert [f.property for f in failures] == ["endpoint", "timeout_s", "password"]
    replace = provider.diff("id", good, dict(good, endpoint="https://10.0.0.2"))
    assert replace.changes and replace.replaces == ["endpoint"] and replace.delete_before_replace
    knob = provider.diff("id", dict(good, serial_number="SN1"), dict(good, power_on=True))
    assert knob.changes and knob.replaces == []
    same = provider.diff("id", dict(good, serial_number="SN1", power_state="On"), dict(good))
    assert same.changes is False
    dropped = provider.diff("id", dict(good, system_id="1"), good)     # system_id removed from the config
    assert dropped.changes and dropped.replaces == ["system_id"]


def test_provider_from_the_program_runs_in_a_fresh_pulumi_dynamic_process(run, tmp_path):
    # exactly the `__provider` the program stored, unpickled and called by pulumi's own provider process
    inputs = dict(run.named(BMH, "dgx-h01").inputs)
    # the engine hands providers plain values (pulumi.dynamic does not accept secrets)
    inputs["__provider"] = rpc.unwrap_rpc_secret(inputs["__provider"])
    with provider_process(tmp_path, {"fleet:bmcPassword": PASSWORD}) as proc:
        checked, failures = proc.check("dgx-h01", inputs)
        assert failures == [] and checked["endpoint"] == "https://10.64.2.11"
        _, failures = proc.check("dgx-h01", dict(inputs, endpoint="10.64.2.11"))
        assert failures == [("endpoint", "must be an http(s) URL of the BMC, got '10.64.2.11'")]
        diff = proc.diff("dgx-h01", "x", inputs, dict(inputs, system_id="System.Embedded.2"))
        assert list(diff.replaces) == ["system_id"] and diff.deleteBeforeReplace


def test_diff_shows_a_host_powered_off_out_of_band():
    good = {"host": "h", "endpoint": "https://10.0.0.1", "username": "admin", "power_on": True}
    recorded = dict(good, serial_number="SN1", power_state="On", boot_target=None)
    assert provider_seeing(FakeSystem("On")).diff("id", recorded, good).changes is False
    off = provider_seeing(FakeSystem("Off"))
    assert off.drift(recorded, good) == ["power_state"] and off.diff("id", recorded, good).changes is True


def test_diff_of_a_registered_only_host_compares_with_what_was_recorded():
    """power_on false: the hall does not manage power, but a change since the last read still shows."""
    good = {"host": "h", "endpoint": "https://10.0.0.1", "username": "admin"}
    recorded = dict(good, power_state="Off", boot_target="Pxe")
    assert provider_seeing(FakeSystem("Off", "Pxe")).drift(recorded, good) == []
    assert provider_seeing(FakeSystem("On", "Pxe")).drift(recorded, good) == ["power_state"]
    assert provider_seeing(FakeSystem("Off", "Hdd")).drift(recorded, good) == ["boot_target"]


def test_a_bmc_that_cannot_be_asked_shows_no_drift():
    good = {"host": "h", "endpoint": "https://10.0.0.1", "username": "admin", "power_on": True}
    recorded = dict(good, power_state="On")
    provider = provider_seeing(ConnectionError("no route to host"))
    assert provider.drift(recorded, good) == [] and provider.diff("id", recorded, good).changes is False
