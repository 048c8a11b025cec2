"""The HostKeys dynamic provider: an instance's SSH host keys read off its console output (EC2 GetConsoleOutput,
answered by botocore's Stubber), one resource per cloud instance, the keys reaching the inventory."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.stub import Stubber
from pulumi.runtime import rpc

from infra.hostkeys_provider import HostKeysProvider, console_text
from infra.model.access import host_keys_from_console
from tests.dynamic_provider import provider_process, serialized
from tests.stack_mocks import HOST_KEYS, hybrid_secrets, mock_host_key, run_program, stack_config

CONSOLE = (Path(__file__).parent / "formats/ec2-console-cloud-init-23-jammy.txt").read_bytes().decode()
KEYS = host_keys_from_console(CONSOLE)
IID = "i-0a1b2c3d4e5f60718"
WHEN = dt.datetime(2024, 3, 18, 9, 12, 40, tzinfo=dt.UTC)


def _client():
    return boto3.client("ec2", region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE",
                        aws_secret_access_key="not-a-secret")


def _answer(text: str | None) -> dict:
    """GetConsoleOutput's answer as the API gives it: the text base64-encoded (absent before any output); the
    stubbed client hands it through botocore's after-call handlers as a real call would."""
    answer = {"InstanceId": IID, "Timestamp": WHEN}
    if text is not None:
        answer["Output"] = base64.b64encode(text.encode()).decode()
    return answer


def _provider(client) -> HostKeysProvider:
    return HostKeysProvider(client_factory=lambda region: client)


PROPS = {"instance_id": IID, "region": "us-east-1", "timeout_s": 60, "interval_s": 0, "host_keys": None}


def test_create_polls_until_cloud_init_has_printed_the_keys():
    client = _client()
    asked = {"InstanceId": IID, "Latest": True}
    half = CONSOLE[:CONSOLE.index("-----END SSH HOST KEY KEYS")]
    with Stubber(client) as stub:
        stub.add_client_error("get_console_output", "InvalidInstanceID.NotFound", "The instance ID does not exist",
                              400, expected_params=asked)   # just launched: EC2 does not know it everywhere yet
        stub.add_response("get_console_output", _answer(None), asked)     # booting, nothing printed yet
        stub.add_response("get_console_output", _answer(half), asked)     # the KEYS block not finished
        stub.add_response("get_console_output", _answer(CONSOLE), asked)
        result = _provider(client).create(dict(PROPS, __provider="x"))
        stub.assert_no_pending_responses()
    assert result.id == IID
    assert result.outs == {"instance_id": IID, "region": "us-east-1", "timeout_s": 60, "interval_s": 0,
                           "host_keys": KEYS}
    assert [k.split()[0] for k in KEYS] == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]


def test_the_console_text_is_base64_decoded_once():
    """botocore decodes `Output` itself (handlers.decode_console_output): decoding the text again would mangle it."""
    client = _client()
    with Stubber(client) as stub:
        stub.add_response("get_console_output", _answer(CONSOLE))
        response = client.get_console_output(InstanceId=IID, Latest=True)
    assert response["Output"] == CONSOLE and console_text(response) == CONSOLE
    assert console_text(_answer(CONSOLE)) == CONSOLE  # a raw API answer, still base64
    assert console_text({}) == "" and console_text({"Output": None}) == ""


def test_an_instance_that_never_prints_keys_fails_naming_it():
    client = _client()
    with Stubber(client) as stub:
        for _ in range(3):
            stub.add_response("get_console_output", _answer("[    0.000000] Linux version 6.5.0-1014-aws\r\n"))
        with pytest.raises(TimeoutError) as info:
            _provider(client).wait_for_keys(IID, "us-east-1", timeout_s=0.05, interval_s=0.03)
    text = str(info.value)
    assert text.startswith(f"{IID} (us-east-1): no SSH host keys in its console output after 0.05s")
    assert "keys_to_console" in text


def test_a_key_that_matches_no_printed_fingerprint_fails_at_once():
    forged = CONSOLE.replace(KEYS[1], mock_host_key("mallory"))
    client = _client()
    with Stubber(client) as stub:
        stub.add_response("get_console_output", _answer(forged))
        with pytest.raises(RuntimeError, match=rf"^{IID} \(us-east-1\): console host key ssh-ed25519 SHA256:"):
            _provider(client).wait_for_keys(IID, "us-east-1", 600, 0)


def test_a_non_nitro_instance_is_read_from_the_buffered_output():
    client = _client()
    with Stubber(client) as stub:
        stub.add_client_error("get_console_output", "UnsupportedOperation", "Latest is Nitro only", 400,
                              expected_params={"InstanceId": IID, "Latest": True})
        stub.add_response("get_console_output", _answer(CONSOLE), {"InstanceId": IID, "Latest": False})
        assert _provider(client).wait_for_keys(IID, "us-east-1", 60, 0) == KEYS


def test_other_api_errors_are_not_retried():
    client = _client()
    with Stubber(client) as stub:
        stub.add_client_error("get_console_output", "UnauthorizedOperation", "not allowed", 403)
        with pytest.raises(RuntimeError, match=rf"^{IID} \(us-east-1\): GetConsoleOutput failed: .*UnauthorizedOper"):
            _provider(client).wait_for_keys(IID, "us-east-1", 60, 0)


def test_check_diff_read_update():
    provider = HostKeysProvider(client_factory=lambda region: pytest.fail("no AWS call expected"))
    assert provider.check({}, PROPS).failures == []
    assert provider.check({}, dict(PROPS, instance_id=rpc.UNKNOWN)).failures == []   # at preview
    bad = provider.check({}, dict(PROPS, instance_id="web-1", region="", timeout_s=0, interval_s=-1)).failures
    assert [f.property for f in bad] == ["instance_id", "region", "timeout_s", "interval_s"]
    recorded = dict(PROPS, host_keys=KEYS)
    other = provider.diff(IID, recorded, dict(PROPS, instance_id="i-0ffffffffffffffff"))
    assert other.changes and other.replaces == ["instance_id"] and other.delete_before_replace
    assert provider.diff(IID, recorded, dict(PROPS, region="us-west-2")).replaces == ["region"]
    knobs = provider.diff(IID, recorded, dict(PROPS, timeout_s=1800, interval_s=30))
    assert knobs.changes is False and knobs.replaces == []
    # refresh keeps what create read: the first-boot block scrolls out of the console
    assert provider.read(IID, recorded).outs["host_keys"] == KEYS
    assert provider.update(IID, recorded, dict(PROPS, timeout_s=1800)).outs["host_keys"] == KEYS


def test_provider_pickles_by_reference():
    raw = base64.b64decode(serialized(HostKeysProvider()))
    assert b"infra.hostkeys_provider" in raw and b"HostKeysProvider" in raw
    assert b"_create_type" not in raw and b"_create_code" not in raw


# --- the program under mocks -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run():
    return run_program(stack_config(), hybrid_secrets())


def test_one_host_keys_resource_per_cloud_instance(run):
    instances = {i.name: i for i in run.of_type("aws:ec2/instance:Instance")}
    keys = {k.name: k for k in run.of_type(HOST_KEYS)}
    assert len(instances) == 10 and keys.keys() == instances.keys()
    regions = {}
    for name, resource in keys.items():
        assert resource.inputs["instance_id"] == instances[name].id
        assert resource.inputs["timeout_s"] == 900 and resource.inputs["interval_s"] == 15
        regions[name] = resource.inputs["region"]
    assert sorted(set(regions.values())) == ["eu-central-1", "us-east-1"]
    assert regions["r1-outpost-0"] == "eu-central-1" and regions["v3-use1b-3"] == "us-east-1"


def test_user_data_refuses_root_and_leaves_the_keys_on_the_console(run):
    checked = 0
    for instance in run.of_type("aws:ec2/instance:Instance"):
        data = yaml.safe_load(instance.inputs["userData"])
        assert data["disable_root"] is True
        assert not {"ssh_quiet_keygen", "ssh_fp_console_blacklist", "ssh_key_console_blacklist", "ssh_keys",
                    "ssh_genkeytypes"} & set(data)
        checked += 1
    assert checked == 10


def test_the_keys_reach_the_inventory(run):
    hostvars = run.outputs["ansible_inventory"]["all"]["hosts"]
    instances = {i.name: i for i in run.of_type("aws:ec2/instance:Instance")}
    checked = []
    for name, instance in instances.items():
        hv = hostvars[name]
        assert hv["fleet_ssh_host_keys"] == [mock_host_key(instance.id)]
        if hv["fleet_site_kind"] == "outpost":   # via ssm: Session Manager connects to the instance id
            assert hv["ansible_aws_ssm_instance_id"] == instance.id and hv["ansible_host"] == instance.state[
                "privateIp"]
            assert hv["ansible_connection"] == "amazon.aws.aws_ssm" and "ansible_ssh_common_args" not in hv
        else:
            assert "ansible_aws_ssm_instance_id" not in hv and hv["fleet_ssh_bastion"]["host"] in (
                "203.0.113.10", "203.0.113.11")
            assert "ProxyCommand=" in hv["ansible_ssh_common_args"]
        checked.append(name)
    assert len(checked) == 10
    assert not any("fleet_ssh_host_keys" in hv for hv in hostvars.values() if hv["fleet_site_kind"] == "onprem")


def test_provider_from_the_program_runs_in_a_fresh_pulumi_dynamic_process(run, tmp_path):
    inputs = dict(run.named(HOST_KEYS, "v3-use1a-0").inputs)
    inputs["__provider"] = rpc.unwrap_rpc_secret(inputs["__provider"])
    with provider_process(tmp_path, {}) as proc:
        checked, failures = proc.check("v3-use1a-0", inputs)
        assert failures == [] and checked["instance_id"] == inputs["instance_id"]
        _, failures = proc.check("v3-use1a-0", dict(inputs, instance_id="web-1"))
        assert failures == [("instance_id", "expected an EC2 instance id (i-...), got 'web-1'")]
        diff = proc.diff("v3-use1a-0", "x", inputs, dict(inputs, instance_id="i-0ffffffffffffffff"))
        assert list(diff.replaces) == ["instance_id"] and diff.deleteBeforeReplace
