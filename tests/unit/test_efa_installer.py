"""The lab's AWS EFA installer tarball (lab/efa_installer.py): reproducible, the sha256 every bundle states,
its script run for real against a temporary dpkg root, and the fleet's reading of what it records."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from lab import efa_installer
from patching.release.bundle import load_bundle
from patching.release.pins import (
    EFA_RECORD_PATH,
    EfaRecord,
    PackageState,
    efa_differences,
    parse_efa_record,
    split_efa_answer,
)

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted([*(ROOT / "releases").glob("*.yaml"), *(ROOT / "lab/bundles").glob("*.yaml")])
VERSION = "1.43.2"
# what AWS's efa_installer.sh writes (write_package_file), on Ubuntu/Debian: deb file names without .deb
REAL_RECORD = ("# EFA installer version: 1.24.1\n# Debug packages installed: no\n# Packages installed:\n"
               "efa-config_1.15_all efa-profile_1.5_all libfabric-aws-bin_1.18.1_amd64 libfabric-aws-dev_1.18.1_amd64 "
               "libfabric1-aws_1.18.1_amd64 openmpi40-aws_4.1.5-1_amd64 ibacm_46.0-1_amd64 rdma-core_46.0-1_amd64 "
               "efa_2.5.0-1.amzn1_amd64\n")


def test_the_tarball_is_reproducible_and_laid_out_as_aws_ships_it():
    data = efa_installer.tarball(VERSION)
    assert data == efa_installer.tarball(VERSION)
    assert data[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 0)}
        top = "aws-efa-installer"
        assert {f"{top}/efa_installer.sh", f"{top}/common.sh", f"{top}/env.sh", f"{top}/package_list.txt"} <= set(names)
        assert tar.getmember(f"{top}/efa_installer.sh").mode == 0o755
        assert tar.extractfile(f"{top}/env.sh").read() == f"EFA_INSTALLER_VERSION={VERSION}\n".encode()  # type: ignore[union-attr]
        debs = sorted(n.removeprefix(f"{top}/") for n in names if n.endswith(".deb"))
        listed = tar.extractfile(f"{top}/package_list.txt").read().decode().split()  # type: ignore[union-attr]
    assert debs == listed
    base = "DEBS/DEBIAN12/x86_64"
    assert f"{base}/libfabric1-aws_2.1.0amzn5.0_amd64.deb" in debs
    assert f"{base}/libfabric-aws-bin_2.1.0amzn5.0_amd64.deb" in debs
    assert f"{base}/efa-driver/efa_2.17.2-1_amd64.deb" in debs
    assert any(d.startswith(f"{base}/rdma-core/rdma-core_") for d in debs)
    assert efa_installer.artifact_path(VERSION) == f"efa/aws-efa-installer-{VERSION}.tar.gz"


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_bundle_states_the_sha256_of_the_labs_tarball(path):
    data = yaml.safe_load(path.read_text())
    assert data["efa_installer_sha256"] == efa_installer.sha256(str(data["efa_installer"])), (
        f"{path}: efa_installer_sha256 is not the lab's tarball's; after changing lab/vendor/efa, set it to "
        f"{efa_installer.sha256(str(data['efa_installer']))}")
    assert load_bundle(path).efa_installer_sha256 == data["efa_installer_sha256"]


def test_a_bundle_without_a_sha256_of_the_tarball_is_refused(tmp_path):
    from infra.model.errors import InputError

    data = yaml.safe_load((ROOT / "releases/2026-11.yaml").read_text())
    for bad in ("", "abc", "Z" * 64):
        data["efa_installer_sha256"] = bad
        path = tmp_path / "b.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(InputError, match="efa_installer_sha256"):
            load_bundle(path)


def test_publish_writes_each_release_once(tmp_path):
    written = efa_installer.publish(tmp_path, [ROOT / "releases", ROOT / "lab/bundles"])
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [f"efa/aws-efa-installer-{VERSION}.tar.gz"]
    assert hashlib.sha256(written[0].read_bytes()).hexdigest() == efa_installer.sha256(VERSION)
    mtime = written[0].stat().st_mtime_ns
    efa_installer.publish(tmp_path, [ROOT / "releases"])
    assert written[0].stat().st_mtime_ns == mtime  # unchanged bytes: not rewritten


def test_the_built_packages_are_valid_debs(tmp_path):
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb is missing")
    for folder, deb in efa_installer.plan_debs(VERSION):
        path = tmp_path / deb.filename
        path.write_bytes(efa_installer.build_deb(deb))
        fields = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version"], capture_output=True,
                                text=True, check=True).stdout
        assert fields == f"Package: {deb.name}\nVersion: {deb.version}\n", folder


# ---- the script, run for real against a dpkg root in a temporary folder ----------------------------------------

@pytest.fixture
def installer(tmp_path):
    if not (shutil.which("dpkg") and shutil.which("getopt")):
        pytest.skip("dpkg and getopt are needed")
    root = tmp_path / "root"
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/updates").mkdir()
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    # the host's python3 (libfabric-aws-bin's fi_info needs it), as dpkg knows it
    (root / "var/lib/dpkg/status").write_text("Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1\n"
                                              "Architecture: amd64\nMaintainer: x <x@example.org>\nDescription: x\n\n")
    (root / "var/lib/dpkg/info/python3.list").write_text("")
    with tarfile.open(fileobj=io.BytesIO(efa_installer.tarball(VERSION))) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    workdir = tmp_path / "x/aws-efa-installer"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["./efa_installer.sh", *args], cwd=workdir, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "EFA_SIM_DPKG_ROOT": str(root)})

    def dpkg() -> dict[str, str]:
        out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                              "-f=${Package} ${Version} ${db:Status-Status}\n"], capture_output=True, text=True).stdout
        return {p: v for p, v, s in (line.split() for line in out.splitlines()) if s == "installed"}

    return run, dpkg, root


def test_the_installer_installs_its_packages_and_records_them_as_aws_does(installer):
    run, dpkg, root = installer
    proc = run("-y", "-n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (root / EFA_RECORD_PATH.lstrip("/")).read_text()
    lines = text.splitlines()
    assert lines[:3] == [f"# EFA installer version: {VERSION}", "# Debug packages installed: no",
                         "# Packages installed:"]
    assert len(lines) == 4  # the packages on one line, space-separated
    record = parse_efa_record(text)
    assert record is not None and record.installer_version == VERSION
    installed = dpkg()
    assert {n: v for n, v in installed.items() if n != "python3"} == record.packages
    assert record.packages["libfabric1-aws"] == "2.1.0amzn5.0" and record.packages["efa"] == "2.17.2-1"
    assert (root / "opt/amazon/efa/bin/fi_info").is_symlink()
    assert (root / "usr/lib/fleet-sim/libfabric1-aws/package.json").is_file()

    again = run("-y", "-n")  # a second run installs nothing: every package is already there
    assert again.returncode == 0 and again.stdout.count("already installed") == len(record.packages)
    assert parse_efa_record((root / EFA_RECORD_PATH.lstrip("/")).read_text()) == record

    removed = run("-u", "-y")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert set(dpkg()) == {"python3"} and not (root / EFA_RECORD_PATH.lstrip("/")).exists()


def test_the_installer_never_downgrades(installer):
    run, dpkg, root = installer
    assert run("-y", "-n").returncode == 0
    newer = root.parent / "newer"
    shutil.copytree(root.parent / "x/aws-efa-installer", newer)
    # a newer libfabric already installed (as a newer release would leave it): the older file is skipped
    deb = next(d for _, d in efa_installer.plan_debs(VERSION) if d.name == "libfabric1-aws")
    deb.version = deb.upstream = "2.9.0amzn1.0"
    newer_deb = newer / deb.filename
    newer_deb.write_bytes(efa_installer.build_deb(deb))
    subprocess.run(["dpkg", f"--root={root}", f"--admindir={root}/var/lib/dpkg", "--force-not-root", "-i",
                    str(newer_deb)], check=True, capture_output=True)
    proc = run("-y", "-n")
    assert proc.returncode == 0 and "libfabric1-aws_2.9.0amzn1.0 already installed" in proc.stdout
    assert dpkg()["libfabric1-aws"] == "2.9.0amzn1.0"
    # what the fleet then sees: the record names the release's version, dpkg has the newer one
    record = parse_efa_record((root / EFA_RECORD_PATH.lstrip("/")).read_text())
    bundle = load_bundle(ROOT / "releases/2026-11.yaml")
    held = {n: PackageState(n, v, True, True) for n, v in dpkg().items()}
    assert efa_differences(bundle, record, held) == [
        ("libfabric1-aws", f"2.1.0amzn5.0 (recorded by the EFA installer {VERSION})", "2.9.0amzn1.0")]


def test_the_installer_refuses_unknown_options_and_other_systems(installer):
    run, _, root = installer
    assert run("--bogus").returncode == 1
    (root / "etc/os-release").write_text('ID=centos\nVERSION_ID="7"\n')
    proc = run("-y")
    assert proc.returncode == 1 and "Unsupported operating system" in proc.stderr


# ---- the fleet's reading of the record ------------------------------------------------------------------------

def test_parse_efa_record_reads_what_aws_writes():
    record = parse_efa_record(REAL_RECORD)
    assert record == EfaRecord("1.24.1", False, {
        "efa-config": "1.15", "efa-profile": "1.5", "libfabric-aws-bin": "1.18.1", "libfabric-aws-dev": "1.18.1",
        "libfabric1-aws": "1.18.1", "openmpi40-aws": "4.1.5-1", "ibacm": "46.0-1", "rdma-core": "46.0-1",
        "efa": "2.5.0-1.amzn1"})
    assert parse_efa_record("") is None and parse_efa_record("cat: no such file\n") is None
    assert parse_efa_record(REAL_RECORD.replace("Debug packages installed: no", "Debug packages installed: yes")
                            ).debug_packages  # type: ignore[union-attr]
    # an RPM-based host names packages NAME-VERSION.ARCH: kept whole, no version to compare
    rpm = parse_efa_record("# EFA installer version: 1.24.1\n# Packages installed:\n"
                           "libfabric-aws-1.18.1-1.amzn2.x86_64\n")
    assert rpm is not None and rpm.packages == {"libfabric-aws-1.18.1-1.amzn2.x86_64": ""}


def test_efa_differences_name_expected_and_found():
    bundle = load_bundle(ROOT / "releases/2026-11.yaml")
    assert efa_differences(bundle, None) == [
        (f"EFA installer ({EFA_RECORD_PATH})", VERSION, f"no record (no {EFA_RECORD_PATH})")]
    old = parse_efa_record(REAL_RECORD)
    assert efa_differences(bundle, old) == [(f"EFA installer ({EFA_RECORD_PATH})", VERSION, "1.24.1")]
    ok = EfaRecord(VERSION, False, {"libfabric1-aws": "2.1.0amzn5.0", "efa": "2.17.2-1"})
    assert efa_differences(bundle, ok) == []
    installed = {"libfabric1-aws": PackageState("libfabric1-aws", "2.1.0amzn5.0", True, True),
                 "efa": PackageState("efa", "2.17.2-1", False, True)}
    assert efa_differences(bundle, ok, installed) == [("efa hold", "held", "not held")]
    assert efa_differences(bundle, ok, {}) == [
        ("libfabric1-aws", f"2.1.0amzn5.0 (recorded by the EFA installer {VERSION})", "not installed"),
        ("efa", f"2.17.2-1 (recorded by the EFA installer {VERSION})", "not installed")]


def test_split_efa_answer_reads_record_and_dpkg_in_one_answer():
    answer = (REAL_RECORD + "----- efa packages -----\n"
              "libfabric1-aws\t1.18.1\thold ok installed\nefa\t2.5.0-1.amzn1\tinstall ok installed\n")
    record, installed = split_efa_answer(answer)
    assert record is not None and record.installer_version == "1.24.1"
    assert installed["libfabric1-aws"].held and not installed["efa"].held
    assert split_efa_answer("----- efa packages -----\n") == (None, {})
