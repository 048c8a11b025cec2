"""BareMetalHost's create/read/delete against the lab's Redfish BMC (sushy-tools' emulator, fake driver, loopback).

The emulator applies a power change 1 to 11 s after accepting it, as a real BMC takes its time: the
provider polls for it (bounded by `timeout_s`), and these tests check the state the BMC reports
afterwards with their own request, not with the provider's word for it.
"""

from pathlib import Path

import pytest
import sushy
from pulumi.dynamic import Config, ConfigureRequest

from infra.onprem import BareMetalHostProvider
from lab.redfish import RedfishEmulator
from tests.dynamic_provider import DynamicProviderProcess, serialized

USER, PASSWORD = "admin", "redfish-Lab-pw"
SYSTEMS = ["dgx-a1", "dgx-a2", "dgx-a3"]
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


def test_serialized_provider_in_a_fresh_pulumi_dynamic_process(bmc, tmp_path: Path):
    # As `pulumi up` / `pulumi destroy` run it: dill-pickled into `__provider`, unpickled and called by
    # `python -m pulumi.dynamic` in another interpreter, the password arriving through Configure.
    inputs = props(bmc, "dgx-a3", power_on=True, power_off_on_delete=True)
    inputs["__provider"] = serialized(BareMetalHostProvider())
    proc = DynamicProviderProcess(tmp_path)
    try:
        proc.configure({"fleet:bmcPassword": PASSWORD, "aws:region": "us-east-1"})
        _, failures = proc.check("dgx-a3", inputs)
        assert failures == []
        id_, outs = proc.create("dgx-a3", inputs)
        assert id_ == f"{bmc.url}/redfish/v1/Systems/dgx-a3" and outs["power_state"] == "On"
        assert bmc.power_state("dgx-a3") == "On"
        read_id, read_outs = proc.read("dgx-a3", id_, outs)
        assert read_id == id_ and read_outs["power_state"] == "On"
        proc.delete("dgx-a3", id_, read_outs)
        assert bmc.power_state("dgx-a3") == "Off"
    finally:
        stderr = proc.stop()
    assert "Traceback" not in stderr, stderr


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
