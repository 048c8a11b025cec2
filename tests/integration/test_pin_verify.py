"""Pin and verify in the lab (issue 4's "Done when"): converge every host to a bundle, converge again
and change nothing, verify and find no drift; then break hosts on purpose and see the checks and drift
name what broke; and a bundle with wrong weights fails before the running server is touched.

The tests run in file order on the session's lab: the first converges it, the others start from there
and leave it converged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from infra.model.access import host_keys_from_console
from patching.inventory.reader import load_inventory
from patching.release.bundle import load_bundle
from tests.integration.conftest import LAB_RELEASES, ansible_failures

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
RELEASE = LAB_RELEASES / "2026-10.yaml"
NEXT = LAB_RELEASES / "2026-11.yaml"
BIN = Path(sys.executable).parent
FLEET = [sys.executable, "-c", "import sys; from patching.cli.app import main; sys.argv[0] = 'fleet'; main()"]


def fleet(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run([*FLEET, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(f"$ fleet {' '.join(args)}  -> exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def failed_checks(junit: Path) -> dict[tuple[str, str], str]:
    """(host, check) -> message of every failed check in a `fleet verify` JUnit report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        if failure is None:
            continue
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out[(props["host"], props["check"])] = failure.get("message", "").removeprefix("Failed: ")
    return out


FIRST_CONVERGE: dict[str, str] = {}  # what the module's first converge printed


def task_results(stdout: str, task: str) -> list[str]:
    """The result lines (ok/changed/skipping/fatal) of every run of `task` in ansible-playbook's default output."""
    out, inside = [], False
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [", "PLAY ")):
            inside = line.startswith(f"TASK [{task}]")
        elif inside and line.startswith(("ok: ", "changed: ", "skipping: ", "fatal: ")):
            out.append(line.split(" =>")[0])
    return out


@pytest.fixture(scope="module")
def converged(lab):
    """The lab converged to 2026-10 the way users do it: plain ansible-playbook, repository ansible.cfg."""
    started = time.monotonic()
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(lab.inventory), "playbooks/site.yml",
                           "-e", f"bundle_file={LAB_RELEASES}/2026-10.yaml"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={"PATH": f"{BIN}:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root"})
    print(f"first converge: {time.monotonic() - started:.0f}s\n{ansible_failures(proc.stdout)}\n"
          f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    assert proc.returncode == 0, "site.yml did not converge the lab (output above)"
    FIRST_CONVERGE["stdout"] = proc.stdout
    return lab


@pytest.fixture(scope="module")
def hostvars(converged):
    fleet = load_inventory([str(converged.inventory)])
    return {name: fleet.vars[name] for name in converged.hosts}


def test_second_converge_changes_nothing(converged, tmp_path):
    report = tmp_path / "recap.json"
    proc = fleet("converge", "--release", str(RELEASE), "--inventory", str(converged.inventory),
                 "--report", str(report))
    assert proc.returncode == 0
    recap = json.loads(report.read_text())["hosts"]
    assert sorted(recap) == converged.hosts
    changed = {h: r["changed_tasks"] for h, r in recap.items() if r["changed"]}
    assert not changed, f"a second converge changed tasks (not idempotent): {changed}"
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values())


@pytest.mark.parametrize("task", ["model_serving : Fetch the model weights and check their sha256",
                                  "model_serving : Look for the bundle's image in local storage"])
def test_weights_and_image_are_staged_once_per_host(converged, task):
    """site.yml stages the weights and the image before anything changes; the role's main tasks, later in the
    same run, do not fetch and pull again."""
    results = task_results(FIRST_CONVERGE["stdout"], task)
    ran = sorted(r.split("[", 1)[1].rstrip("]") for r in results if not r.startswith("skipping"))
    assert ran == converged.hosts, results
    assert len([r for r in results if r.startswith("skipping")]) == len(converged.hosts), results


def test_upsmon_stops_at_once_as_on_a_real_host(converged):
    """The lab's systemd cannot kill a unit's cgroup (lab/hosts.py): upsmon's child outlived its stop until the
    stop timeout killed it, 10 s on every lab reboot. Stopped now as a real host's systemd stops it: every process
    of the unit gets SIGTERM, and the stop succeeds rather than timing out."""
    host = "dgx-a2"
    try:
        converged.ssh(host, "systemctl stop nut-monitor")
        assert converged.ssh(host, "systemctl show -p Result --value nut-monitor").stdout.strip() == "success"
        assert converged.ssh(host, "pgrep -x upsmon", check=False).returncode == 1  # none left
    finally:
        converged.ssh(host, "systemctl start nut-monitor", check=False)
    assert converged.ssh(host, "systemctl is-active nut-monitor").stdout.strip() == "active"


def test_verify_passes(converged, tmp_path):
    junit = tmp_path / "verify.xml"
    proc = fleet("verify", "--release", str(RELEASE), "--inventory", str(converged.inventory), "--junit", str(junit))
    assert proc.returncode == 0
    assert failed_checks(junit) == {}
    hosts = {p.get("value") for p in ET.parse(junit).getroot().iter("property") if p.get("name") == "host"}
    assert hosts == set(converged.hosts)


def test_drift_finds_nothing(converged):
    proc = fleet("drift", "--release", str(RELEASE), "--inventory", str(converged.inventory), "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == []


def test_cloud_like_hosts_are_reached_through_the_bastion_as_their_default_user_only(converged):
    """Issue 15: the lab's EC2-like hosts (lab/cloud.py) were converged above, and are verified and read by drift
    above, the way the program's inventory reaches an instance: the AMI's default user with sudo, through the
    bastion, host keys learnt from the console output before the first connection."""
    cloud = [h for h in converged.hosts if converged.cloud(h)]
    assert cloud == ["v3-aws-0", "v3-aws-1"]
    known = converged.lab.layout.known_hosts.read_text().splitlines()
    for host in cloud:
        port = converged.lab.ports.hosts[host].ssh
        # the only way in is the bastion: a direct connection to the host's port is refused (the private subnet)
        proc = subprocess.run([*converged.ssh_argv(host, via_bastion=False), "true"], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 255 and "Connection refused" in proc.stderr, proc.stderr
        # root is refused by the host itself (cloud-init's disable_root), with the key that logs `ubuntu` in
        proc = subprocess.run([*converged.ssh_argv(host, user="root"), "id -u > /tmp/root-was-here"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 142, (proc.returncode, proc.stdout, proc.stderr)
        assert 'Please login as the user "ubuntu" rather than the user "root"' in proc.stdout
        assert converged.ssh(host, "test ! -e /tmp/root-was-here && echo absent").stdout.strip() == "absent"
        # the default user gets root through sudo, as Ansible's become does
        assert converged.ssh(host, "id -un").stdout.strip() == "root"
        # the keys the controller trusts are the ones cloud-init generated on the host and printed to its console
        on_host = {" ".join(line.split()[:2]) for line in converged.ssh(
            host, "cat /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_ed25519_key.pub "
                  "/etc/ssh/ssh_host_rsa_key.pub").stdout.splitlines()}
        trusted = {line.split(maxsplit=1)[1] for line in known if line.startswith(f"[127.0.0.1]:{port} ")}
        console = converged.lab.layout.host(host).console_log.read_text(errors="replace")
        assert trusted == on_host == set(host_keys_from_console(console))


def test_bad_input_exits_2_before_any_host_is_touched(converged, tmp_path):
    bad = yaml.safe_load(RELEASE.read_text())
    bad["fabric_manager"] = "580.95.05"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    inventory = str(converged.inventory)
    for args, names in [
        (["converge", "--release", str(tmp_path / "bad.yaml"), "--inventory", inventory], "fabric_manager"),
        (["verify", "--release", str(RELEASE), "--inventory", inventory, "--limit", "dgx-a9"], "dgx-a9"),
        (["drift", "--release", str(tmp_path / "missing.yaml"), "--inventory", inventory], "missing.yaml"),
    ]:
        started = time.monotonic()
        proc = fleet(*args)
        assert proc.returncode == 2, args
        assert names in proc.stderr
        assert time.monotonic() - started < 30  # refused up front, not after a run


def test_tampered_driver_is_named_by_drift_and_verify(converged, tmp_path):
    host, inventory = "v3-aws-1", str(converged.inventory)
    converged.ssh(host, "apt-mark unhold cuda-drivers-580 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                        "--allow-downgrades --allow-change-held-packages cuda-drivers-580=580.95.05-1")
    try:
        proc = fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--json")
        assert proc.returncode == 1
        assert {(d["host"], d["item"], d["expected"], d["found"]) for d in json.loads(proc.stdout)} == {
            (host, "cuda-drivers-580", "580.82.07-1", "580.95.05-1"),
            (host, "cuda-drivers-580 hold", "held", "not held"),
        }
        junit = tmp_path / "verify.xml"
        proc = fleet("verify", "--release", str(RELEASE), "--inventory", inventory, "--junit", str(junit))
        assert proc.returncode == 1
        failed = failed_checks(junit)
        assert {h for h, _ in failed} == {host}
        assert failed[(host, "pinned_version[cuda-drivers-580]")] == \
            f"{host}: cuda-drivers-580: expected 580.82.07-1, found 580.95.05-1"
        assert failed[(host, "pinned_held[cuda-drivers-580]")] == \
            f"{host}: cuda-drivers-580 hold: expected held (dpkg --set-selections hold), found not held"
        assert "Driver/library version mismatch" in failed[(host, "nvml_driver_version")]
    finally:
        assert fleet("converge", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0
    assert fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0


# A package whose configure step waits while /run/fleet-test-hold exists: dpkg is killed inside it.
CUT_SHORT = r"""
set -eu
d=$(mktemp -d) && mkdir -p "$d/p/DEBIAN"
cat > "$d/p/DEBIAN/control" <<EOF
Package: fleet-test-cut-short
Version: 1.0
Architecture: all
Maintainer: fleet tests <root@localhost>
Description: a package whose configure step the test cuts short
EOF
printf '#!/bin/sh\nwhile [ -e /run/fleet-test-hold ]; do sleep 0.2; done\n' > "$d/p/DEBIAN/postinst"
chmod 755 "$d/p/DEBIAN/postinst" && dpkg-deb --build "$d/p" "$d/p.deb" > /dev/null
touch /run/fleet-test-hold
dpkg -i "$d/p.deb" > /dev/null 2>&1 < /dev/null &
dpkg=$!
# dpkg marks the package half-configured (in its journal) before it runs the postinst
state() { dpkg-query -W -f='${db:Status-Status}' fleet-test-cut-short 2> /dev/null || true; }
for _ in $(seq 150); do [ "$(state)" = half-configured ] && break; sleep 0.2; done
[ "$(state)" = half-configured ]
kill -9 "$dpkg"
rm -rf /run/fleet-test-hold "$d"  # the orphaned postinst ends by itself
"""


def test_a_host_whose_dpkg_run_was_cut_short_converges(converged):
    """A host that lost power during an apt run (CI saw one: its rollback cut short by the host going down)
    keeps dpkg's journal of the run, and apt refuses every install until `dpkg --configure -a` finishes it.
    A converge finishes it first, then converges; a real dpkg is killed here inside a package's postinst."""
    host, inventory = "dgx-a2", str(converged.inventory)
    converged.ssh(host, CUT_SHORT)
    try:
        refused = converged.ssh(host, "apt-get -y install dpkg", check=False)
        assert refused.returncode == 100 and "dpkg was interrupted" in refused.stderr, refused.stderr
        assert fleet("converge", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0
        status = converged.ssh(host, "dpkg-query -W -f='${db:Status-Status}' fleet-test-cut-short").stdout
        assert status == "installed"  # its configure step ran to the end
        assert converged.ssh(host, "ls -A /var/lib/dpkg/updates").stdout.strip() == ""
    finally:
        converged.ssh(host, "rm -f /run/fleet-test-hold; dpkg --configure -a; dpkg --purge fleet-test-cut-short",
                      check=False)
    assert fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0


def test_a_container_running_another_digest_is_named_by_drift_and_verify(converged, tmp_path):
    """Someone ran the next release's image by hand under the unit: podman says so, and both digests are named."""
    host, inventory = "r1-outpost-0", str(converged.inventory)
    want = load_bundle(RELEASE).serving.image
    other = load_bundle(NEXT).serving.image
    old_digest, new_digest = want.rpartition("@")[2], other.rpartition("@")[2]
    assert old_digest != new_digest
    unit = "/etc/systemd/system/vllm-serving.service"
    converged.ssh(host, f"podman pull --quiet {other} && sed -i 's|{old_digest}|{new_digest}|' {unit} && "
                        "systemctl daemon-reload && systemctl restart vllm-serving", timeout=300)
    try:
        running = converged.ssh(host, "podman container inspect --format '{{.ImageDigest}}' vllm-serving").stdout
        assert running.strip() == new_digest  # the runtime itself reports the other image
        proc = fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--limit", host, "--json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert (host, "vllm-serving container image", old_digest, new_digest) in {
            (d["host"], d["item"], d["expected"], d["found"]) for d in json.loads(proc.stdout)}
        junit = tmp_path / "verify.xml"
        proc = fleet("verify", "--release", str(RELEASE), "--inventory", inventory, "--limit", host,
                     "--junit", str(junit))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        failed = failed_checks(junit)
        assert failed[(host, "serving_container_image")] == (
            f"{host}: vllm-serving container's image (podman inspect): expected {old_digest}, found {new_digest}")
    finally:
        assert fleet("converge", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0
    assert fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0


@pytest.mark.parametrize(("target", "kind", "host", "expected"), [
    ("dgx-a1", "ecc-errors", "dgx-a1", {
        "ecc_uncorrected_errors": "dgx-a1: uncorrected volatile ECC errors: expected 0 on every GPU, found GPU 0: 2",
    }),
    ("dgx-a2", "ib-port-down", "dgx-a2", {
        "ib_ports_active": "dgx-a2: InfiniBand ports: expected every HCA port Active/LinkUp, "
                           "found mlx5_0 port 1 Down/Disabled",
        "ib_port_rate": "dgx-a2: InfiniBand port rate: expected 200 Gb/s on every port (the inventory's "
                        "fleet_ib_hcas), found mlx5_0 port 1 rate 10",
    }),
    ("ups-b", "ups-on-battery", "dgx-a1", {
        "ups_on_line": "dgx-a1: UPS status: expected OL (on line power) on every unit, found ups-b: OB DISCHRG",
        "ups_charge": "dgx-a1: UPS battery charge: expected >= 80% on every unit, found ups-b: 42%",
    }),
])
def test_fault_fails_the_matching_check(converged, clean_faults, tmp_path, target, kind, host, expected):
    converged.fault(target, kind)
    junit = tmp_path / "verify.xml"
    proc = fleet("verify", "--release", str(RELEASE), "--inventory", str(converged.inventory), "--limit", host,
                 "--junit", str(junit))
    assert proc.returncode == 1
    assert failed_checks(junit) == {(host, check): message for check, message in expected.items()}


def test_wrong_weights_fail_before_the_server_is_touched(converged, hostvars, tmp_path):
    """2026-11 (new driver too) with a wrong weights sha256: the host fails at staging, before its driver,
    packages or server change; the server it had keeps answering throughout."""
    host, inventory = "dgx-a2", str(converged.inventory)
    bundle = yaml.safe_load(NEXT.read_text())
    weights = next(m for m in bundle["models"] if m["name"] == hostvars[host]["fleet_model"])["weights"]
    weights["sha256"] = "deadbeef" * 8
    bad = tmp_path / "2026-11-bad-weights.yaml"
    bad.write_text(yaml.safe_dump(bundle, sort_keys=False))
    url = f"http://127.0.0.1:{hostvars[host]['fleet_serving_port']}"
    state = "systemctl show -p MainPID --value vllm-serving; cat /proc/sys/kernel/random/boot_id"
    before = converged.ssh(host, state).stdout

    errors: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the server must keep answering, with the weights it had, while converge runs
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                    served.append(json.load(response)["data"][0]["root"])  # the weights path it loaded
            except OSError as exc:
                errors.append(str(exc))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = tmp_path / "recap.json"
        proc = fleet("converge", "--release", str(bad), "--inventory", inventory, "--limit", host,
                     "--report", str(report))
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 1
    failure = json.loads(report.read_text())["hosts"][host]["first_failure"]
    assert failure.startswith("Fetch the model weights and check their sha256:")
    assert "deadbeef" * 8 in failure
    assert errors == [] and served and set(served) == {_weights_file(RELEASE, hostvars[host]["fleet_model"])}
    assert converged.ssh(host, state).stdout == before  # same server process, no reboot
    staged = f"/var/lib/model-serving/weights/{hostvars[host]['fleet_model']}/{weights['revision']}/model.safetensors"
    assert converged.ssh(host, f"test -e {staged}", check=False).returncode != 0
    assert fleet("drift", "--release", str(RELEASE), "--inventory", inventory, "--limit", host).returncode == 0


def _weights_file(release: Path, model: str) -> str:
    """Where the role stages a model's weights for `release` (the path its server loads)."""
    weights = next(m for m in yaml.safe_load(release.read_text())["models"] if m["name"] == model)["weights"]
    return f"/var/lib/model-serving/weights/{model}/{weights['revision']}/{Path(weights['path']).name}"
