"""BareMetalHost's create/read/delete against the lab's Redfish BMC (sushy-tools' emulator, fake driver, loopback).

The emulator applies a power change 1 to 11 s after accepting it, as a real BMC takes its time: the
provider polls for it (bounded by `timeout_s`), and these tests check the state the BMC reports
afterwards with their own request, not with the provider's word for it.
"""

import time
from pathlib import Path

import pytest
import sushy
from pulumi.dynamic import Config, ConfigureRequest

from infra.onprem import BareMetalHostProvider
from lab.redfish import RedfishEmulator
from tests.dynamic_provider import provider_process, serialized

USER, PASSWORD = "admin", "redfish-Lab-pw"
SYSTEMS = ["dgx-a1", "dgx-a2", "dgx-a3", "dgx-a4"]
TIMEOUT = 40   # the fake driver lands a change within 11 s; a real BMC may need minutes (timeout_s default 300)


@pytest.fixture(scope="module")
def bmc(tmp_path_factory):
    emulator = RedfishEmulator(tmp_path_factory.mktemp("bmc"), SYSTEMS, username=USER, password=PASSWORD)
    emulator.start()
    yield emulator
    emulator.stop()


def props(bmc, system_id, **knobs):
    return {"host": system_id, "endpoint": bmc.url, "system_id": system_id, "username": USER,
            "verify_tls": False, "timeout_s": TIMEOUT, **knobs}


def configured() -> BareMetalHostProvider:
    provider = BareMetalHostProvider()
    provider.configure(ConfigureRequest(Config({"fleet:bmcPassword": PASSWORD}, "gpu-fleet")))
    return provider


def test_create_powers_on_with_one_time_pxe_then_delete_powers_off(bmc):
    provider = configured()
    inputs = props(bmc, "dgx-a1", pxe_once=True, power_on=True, power_off_on_delete=True)
    assert bmc.power_state("dgx-a1") == "Off"

    created = provider.create(inputs)
    assert created.id == f"{bmc.url}/redfish/v1/Systems/dgx-a1"
    assert bmc.power_state("dgx-a1") == "On"                       # the BMC's own answer
    assert bmc.system("dgx-a1")["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    assert created.outs["power_state"] == "On" and created.outs["boot_target"] == "Pxe"
    assert created.outs["manufacturer"] == "Sushy Emulator" and created.outs["uuid"] == "dgx-a1"
    assert "password" not in created.outs and PASSWORD not in repr(created.outs)

    read = provider.read(created.id, created.outs)
    assert read.id == created.id and read.outs["power_state"] == "On"

    provider.delete(created.id, read.outs)
    assert bmc.power_state("dgx-a1") == "Off"


def test_registering_only_reads_and_delete_leaves_power_alone(bmc):
    provider = configured()
    created = provider.create(props(bmc, "dgx-a2"))
    assert created.outs["power_state"] == "Off" and bmc.power_state("dgx-a2") == "Off"
    provider.delete(created.id, created.outs)
    assert bmc.power_state("dgx-a2") == "Off"


def test_read_of_a_system_the_bmc_does_not_have_is_gone(bmc):
    result = configured().read("x", props(bmc, "dgx-z9"))
    assert result.id == "" and result.outs == {}


def test_wrong_password_is_refused_by_the_bmc(bmc):
    provider = BareMetalHostProvider()
    provider.configure(ConfigureRequest(Config({"fleet:bmcPassword": "wrong"}, "gpu-fleet")))
    with pytest.raises(sushy.exceptions.AccessError):
        provider.create(props(bmc, "dgx-a2"))


def out_of_band(bmc, system_id: str, reset: str, want: str) -> None:
    """Someone at the BMC (its own client, not the provider) resets the system; wait until the BMC reports it."""
    client = sushy.Sushy(f"{bmc.url}/redfish/v1", username=USER, password=PASSWORD, verify=False)
    client.get_system(f"/redfish/v1/Systems/{system_id}").reset_system(reset)
    deadline = time.monotonic() + TIMEOUT
    while bmc.power_state(system_id) != want:
        assert time.monotonic() < deadline, f"{system_id} never reported {want}"
        time.sleep(0.5)


def test_a_host_powered_off_out_of_band_is_drift_and_update_powers_it_back_on(bmc):
    provider = configured()
    inputs = props(bmc, "dgx-a4", power_on=True)
    created = provider.create(inputs)
    assert bmc.power_state("dgx-a4") == "On"
    assert provider.diff(created.id, created.outs, inputs).changes is False

    out_of_band(bmc, "dgx-a4", sushy.ResetType.FORCE_OFF, "Off")
    diff = provider.diff(created.id, created.outs, inputs)   # what `pulumi preview` asks
    assert diff.changes is True and diff.replaces == []
    updated = provider.update(created.id, created.outs, inputs)
    assert bmc.power_state("dgx-a4") == "On" and updated.outs["power_state"] == "On"
    assert provider.diff(created.id, updated.outs, inputs).changes is False


def test_a_registered_only_host_shows_drift_and_update_only_records_it(bmc):
    provider = configured()
    inputs = props(bmc, "dgx-a2")
    created = provider.create(inputs)
    assert created.outs["power_state"] == "Off"
    out_of_band(bmc, "dgx-a2", sushy.ResetType.ON, "On")
    assert provider.diff(created.id, created.outs, inputs).changes is True
    updated = provider.update(created.id, created.outs, inputs)
    assert updated.outs["power_state"] == "On" and bmc.power_state("dgx-a2") == "On"  # not ours to power off
    assert provider.diff(created.id, updated.outs, inputs).changes is False
    out_of_band(bmc, "dgx-a2", sushy.ResetType.FORCE_OFF, "Off")  # as the other tests left it


def test_serialized_provider_in_a_fresh_pulumi_dynamic_process(bmc, tmp_path: Path):
    # As `pulumi up` / `pulumi destroy` run it: dill-pickled into `__provider`, unpickled and called by
    # `python -m pulumi.dynamic` in another interpreter, the password arriving through Configure.
    inputs = props(bmc, "dgx-a3", power_on=True, power_off_on_delete=True)
    inputs["__provider"] = serialized(BareMetalHostProvider())
    with provider_process(tmp_path, {"fleet:bmcPassword": PASSWORD, "aws:region": "us-east-1"}) as proc:
        _, failures = proc.check("dgx-a3", inputs)
        assert failures == []
        id_, outs = proc.create("dgx-a3", inputs)
        assert id_ == f"{bmc.url}/redfish/v1/Systems/dgx-a3" and outs["power_state"] == "On"
        assert bmc.power_state("dgx-a3") == "On"
        read_id, read_outs = proc.read("dgx-a3", id_, outs)
        assert read_id == id_ and read_outs["power_state"] == "On"
        proc.delete("dgx-a3", id_, read_outs)
        assert bmc.power_state("dgx-a3") == "Off"


def test_emulator_keeps_power_state_across_restarts(tmp_path):
    first = RedfishEmulator(tmp_path, ["node-1"]).start()     # no credentials: an open BMC
    try:
        BareMetalHostProvider().create({"endpoint": first.url, "system_id": "node-1", "username": "x",
                                        "power_on": True, "timeout_s": TIMEOUT})
        assert first.power_state("node-1") == "On"
    finally:
        first.stop()
    assert first.pid is None
    second = RedfishEmulator(tmp_path, ["node-1"], port=first.port).start()
    try:
        assert second.power_state("node-1") == "On"
    finally:
        second.stop()
