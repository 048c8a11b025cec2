"""Cloud access (issue 15): the AMI's default user with become, SSH through a bastion or Session Manager, and host
keys known before the first connection (read from the console output, written to known_hosts)."""

from __future__ import annotations

import copy
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from ansible.plugins.connection import ConnectionBase

from infra.model.access import (
    HostVarError,
    fingerprint,
    host_keys_from_console,
    known_hosts_lines,
    merge_known_hosts,
    parse_public_key,
    proxy_command,
    ssh_common_args,
)
from infra.model.errors import InputError
from infra.model.fleet import fleet_config_from_stack, parse_fleet
from infra.model.inventory import Endpoint, build_inventory
from tests.stack_mocks import mock_host_key, stack_config

FORMATS = Path(__file__).parent / "formats"
CONSOLE = (FORMATS / "ec2-console-cloud-init-23-jammy.txt").read_bytes().decode()  # CRLF kept
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINHPWCUEqEGYFFsATBurDDuX1RfwBm7+484xXMXK0nQi"
BASTION = {"host": "203.0.113.10", "port": 22, "user": "ubuntu", "host_keys": [ED25519]}


def _fleet(config: dict):
    return parse_fleet(fleet_config_from_stack(config), "Pulumi.t.yaml", "config.fleet:")


def _problems(config: dict) -> list[tuple[str, object, str]]:
    with pytest.raises(InputError) as info:
        _fleet(config)
    return [(p.field, p.value, p.message) for p in info.value.problems]


def _site(config: dict, name: str) -> dict:
    return next(s for s in config["fleet:sites"] if s["name"] == name)


# --- the model -------------------------------------------------------------------------------------------------


def test_cloud_hosts_log_in_as_the_amis_default_user_on_prem_as_root():
    fleet = _fleet(stack_config())
    assert fleet.ssh_user(fleet.hosts["v3-use1a-0"]) == "ubuntu"
    assert fleet.ssh_user(fleet.hosts["r1-outpost-1"]) == "ubuntu"
    assert fleet.ssh_user(fleet.hosts["dgx-h01"]) == "root"
    config = copy.deepcopy(stack_config())
    _site(config, "outpost-fra1")["default_user"] = "ec2-user"
    config["fleet:hosts"][0]["ssh_user"] = "ops"
    fleet = _fleet(config)
    assert fleet.ssh_user(fleet.hosts["r1-outpost-0"]) == "ec2-user" and fleet.ssh_user(fleet.hosts["dgx-h01"]) == "ops"


def test_the_example_stack_declares_a_bastion_per_aws_site_and_ssm_on_the_outpost():
    fleet = _fleet(stack_config())
    vias = {name: site.access.via for name, site in fleet.sites.items() if site.kind != "onprem"}
    assert vias == {"use1-az-a": "bastion", "use1-az-b": "bastion", "outpost-fra1": "ssm"}
    bastion = fleet.sites["use1-az-a"].access.bastion
    assert bastion and bastion.host == "203.0.113.10" and bastion.host_keys == [ED25519]
    assert fleet.sites["outpost-fra1"].access.ssm_bucket == "example-hybrid-ansible-ssm"


@pytest.mark.parametrize(("access", "field", "value", "words"), [
    ({"via": "bastion"}, "config.fleet:sites[0].access.bastion", None, "required when via is 'bastion'"),
    ({"via": "bastion", "bastion": dict(BASTION, host_keys=[])}, "config.fleet:sites[0].access.bastion.host_keys",
     [], "at least one public host key"),
    ({"via": "ssm"}, "config.fleet:sites[0].access.ssm_bucket", None, "required when via is 'ssm'"),
    ({"via": "direct", "bastion": BASTION}, "config.fleet:sites[0].access.bastion", None,
     "only with via: bastion (via is 'direct')"),
    ({"via": "bastion", "bastion": BASTION, "ssm_bucket": "b-ssm"}, "config.fleet:sites[0].access.ssm_bucket",
     "b-ssm", "used only with via: ssm"),
], ids=["bastion-missing", "no-host-key", "ssm-without-bucket", "bastion-unused", "bucket-unused"])
def test_access_needs_what_its_path_uses(access, field, value, words):
    config = copy.deepcopy(stack_config())
    config["fleet:sites"][0]["access"] = access
    (problem,) = _problems(config)
    assert problem[0] == field and problem[1] == value and words in problem[2]


@pytest.mark.parametrize(("key", "words"), [
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unknown key type 'ssh-dss'"),
    ("ssh-ed25519 not*base64", "not valid base64"),
    ("ssh-ed25519", "expected an OpenSSH public key"),
    # an RSA key's data under the ed25519 name: the embedded type says what it is
    ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7", "is a 'ssh-rsa' key, not 'ssh-ed25519'"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKtP1c1B", "truncated key data"),
])
def test_a_bastion_host_key_is_validated_naming_file_field_and_value(key, words):
    config = copy.deepcopy(stack_config())
    _site(config, "use1-az-b")["access"]["bastion"]["host_keys"] = [ED25519, key]
    (problem,) = _problems(config)
    assert problem[0] == "config.fleet:sites[1].access.bastion.host_keys" and words in problem[2]
    assert "host_keys[1]" in problem[2]


def test_bastion_address_user_and_bucket_are_checked():
    config = copy.deepcopy(stack_config())
    _site(config, "use1-az-a")["access"]["bastion"].update(host="bastion host", user="a b")
    _site(config, "outpost-fra1")["access"]["ssm_bucket"] = "Not_A_Bucket"
    fields = {field: value for field, value, _ in _problems(config)}
    assert fields == {"config.fleet:sites[0].access.bastion.host": "bastion host",
                      "config.fleet:sites[0].access.bastion.user": "a b",
                      "config.fleet:sites[2].access.ssm_bucket": "Not_A_Bucket"}


def test_a_key_comment_is_dropped_and_every_known_type_parses():
    fleet_key = parse_public_key(ED25519 + " root@bastion")
    assert fleet_key == tuple(ED25519.split())
    block = CONSOLE.split("-----BEGIN SSH HOST KEY KEYS-----")[1].split("-----END")[0]
    assert sorted(parse_public_key(line)[0] for line in block.split("\r\n") if line) == [
        "ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]


# --- the inventory ---------------------------------------------------------------------------------------------


def _hostvars(config: dict | None = None, endpoints: dict | None = None) -> dict:
    return build_inventory(_fleet(config or stack_config()), endpoints)["all"]["hosts"]


def test_a_bastion_host_gets_strict_ssh_args_through_a_proxy_command():
    hv = _hostvars(endpoints={"v3-use1a-0": Endpoint("10.42.3.17", extra_vars={
        "fleet_ssh_host_keys": [mock_host_key("i-1")]})})["v3-use1a-0"]
    assert hv["ansible_user"] == "ubuntu" and hv["ansible_become"] is True and "ansible_connection" not in hv
    assert hv["ansible_ssh_common_args"] == (
        '-o UserKnownHostsFile=~/.ssh/known_hosts -o StrictHostKeyChecking=yes -o ProxyCommand="ssh '
        '-o UserKnownHostsFile=~/.ssh/known_hosts -o StrictHostKeyChecking=yes -W %h:%p -p 22 ubuntu@203.0.113.10"')
    assert hv["fleet_ssh_bastion"] == BASTION and hv["fleet_ssh_host_keys"] == [mock_host_key("i-1")]


def test_an_ssm_host_gets_the_aws_ssm_connection():
    hv = _hostvars(endpoints={"r1-outpost-0": Endpoint("10.43.0.12", extra_vars={
        "ansible_aws_ssm_instance_id": "i-0123456789abcdef0"})})["r1-outpost-0"]
    assert {k: v for k, v in hv.items() if k.startswith("ansible_")} == {
        "ansible_host": "10.43.0.12", "ansible_port": 22, "ansible_user": "ubuntu", "ansible_become": True,
        "ansible_connection": "amazon.aws.aws_ssm", "ansible_aws_ssm_region": "eu-central-1",
        "ansible_aws_ssm_bucket_name": "example-hybrid-ansible-ssm",
        "ansible_aws_ssm_instance_id": "i-0123456789abcdef0"}


def test_the_option_names_are_the_aws_ssm_plugins():
    """The vars the inventory sets are the ones amazon.aws's aws_ssm connection plugin reads (its DOCUMENTATION)."""
    from ansible_collections.amazon.aws.plugins.connection import aws_ssm

    options = yaml.safe_load(aws_ssm.DOCUMENTATION)["options"]
    reads = {v["name"]: option for option, spec in options.items() for v in spec.get("vars") or []}
    assert reads["ansible_aws_ssm_instance_id"] == "instance_id"
    assert reads["ansible_aws_ssm_region"] == "region" and reads["ansible_aws_ssm_bucket_name"] == "bucket_name"


def test_direct_access_checks_keys_strictly_and_on_prem_stays_as_it_was():
    config = copy.deepcopy(stack_config())
    _site(config, "use1-az-a")["access"] = {"known_hosts_file": "/etc/fleet/known_hosts"}
    hostvars = _hostvars(config)
    assert hostvars["v3-use1a-0"]["ansible_ssh_common_args"] == (
        "-o UserKnownHostsFile=/etc/fleet/known_hosts -o StrictHostKeyChecking=yes")
    assert "fleet_ssh_bastion" not in hostvars["v3-use1a-0"]
    onprem = hostvars["dgx-h01"]
    assert onprem["ansible_user"] == "root" and "ansible_become" not in onprem
    assert "ansible_ssh_common_args" not in onprem and "ansible_connection" not in onprem


def test_a_known_hosts_path_ssh_would_split_is_refused():
    """ssh reads UserKnownHostsFile's value as a list of files separated by whitespace."""
    config = copy.deepcopy(stack_config())
    _site(config, "use1-az-a")["access"]["known_hosts_file"] = "/etc/fleet/known hosts"
    ((field, value, _),) = _problems(config)
    assert (field, value) == ("config.fleet:sites[0].access.known_hosts_file", "/etc/fleet/known hosts")
    with pytest.raises(ValueError, match="without whitespace"):
        ssh_common_args("/etc/fleet/known hosts", None)


@pytest.mark.parametrize("known_hosts", ["~/.ssh/known_hosts", "/srv/fleet-ssh/known_hosts", "/x/a&b;c$(x)"])
@pytest.mark.parametrize("identity", [None, "~/.ssh/id_ed25519", "/keys/my key", "/k/it's \"here\""])
def test_the_args_survive_ansibles_split_and_the_proxy_command_the_shell(known_hosts, identity):
    bastion = {"host": "bastion.example.com", "port": 2222, "user": "jump"}
    args = ssh_common_args(known_hosts, bastion, identity)
    words = ConnectionBase._split_ssh_args(args)  # what Ansible's ssh plugin does with ansible_ssh_common_args
    assert words[:4] == ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    assert words[4] == "-o" and words[5] == f"ProxyCommand={proxy_command(bastion, known_hosts, identity)}"
    assert len(words) == 6
    # ssh runs the ProxyCommand with /bin/sh -c "exec ...": the words its ssh gets
    inner = shlex.split(words[5].removeprefix("ProxyCommand="))
    expected = ["ssh", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                *(["-i", identity] if identity else []), "-W", "%h:%p", "-p", "2222", "jump@bastion.example.com"]
    assert inner == expected


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_openssh_reads_the_args_as_meant(tmp_path):
    """`ssh -G` prints the configuration a connection would use, without connecting."""
    known = tmp_path / "known_hosts"
    args = ConnectionBase._split_ssh_args(ssh_common_args(str(known), BASTION, "/keys/my key"))
    out = subprocess.run(["ssh", "-G", "-F", "/dev/null", *args, "ubuntu@10.42.3.17"], capture_output=True,
                         text=True, check=True).stdout
    config = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert config["stricthostkeychecking"] in ("true", "yes")
    assert config["userknownhostsfile"] == str(known)
    assert config["proxycommand"] == (f"ssh -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes "
                                      "-i '/keys/my key' -W %h:%p -p 22 ubuntu@203.0.113.10")


# --- host keys from the console --------------------------------------------------------------------------------


def _console_keys() -> list[str]:
    return host_keys_from_console(CONSOLE)


def test_the_keys_cloud_init_prints_are_read_and_match_its_fingerprints():
    keys = _console_keys()
    assert [k.split()[0] for k in keys] == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    assert all(len(k.split()) == 2 for k in keys)  # "type base64": the comment root@ip-... dropped
    printed = [line.split()[5] for line in CONSOLE.splitlines() if "cloud-init: " in line and "SHA256:" in line]
    assert len(printed) == 3
    assert [fingerprint(k.split()[1]) for k in keys] == printed


@pytest.mark.parametrize("prefix", ["", "ec2: ", "[   21.951208] cloud-init[778]: ", "<14>Dec  7 10:00:00 ec2: ",
                                    "Mar 18 09:12:37 ip-10-42-3-17 cloud-init[1215]: "])
def test_whatever_precedes_a_marker_or_a_key_is_dropped(prefix):
    lines = CONSOLE.replace("\r\n", "\n").splitlines()
    start = lines.index("-----BEGIN SSH HOST KEY KEYS-----")
    prefixed = [prefix + line if start <= i <= start + 4 else line for i, line in enumerate(lines)]
    assert host_keys_from_console("\n".join(prefixed)) == _console_keys()


def test_the_last_complete_block_counts_and_an_unfinished_one_is_nothing_yet():
    keys_block = CONSOLE[CONSOLE.index("-----BEGIN SSH HOST KEY KEYS"):CONSOLE.index("[   21.951208]")]
    assert host_keys_from_console(CONSOLE[:CONSOLE.index("-----END SSH HOST KEY KEYS")]) == []
    assert host_keys_from_console("") == [] and host_keys_from_console("no markers\n") == []
    other = mock_host_key("rebuilt")
    later = f"-----BEGIN SSH HOST KEY KEYS-----\n{other} root@x\n-----END SSH HOST KEY KEYS-----\n"
    # a later block (without fingerprints of its own) is the one that counts, checked against the last fingerprints
    with pytest.raises(ValueError, match="matches none of the fingerprints"):
        host_keys_from_console(CONSOLE + later)
    unfinished = "-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA"
    assert host_keys_from_console(keys_block + unfinished) == _console_keys()


def test_a_key_that_matches_no_printed_fingerprint_is_refused_naming_it():
    ed25519 = _console_keys()[1]
    forged = mock_host_key("mallory")
    with pytest.raises(ValueError) as info:
        host_keys_from_console(CONSOLE.replace(ed25519, forged))
    assert f"ssh-ed25519 {fingerprint(forged.split()[1])}" in str(info.value)


def test_without_fingerprints_the_keys_are_taken_and_noise_is_skipped():
    keys = _console_keys()
    text = ("-----BEGIN SSH HOST KEY KEYS-----\r\n"
            f"{keys[0]} root@h\r\n[   22.1] random: crng init done\r\nssh-dss AAAAB3NzaC1kc3M root@h\r\n"
            f"{keys[1]} root@h\r\n{keys[1]} root@h\r\n-----END SSH HOST KEY KEYS-----\r\n")
    assert host_keys_from_console(text) == keys[:2]  # dss skipped, the repeated line once


def test_a_malformed_key_line_is_an_error_not_a_key():
    with pytest.raises(ValueError, match="console host key line 'ssh-ed25519 AAAAC3Nz': "):
        host_keys_from_console("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAAC3Nz\n"
                               "-----END SSH HOST KEY KEYS-----\n")


def test_old_md5_fingerprints_are_checked_too():
    key = _console_keys()[1]
    import base64
    import hashlib

    md5 = hashlib.md5(base64.b64decode(key.split()[1])).hexdigest()
    hexfp = ":".join(md5[i:i + 2] for i in range(0, 32, 2))
    text = (f"ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----\nec2: 256 {hexfp}  root@h (ED25519)\n"
            f"ec2: -----END SSH HOST KEY FINGERPRINTS-----\n-----BEGIN SSH HOST KEY KEYS-----\n{key} root@h\n"
            "-----END SSH HOST KEY KEYS-----\n")
    assert host_keys_from_console(text) == [key]
    with pytest.raises(ValueError):
        host_keys_from_console(text.replace(key, mock_host_key("other")))


# --- known_hosts -----------------------------------------------------------------------------------------------


def test_known_hosts_lines_for_hosts_and_each_bastion_once():
    a, b = mock_host_key("a"), mock_host_key("b")
    hostvars = {
        "h1": {"ansible_host": "10.42.3.17", "fleet_ssh_host_keys": [a + " root@h1"], "fleet_ssh_bastion": BASTION},
        "h2": {"ansible_host": "10.42.3.18", "ansible_port": 2222, "fleet_ssh_host_keys": [b],
               "fleet_ssh_bastion": BASTION},
        "h3": {"fleet_ssh_host_keys": [a]},                    # no ansible_host: Ansible connects to the name
        "onprem": {"ansible_host": "10.64.1.11"},
    }
    assert known_hosts_lines(hostvars) == sorted([
        f"10.42.3.17 {a}", f"[10.42.3.18]:2222 {b}", f"h3 {a}", f"203.0.113.10 {ED25519}"])
    assert known_hosts_lines({}) == []


@pytest.mark.parametrize(("hv", "var"), [
    ({"ansible_host": "10.0.0.1", "fleet_ssh_host_keys": "ssh-ed25519 AAAA"}, "fleet_ssh_host_keys"),
    ({"ansible_host": "10.0.0.1", "fleet_ssh_host_keys": ["ssh-ed25519 AAAA!"]}, "fleet_ssh_host_keys[0]"),
    ({"ansible_host": "10.0.0.1 evil", "fleet_ssh_host_keys": [ED25519]}, "ansible_host"),
    ({"ansible_host": "10.0.0.1", "ansible_port": "22x", "fleet_ssh_host_keys": [ED25519]}, "ansible_port"),
    ({"fleet_ssh_bastion": "203.0.113.10"}, "fleet_ssh_bastion"),
    ({"fleet_ssh_bastion": dict(BASTION, host_keys=[])}, "fleet_ssh_bastion.host_keys"),
    ({"fleet_ssh_bastion": dict(BASTION, port=0)}, "fleet_ssh_bastion.port"),
])
def test_a_malformed_var_names_the_host_and_the_var(hv, var):
    with pytest.raises(HostVarError) as info:
        known_hosts_lines({"v3-use1a-0": hv})
    assert (info.value.host, info.value.var) == ("v3-use1a-0", var)


def test_merge_replaces_the_same_hosts_and_keeps_the_rest(tmp_path):
    old, new = mock_host_key("old"), mock_host_key("new")
    path = tmp_path / "known_hosts"
    path.write_text(
        "# operator's notes\n"
        f"10.42.3.17 {old}\n"
        f"10.42.3.17 ssh-rsa AAAAB3NzaC1yc2E\n"             # another key type of the same host: stale too
        f"10.42.3.17,web.example.com {old}\n"                # a shared line keeps its other name
        f"web2.example.com {old}\n"
        f"@cert-authority *.example.com {old}\n")
    merge_known_hosts(path, [f"10.42.3.17 {new}", f"[10.42.3.18]:2222 {new}"])
    assert path.read_text() == (
        "# operator's notes\n"
        f"web.example.com {old}\n"
        f"web2.example.com {old}\n"
        f"@cert-authority *.example.com {old}\n"
        f"10.42.3.17 {new}\n"
        f"[10.42.3.18]:2222 {new}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["known_hosts"]  # no temporary file left behind


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no OpenSSH")
def test_merge_replaces_hashed_entries_and_openssh_finds_the_keys(tmp_path):
    old, new = mock_host_key("old"), _console_keys()[1]
    path = tmp_path / "known_hosts"
    path.write_text(f"10.42.3.17 {old}\nkeep.example.com {old}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(path)], check=True, capture_output=True)  # HashKnownHosts
    merge_known_hosts(path, [f"10.42.3.17 {new}"])
    found = subprocess.run(["ssh-keygen", "-F", "10.42.3.17", "-f", str(path)], capture_output=True, text=True)
    assert new.split()[1] in found.stdout and old.split()[1] not in found.stdout
    kept = subprocess.run(["ssh-keygen", "-F", "keep.example.com", "-f", str(path)], capture_output=True, text=True)
    assert old.split()[1] in kept.stdout


def test_merge_creates_private_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "known_hosts"
    merge_known_hosts(path, [f"10.0.0.1 {ED25519}"])
    assert path.read_text() == f"10.0.0.1 {ED25519}\n"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
