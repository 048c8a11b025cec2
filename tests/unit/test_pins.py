"""What a bundle pins per kind of host, dpkg's answers, and drift's reading of them."""

from pathlib import Path

import pytest

from patching.hosts.drift import EFA_SEPARATOR, SEPARATOR, differences, ssh_settings
from patching.release.bundle import load_bundle
from patching.release.pins import all_pinned_packages, host_pins, parse_dpkg_query, unpinned_family_members

ROOT = Path(__file__).resolve().parents[2]
DGX = {"fleet_nvswitch": True, "fleet_ib": True, "fleet_efa": False}
P4D = {"fleet_nvswitch": True, "fleet_ib": False, "fleet_efa": True}
T4 = {"fleet_nvswitch": False, "fleet_ib": False, "fleet_efa": False}


@pytest.fixture
def bundle():
    return load_bundle(ROOT / "releases/2026-10.yaml")


def test_pins_follow_the_hardware(bundle):
    assert host_pins(bundle, DGX)["mlnx-ofed-basic"] == "24.10-2.1.8.0"
    assert host_pins(bundle, DGX)["nvidia-fabricmanager"] == "580.82.07-1"
    # EFA is an installer, not a package: its packages come from the installer's record (test_efa_installer.py)
    assert not [p for p in host_pins(bundle, P4D) if "efa" in p]
    assert set(host_pins(bundle, T4)) == {"cuda-drivers-580", "cuda-toolkit-13-0", "libnccl2",
                                          "nvidia-container-toolkit", "nvidia-container-toolkit-base",
                                          "libnvidia-container-tools", "libnvidia-container1"}
    assert set(all_pinned_packages(bundle)) == set(host_pins(bundle, DGX)) | set(host_pins(bundle, P4D))


DPKG = (
    "cuda-drivers-580\t580.82.07-1\thold ok installed\n"
    "cuda-drivers-570\t570.172.08-1\tinstall ok installed\n"
    "cuda-toolkit-13-0\t13.0.1-1\thold ok installed\n"
    "cuda-toolkit-13-config-common\t13.0.85-1\tinstall ok installed\n"
    "libnccl2\t2.28.3-1+cuda13.0\tinstall ok installed\n"
    "nvidia-fabricmanager-570\t570.172.08-1\tdeinstall ok config-files\n"
    "libnvidia-nscq-580\t\tunknown ok not-installed\n"
)


def test_dpkg_answers_installed_versions_and_holds():
    found = parse_dpkg_query(DPKG)
    assert found["cuda-drivers-580"].held and found["cuda-drivers-580"].version == "580.82.07-1"
    assert not found["libnccl2"].held
    assert "nvidia-fabricmanager-570" not in found and "libnvidia-nscq-580" not in found


def test_other_members_of_a_pinned_family_are_drift_but_their_helpers_are_not(bundle):
    installed = parse_dpkg_query(DPKG)
    assert unpinned_family_members(installed, host_pins(bundle, T4)) == ["cuda-drivers-570"]


def test_drift_names_each_difference(bundle):
    manifest = '{"release": "2026-09", "components": {}}'
    found = differences("h1", bundle, T4, DPKG + SEPARATOR + "\n" + manifest)
    rows = {(d.item, d.expected, d.found) for d in found}
    assert ("libnccl2 hold", "held", "not held") in rows
    assert ("nvidia-container-toolkit", "1.17.8-1", "not installed") in rows
    assert ("cuda-drivers-570", "not installed (the bundle pins another)", "570.172.08-1") in rows
    assert ("/etc/fleet/bundle.json release", "2026-10", "2026-09") in rows
    assert all(d.host == "h1" for d in found)


def test_a_host_that_matches_has_no_drift(bundle):
    pins = host_pins(bundle, P4D)
    dpkg = "".join(f"{name}\t{version}\thold ok installed\n" for name, version in pins.items())
    efa = (f"{EFA_SEPARATOR}\n# EFA installer version: {bundle.efa_installer}\n# Debug packages installed: no\n"
           "# Packages installed:\nlibfabric1-aws_2.1.0amzn5.0_amd64 efa_2.17.2-1_amd64\n"
           "----- efa packages -----\nlibfabric1-aws\t2.1.0amzn5.0\thold ok installed\n"
           "efa\t2.17.2-1\thold ok installed\n")
    assert differences("h", bundle, P4D, dpkg + SEPARATOR + '{"release": "2026-10"}' + efa) == []
    assert [d.found for d in differences("h", bundle, P4D, dpkg + SEPARATOR + efa)] == ["no manifest"]
    assert [(d.item, d.found) for d in differences("h", bundle, P4D, dpkg + SEPARATOR + '{"release": "2026-10"}')] \
        == [("EFA installer (/opt/amazon/efa_installed_packages)", "no record (no /opt/amazon/efa_installed_packages)")]


def test_ssh_settings_come_from_the_inventory_vars():
    hv = {"ansible_host": "127.0.0.1", "ansible_port": 43001, "ansible_user": "root",
          "ansible_ssh_private_key_file": "/lab/ssh/id_ed25519",
          "ansible_ssh_common_args": "-o UserKnownHostsFile=/lab/ssh/known_hosts -o StrictHostKeyChecking=yes "
                                     "-o ControlMaster=auto -o ConnectTimeout=7"}
    s = ssh_settings("dgx-a1", hv)
    assert (s.host, s.port, s.user, s.key_file) == ("127.0.0.1", 43001, "root", "/lab/ssh/id_ed25519")
    assert (s.known_hosts, s.strict, s.connect_timeout) == ("/lab/ssh/known_hosts", True, 7)
    relaxed = ssh_settings("h", {"ansible_ssh_common_args": "-oStrictHostKeyChecking=no"})
    assert (relaxed.host, relaxed.port, relaxed.strict) == ("h", 22, False)


def test_package_names_reach_the_shell_quoted():
    from patching.release.pins import dpkg_query_command

    command = dpkg_query_command(["nvidia-driver-580", "x'; rm -rf / #"])
    assert " nvidia-driver-580 " in command and "rm -rf" in command
    import shlex

    words = shlex.split(command.split(" 2>/dev/null")[0])
    assert words[-1] == "x'; rm -rf / #"  # one argument, not a command
