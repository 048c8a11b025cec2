"""The lab as the rest of the project sees it (issue: the lab's 'Done when').

Ansible reaches every host, the simulated tools print the real formats and parse with the host
checks' parsers, the UPS/BMC/LB services answer, faults show and clear, a reboot really reboots.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from base64 import b64encode

import ansible_runner
import pytest
import yaml

from patching.hosts import facts as hostfacts
from tests.integration.conftest import lab_release


def _secrets(lab) -> dict:
    return yaml.safe_load((lab.inventory / "group_vars/all/secrets.yml").read_text())


def _controller_secrets(lab) -> dict:
    return json.loads((lab.lab.layout.root / "secrets.json").read_text())


def _haproxy(lab, command: str) -> str:
    with socket.create_connection(("127.0.0.1", lab.lab.ports.haproxy_api), timeout=5) as s:
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def _server_state(lab, backend: str, server: str) -> tuple[str, str]:
    """(operational state, admin state) from `show servers state`."""
    for line in _haproxy(lab, f"show servers state {backend}").splitlines()[2:]:
        fields = line.split()
        if len(fields) > 6 and fields[3] == server:
            return fields[5], fields[6]
    raise AssertionError(f"{backend}/{server} not in HAProxy's server state")


def test_ansible_ping_and_setup_reach_every_host(lab, tmp_path):
    for module in ("ping", "setup"):
        (tmp_path / module).mkdir()
        run = ansible_runner.run(private_data_dir=str(tmp_path / module), inventory=str(lab.inventory),
                                 host_pattern="all", module=module, quiet=True)
        assert run.status == "successful", f"{module}: {run.stats}"
        assert set(run.stats["ok"]) == set(lab.hosts)
    facts = {}
    for event in run.events:
        if event["event"] == "runner_on_ok":
            facts[event["event_data"]["host"]] = event["event_data"]["res"]["ansible_facts"]
    assert {f["ansible_distribution"] for f in facts.values()} == {"Debian"}
    assert {f["ansible_virtualization_role"] for f in facts.values()} == {"guest"}
    assert facts["dgx-a1"]["ansible_hostname"] == "dgx-a1"


def test_upsc_reads_each_ups(lab):
    port = lab.lab.ports.upsd
    for ups in ("ups-a", "ups-b"):
        out = subprocess.run(["upsc", f"{ups}@127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
        status = hostfacts.parse_upsc(out)
        assert status.status == ("OL",) and int(status.variables["battery.charge"]) == 100


def test_redfish_lists_one_system_per_bare_metal_host(lab):
    url = f"http://127.0.0.1:{lab.lab.ports.redfish}/redfish/v1/Systems"
    assert "fleet_bmc_password" not in _secrets(lab), "the BMC password is the controller's, not a host var"
    auth = b64encode(f"admin:{_controller_secrets(lab)['bmc']}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    members = json.load(urllib.request.urlopen(req, timeout=10))["Members"]
    assert sorted(m["@odata.id"].rsplit("/", 1)[1] for m in members) == ["dgx-a1", "dgx-a2"]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(url, timeout=10)
    assert denied.value.code == 401


def test_haproxy_drains_and_enables_a_server(lab):
    assert _haproxy(lab, "set server v3-hall/dgx-a2 state drain").strip() == ""
    assert _server_state(lab, "v3-hall", "dgx-a2")[1] == "8"  # SRV_ADMF_DRAIN
    assert _haproxy(lab, "set server v3-hall/dgx-a2 state ready").strip() == ""
    assert _server_state(lab, "v3-hall", "dgx-a2")[1] == "0"


def test_ups_on_battery_fault(lab, clean_faults):
    port = lab.lab.ports.upsd
    lab.fault("ups-b", "ups-on-battery")
    status = _wait_ups(port, "ups-b", lambda s: "OB" in s.status)
    assert "OB" in status.status and int(status.variables["battery.charge"]) < 100
    lab.fault("ups-b", "ups-on-battery", clear=True)
    assert _wait_ups(port, "ups-b", lambda s: s.status == ("OL",)).status == ("OL",)


def _wait_ups(port, ups, done, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["upsc", f"{ups}@127.0.0.1:{port}"], capture_output=True, text=True).stdout
        status = hostfacts.parse_upsc(out)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def test_host_down_fault_stops_the_container(lab, clean_faults):
    lab.fault("v3-aws-1", "host-down")
    assert lab.lab.host_status("v3-aws-1")["state"] == "down"
    assert lab.ssh("v3-aws-1", "true", check=False).returncode == 255
    lab.fault("v3-aws-1", "host-down", clear=True)
    assert lab.ssh("v3-aws-1", "hostname").stdout.strip() == "v3-aws-1"


def test_ssh_hang_fault(lab, clean_faults):
    lab.fault("r1-outpost-0", "ssh-hang")
    started = time.monotonic()
    try:  # the TCP handshake completes (kernel backlog) but no SSH banner ever comes
        failed = subprocess.run([*lab.ssh_argv("r1-outpost-0", timeout=3), "true"], capture_output=True,
                                timeout=15).returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    assert failed and time.monotonic() - started >= 2.5
    lab.fault("r1-outpost-0", "ssh-hang", clear=True)
    assert lab.ssh("r1-outpost-0", "true", timeout=30).returncode == 0


# --- simulated hardware and vendor tools ------------------------------------------------------------

QUERY = "index,name,driver_version,memory.total,persistence_mode,ecc.errors.uncorrected.volatile.total,ecc.mode.current"
APT = "-o Dir::Etc::sourcelist=/etc/apt/sources.list.d/fleet-lab.list -o Dir::Etc::sourceparts=-"


def _install(lab, host: str, packages: dict[str, str]) -> None:
    """What an operator would do by hand: add the signed repo and install exact versions."""
    inv = yaml.safe_load((lab.inventory / "hosts.yml").read_text())["all"]["vars"]
    pins = " ".join(f"{name}={version}" for name, version in packages.items())
    lab.ssh(host, " && ".join([
        f"curl -fsS {inv['fleet_apt_repo_keyring_url']} -o /usr/share/keyrings/fleet-lab-archive-keyring.gpg",
        "echo 'deb [signed-by=/usr/share/keyrings/fleet-lab-archive-keyring.gpg] "
        f"{inv['fleet_apt_repo_url']} /' > /etc/apt/sources.list.d/fleet-lab.list",
        f"apt-get {APT} update -qq",
        f"DEBIAN_FRONTEND=noninteractive apt-get {APT} install -y -qq --allow-downgrades {pins} >/dev/null",
    ]), timeout=300)


def _bundle_packages(lab, host: str, release: str) -> dict[str, str]:
    from infra.model.inventory import host_vars
    from patching.release.bundle import load_bundle

    bundle = load_bundle(lab_release(release))
    hv = host_vars(lab.lab.fleet, lab.lab.fleet.hosts[host])
    pkgs = bundle.packages(nvswitch=hv["fleet_nvswitch"], ib=hv["fleet_ib"])
    return pkgs  # EFA's packages: the installer's record (tests/hosts/test_fabric.py); the server: an image


def _install_efa(lab, host: str, release: str) -> None:
    """What AWS documents for an EFA host: fetch the installer tarball, check it, extract it, run it."""
    from lab import efa_installer
    from patching.release.bundle import load_bundle

    bundle = load_bundle(lab_release(release))
    hv = yaml.safe_load((lab.inventory / "hosts.yml").read_text())["all"]["hosts"][host]
    url = f"{hv['fleet_artifacts_url']}/{efa_installer.artifact_path(bundle.efa_installer)}"
    lab.ssh(host, " && ".join([
        "d=$(mktemp -d)", 'cd "$d"', f"curl -fsS {url} -o efa.tar.gz",
        f"echo '{bundle.efa_installer_sha256}  efa.tar.gz' | sha256sum -c --quiet", "tar xzf efa.tar.gz",
        "cd aws-efa-installer", "./efa_installer.sh -y >/dev/null", 'rm -rf "$d"',
    ]), timeout=300)


@pytest.fixture(scope="module")
def tooled(lab):
    """The October bundle's vendor packages on every lab host, and its EFA installer on the EFA hosts."""
    from concurrent.futures import ThreadPoolExecutor

    def tool(host: str) -> None:
        _install(lab, host, _bundle_packages(lab, host, "2026-10"))
        if yaml.safe_load((lab.inventory / "hosts.yml").read_text())["all"]["hosts"][host]["fleet_efa"]:
            _install_efa(lab, host, "2026-10")

    with ThreadPoolExecutor(len(lab.hosts)) as pool:
        list(pool.map(tool, lab.hosts))
    yield lab
    # the by-hand repository entry goes again: the vendor_repo role adds its own (one source, one Signed-By)
    for host in lab.hosts:
        lab.ssh(host, "rm -f /etc/apt/sources.list.d/fleet-lab.list /usr/share/keyrings/fleet-lab-archive-keyring.gpg")


def test_tools_print_real_formats_that_the_checks_parse(tooled):
    lab = tooled
    for host in lab.hosts:
        hv = yaml.safe_load((lab.inventory / "hosts.yml").read_text())["all"]["hosts"][host]
        gpus = hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(
            lab.ssh(host, f"nvidia-smi --query-gpu={QUERY} --format=csv").stdout))
        assert len(gpus) == hv["fleet_gpu_count"], host
        assert {g.driver_version for g in gpus} == {"580.82.07"}
        assert {g.memory_total_mib for g in gpus} == {hv["fleet_gpu_memory_mib"]}
        assert all(g.persistence_mode and g.ecc_mode_current and g.ecc_uncorrected_volatile == 0 for g in gpus)
        q = hostfacts.parse_smi_query(lab.ssh(host, "nvidia-smi -q").stdout)
        assert (q.driver_version, q.cuda_version) == ("580.82.07", "13.0")
        nvcc = hostfacts.parse_nvcc_version(lab.ssh(host, "/usr/local/cuda/bin/nvcc --version").stdout)
        assert nvcc.release == "13.0"
        if hv["fleet_ib"]:
            cas = hostfacts.parse_ibstat(lab.ssh(host, "ibstat").stdout)
            assert [c.name for c in cas] == [h["name"] for h in hv["fleet_ib_hcas"]]
            assert {(p.state, p.physical_state, p.rate) for c in cas for p in c.ports} == {("Active", "LinkUp", 200)}
        if hv["fleet_efa"]:
            out = lab.ssh(host, "/opt/amazon/efa/bin/fi_info -p efa -t FI_EP_RDM").stdout
            assert hostfacts.efa_device_count(hostfacts.parse_fi_info(out)) == 4
        if hv["fleet_nvswitch"]:
            topo = hostfacts.parse_topo_matrix(lab.ssh(host, "nvidia-smi topo -m").stdout)
            gpu_pairs = {v for (a, b), v in topo.items() if a != b and a.startswith("GPU") and b.startswith("GPU")}
            assert gpu_pairs == {"NV12"}


def test_gpu_faults_show_and_clear(tooled, clean_faults):
    lab = tooled
    csv = f"nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits"

    def gpus():
        return hostfacts.gpus_from_csv(hostfacts.parse_smi_csv(lab.ssh("dgx-a2", csv).stdout, QUERY.split(",")))

    lab.fault("dgx-a2", "gpu-missing")
    assert len(gpus()) == 7
    lab.fault("dgx-a2", "gpu-missing", clear=True)
    lab.fault("dgx-a2", "ecc-errors")
    assert gpus()[0].ecc_uncorrected_volatile > 0
    lab.fault("dgx-a2", "ecc-errors", clear=True)
    assert len(gpus()) == 8 and all(g.ecc_uncorrected_volatile == 0 for g in gpus())
    lab.fault("dgx-a2", "ib-port-down")
    port = hostfacts.parse_ibstat(lab.ssh("dgx-a2", "ibstat").stdout)[0].ports[0]
    assert (port.state, port.physical_state) == ("Down", "Disabled")
    lab.fault("dgx-a2", "ib-port-down", clear=True)
    port = hostfacts.parse_ibstat(lab.ssh("dgx-a2", "ibstat").stdout)[0].ports[0]
    assert (port.state, port.physical_state) == ("Active", "LinkUp")


def _reboot(lab, host: str) -> None:
    boots = lab.lab.host_status(host)["boots"]
    lab.ssh(host, "systemctl reboot", check=False)
    deadline = time.monotonic() + 120
    while lab.lab.host_status(host).get("boots") == boots and time.monotonic() < deadline:
        time.sleep(0.3)
    assert lab.lab.host_status(host)["boots"] == boots + 1, f"{host} did not reboot"
    lab.lab.wait_hosts([host], 120, log=lambda _: None)


DRIVER_PACKAGES = ("cuda-drivers", "nvidia-fabricmanager", "libnvidia-nscq")


def test_driver_upgrade_gives_nvml_mismatch_until_reboot(tooled):
    lab, host = tooled, "dgx-a1"
    smi = "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
    nov = _bundle_packages(lab, host, "2026-11")
    _install(lab, host, {k: v for k, v in nov.items() if k.startswith(DRIVER_PACKAGES)})
    out = lab.ssh(host, smi, check=False)
    failure = hostfacts.nvml_failure(out.stdout + out.stderr)
    assert out.returncode == 18 and failure is not None and failure.kind == "mismatch"
    _reboot(lab, host)
    assert lab.ssh(host, smi).stdout.split() == ["580.95.05"] * 8
    # back to the October bundle for the tests that follow
    oct_ = _bundle_packages(lab, host, "2026-10")
    _install(lab, host, {k: v for k, v in oct_.items() if k.startswith(DRIVER_PACKAGES)})
    _reboot(lab, host)
    assert lab.ssh(host, smi).stdout.split() == ["580.82.07"] * 8
