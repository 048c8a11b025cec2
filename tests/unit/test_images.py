"""The lab's serving images (lab/images.py): deterministic OCI images, pushed to a real registry, that run.

The base layer's interpreter comes from this machine's own root (a Debian, like the lab's base image). The
registry test runs Debian's docker-registry on a free loopback port and reads the result back with skopeo;
the run test extracts the layers and runs the image's entrypoint under chroot (root only), as a container
with the CDI spec's mounts would see it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab import aptrepo, images
from lab.hardware import write_hardware
from tests.unit.test_vendor_sim import DGX, NEW, free_port, http, package, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
RELEASE_DIRS = [ROOT / "releases", ROOT / "lab" / "bundles"]
VERSIONS = ["0.11.1", "0.11.3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, images.Image]:
    cache = tmp_path_factory.mktemp("images")
    return images.build_images(Path("/"), cache, VERSIONS, log=lambda _: None)


def members(blob: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(blob) as tar:
        return tar.getmembers()


def read_member(blob: Path, name: str) -> bytes:
    with tarfile.open(blob) as tar:
        f = tar.extractfile(name)
        assert f is not None, name
        return f.read()


def test_versions_are_the_bundles_and_the_known_bad_releases():
    named = {str(r["serving"]["version"]) for d in RELEASE_DIRS for r in aptrepo.load_releases(d)}
    assert set(images.serving_versions(RELEASE_DIRS)) == named | set(images.bad_serving_versions())
    assert images.serving_versions(RELEASE_DIRS)[:2] == ["0.11.0", "0.11.1"]


def test_build_is_deterministic_and_cached(built, tmp_path):
    started = time.monotonic()
    again = images.build_images(Path("/"), tmp_path / "other", VERSIONS, log=lambda _: None)
    first = time.monotonic() - started
    assert {v: i.digest for v, i in again.items()} == {v: i.digest for v, i in built.items()}
    assert [i.manifest for i in again.values()] == [i.manifest for i in built.values()]
    started = time.monotonic()
    cached = images.build_images(Path("/"), tmp_path / "other", VERSIONS, log=lambda _: None)
    assert {v: i.digest for v, i in cached.items()} == {v: i.digest for v, i in built.items()}
    assert time.monotonic() - started < max(first / 2, 1.0)  # the base layer is not rebuilt
    assert len({i.digest for i in built.values()}) == len(VERSIONS)  # one image per release
    assert len({i.layers[0].digest for i in built.values()}) == 1  # sharing the base layer


def test_manifest_and_config_are_oci_and_match_the_blobs(built):
    image = built["0.11.1"]
    manifest = json.loads(image.manifest)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert image.digest == "sha256:" + hashlib.sha256(image.manifest).hexdigest()
    config_bytes = image.blob_path(manifest["config"]["digest"]).read_bytes()
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = json.loads(config_bytes)
    assert (config["architecture"], config["os"]) == ("amd64", "linux")
    assert config["config"]["Entrypoint"] == ["vllm", "serve"]  # vLLM's docker/Dockerfile, stage vllm-openai
    assert any(e.startswith("PATH=") and "/usr/local/bin" in e for e in config["config"]["Env"])
    diff_ids = []
    for layer in manifest["layers"]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        data = image.blob_path(layer["digest"]).read_bytes()
        assert layer["size"] == len(data) and layer["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert data[3] == 0 and data[4:8] == b"\0\0\0\0"  # gzip: no file name, mtime 0
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest())
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}
    index = json.loads((image.layout / "index.json").read_text())
    assert {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]} == \
        {i.tag: i.digest for i in built.values()}
    assert image.tag == "v0.11.1"


def test_layers_hold_python_and_the_release(built):
    image = built["0.11.3"]
    base, release = (image.blob_path(b.digest) for b in image.layers)
    for blob in (base, release):
        entries = members(blob)
        assert [m.name for m in entries] == sorted(m.name for m in entries)
        assert {(m.mtime, m.uid, m.gid) for m in entries} == {(0, 0, 0)}
    names = {m.name: m for m in members(base)}
    assert names["usr/bin/python3"].issym() and names["usr/bin/python3"].linkname.startswith("python3.")
    assert names["etc/passwd"].isfile() and names["tmp"].mode == 0o1777
    assert any(n.startswith("usr/lib/x86_64-linux-gnu/libc.so") for n in names)
    stdlib = [n for n in names if n.startswith("usr/lib/python3.")]
    assert any(n.endswith("/json/__init__.py") for n in stdlib) and any("/lib-dynload/" in n for n in stdlib)
    for pruned in ("test", "idlelib", "tkinter", "ensurepip", "__pycache__"):
        assert not any(f"/{pruned}/" in n + "/" for n in stdlib), pruned
    assert not any(n.endswith(".pyc") for n in names)
    size = images.base_layer(Path("/"), images.Layout(image.layout), log=lambda _: None)[0]
    assert size.uncompressed < 60 * 2**20 and size.size < 20 * 2**20  # small: no pip, no test suite

    files = {m.name: m for m in members(release)}
    server = files["usr/local/bin/vllm"]
    assert server.mode == 0o755 and read_member(release, server.name).startswith(b"#!/usr/bin/python3\n")
    assert read_member(release, server.name) == (ROOT / "lab/vendor/serving/vllm_serving.py").read_bytes()
    [fleetsim] = [n for n in files if n.endswith("/dist-packages/fleetsim.py")]
    assert read_member(release, fleetsim) == (ROOT / "lab/vendor/common/fleetsim.py").read_bytes()
    baked = json.loads(read_member(release, "usr/lib/fleet-sim/vllm-serving/package.json"))
    assert baked == images.package_json("0.11.3")
    assert baked["release"]["leak_mib_per_request"] == 16 and baked["upstream_version"] == "0.11.3"


def test_push_to_a_real_registry(built, tmp_path):
    if not Path("/usr/bin/docker-registry").exists():
        pytest.skip("Debian's docker-registry is not installed (apt-get install docker-registry)")
    port = free_port()
    service = images.registry_service(tmp_path / "registry", port)
    service.start()
    try:
        service.ready(timeout=20)
        registry = f"127.0.0.1:{port}"
        started = time.monotonic()
        digests = images.push_all(registry, Path("/"), built["0.11.1"].layout.parent, versions=VERSIONS,
                                  log=lambda _: None)
        pushed = time.monotonic() - started
        assert digests == {v: i.digest for v, i in built.items()}
        again = images.push_all(registry, Path("/"), built["0.11.1"].layout.parent, versions=VERSIONS,
                                log=lambda _: None)
        assert again == digests
        for version, digest in digests.items():
            request = urllib.request.Request(f"http://{registry}/v2/vllm/vllm-openai/manifests/{digest}",
                                             headers={"Accept": images.MANIFEST_TYPE})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.read() == built[version].manifest
                assert response.headers["Docker-Content-Digest"] == digest
        if shutil.which("skopeo") is None:
            pytest.skip("skopeo is not installed (apt-get install skopeo)")
        digest = digests["0.11.1"]
        for ref in (f"docker://{registry}/vllm/vllm-openai@{digest}", f"docker://{registry}/vllm/vllm-openai:v0.11.1"):
            proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", ref], capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, proc.stderr
            info = json.loads(proc.stdout)
            assert info["Digest"] == digest and (info["Architecture"], info["Os"]) == ("amd64", "linux")
            assert info["Layers"] == [b.digest for b in built["0.11.1"].layers]
        proc = subprocess.run(["skopeo", "inspect", "--config", "--tls-verify=false",
                               f"docker://{registry}/vllm/vllm-openai@{digest}"], capture_output=True, text=True,
                              timeout=60)
        assert json.loads(proc.stdout)["config"]["Entrypoint"] == ["vllm", "serve"]
        proc = subprocess.run(["skopeo", "inspect", f"oci:{built['0.11.1'].layout}:v0.11.1"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and json.loads(proc.stdout)["Digest"] == digest, proc.stderr
        print(f"pushed {len(VERSIONS)} images in {pushed:.2f}s")
    finally:
        service.stop()


def test_registry_config_is_loopback_filesystem_no_auth_no_delete(tmp_path):
    config = yaml.safe_load(images.registry_config(tmp_path, 5123))
    assert config["http"]["addr"] == "127.0.0.1:5123" and "auth" not in config
    assert config["storage"]["filesystem"] == {"rootdirectory": str(tmp_path / "storage")}
    assert config["storage"]["delete"] == {"enabled": False}
    service = images.registry_service(tmp_path, 5123)
    assert service.argv == ["/usr/bin/docker-registry", "serve", str(tmp_path / "config.yml")]
    assert service.port == 5123 and yaml.safe_load((tmp_path / "config.yml").read_text()) == config


def extract(image: images.Image, target: Path) -> None:
    for layer in image.layers:
        with tarfile.open(image.blob_path(layer.digest)) as tar:
            tar.extractall(target, filter="tar")


def chroot_prefix() -> list[str]:
    """unshare into a new PID namespace (as a container's), then chroot; skip where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("chroot") is None or shutil.which("unshare") is None:
        pytest.skip("running the image's files needs root (chroot, unshare)")
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --pid is not allowed here")
    return ["unshare", "--pid", "--fork", "--kill-child", "chroot"]


def test_the_image_serves_under_chroot_in_its_own_pid_namespace(built, tmp_path):
    prefix = chroot_prefix()
    image = built["0.11.1"]
    rootfs = tmp_path / "rootfs"
    extract(image, rootfs)
    config = json.loads(image.blob_path(image.config.digest).read_bytes())["config"]
    env = dict(e.split("=", 1) for e in config["Env"])
    weights = rootfs / "weights/deepseek"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(os.urandom(1 << 16))
    port = free_port()
    argv = [*prefix, str(rootfs), *config["Entrypoint"], "/weights/deepseek", "--served-model-name",
            "deepseek-ai/DeepSeek-V3", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096"]

    # no GPU passed in (no CDI mounts): vLLM's error
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "RuntimeError: No CUDA GPUs are available" in proc.stderr, proc.stderr

    # what the CDI spec mounts: the hardware folder, the driver's package data, the runtime folder
    write_hardware(rootfs / "var/lib/fleet-lab/hw", "dgx-a1", DGX)
    driver = package(NEW, "cuda-drivers-")
    (rootfs / "usr/lib/fleet-sim/driver").mkdir(parents=True)
    (rootfs / "usr/lib/fleet-sim/driver/package.json").write_text(json.dumps(driver.package_json()))
    run_dir = rootfs / "run/nvidia-sim"
    run_dir.mkdir(parents=True)
    (run_dir / "loaded-driver-version").write_text(driver.upstream + "\n")
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    host_env = {"FLEET_SIM_RUN_DIR": str(run_dir), "PYTHONPATH": str(ROOT / "lab/vendor/common"),
                "PATH": os.environ["PATH"]}
    used = [sys.executable, "-c", "import fleetsim, json; print(json.dumps(fleetsim.fb_used()))"]
    try:
        wait_until_serving(port, server, timeout=30, interval=0.1)
        models = json.loads(http(port, "/v1/models")[1])["data"]
        assert [(m["id"], m["root"], m["max_model_len"]) for m in models] == [
            ("deepseek-ai/DeepSeek-V3", "/weights/deepseek", 4096)]
        assert json.loads(http(port, "/version")[1]) == {"version": "0.11.1"}
        # the host sees the server's GPU memory, though the server is pid 1 of its own namespace
        seen = json.loads(subprocess.run(used, env=host_env, capture_output=True, text=True, check=True).stdout)
        assert seen == {str(i): round(81920 * 0.9) for i in range(8)}
        [child] = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGTERM)  # what podman stop sends the container's pid 1
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()
    assert json.loads(subprocess.run(used, env=host_env, capture_output=True, text=True, check=True).stdout) == {}


def test_layer_tar_is_a_function_of_its_entries():
    entries = {"b/file": images.Entry("file", 0o644, b"x"), "a": images.Entry("dir"),
               "b/link": images.Entry("link", target="file")}
    one, two = images.layer_tar(entries), images.layer_tar(dict(reversed(list(entries.items()))))
    assert one == two
    with tarfile.open(fileobj=io.BytesIO(one)) as tar:
        assert tar.getnames() == ["a", "b", "b/file", "b/link"]
    assert images.gzip_bytes(one) == images.gzip_bytes(one)
