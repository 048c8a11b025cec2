"""The lab's serving images: one OCI image per simulated vLLM release, and the registry that serves them.

The lab cannot pull the real `docker.io/vllm/vllm-openai` (no internet, no GPU), so it builds small stand-ins
laid out like it: ENTRYPOINT ["vllm", "serve"] (vLLM's docker/Dockerfile, stage vllm-openai), so a container
runs `vllm serve MODEL --served-model-name NAME --port P ...` exactly as the real image does, tagged
`v<version>` as vLLM tags its releases (vllm/vllm-openai:v0.11.1). Layers:

1. base: a Python 3 interpreter taken from a Debian root file system (the lab's base image,
   lab/base.py ensure_base; any Debian root with python3): /usr/bin/python3*, its standard library without
   tests, IDLE, tkinter, ensurepip, the static library and bytecode caches (PRUNED), the shared libraries the
   interpreter and its extension modules need (found with the root's own dynamic loader, `ld.so --list`,
   which is what ldd runs), a minimal /etc/passwd and /etc/group, /tmp;
2. one per release: /usr/local/bin/vllm (lab/vendor/serving/vllm_serving.py, `#!/usr/bin/python3`, 0755),
   lab/vendor/common/fleetsim.py in the interpreter's /usr/local/lib/python3.X/dist-packages (where pip puts
   the real vllm package), and the release baked in as the deb bakes it: /usr/lib/fleet-sim/vllm-serving/
   package.json (name, version, `release`: releases.yaml's default profile with the release's `bad` entry
   merged over it), which the server reads through fleetsim.package_info("vllm-serving").

The GPUs come in at run time through the CDI spec `nvidia-ctk cdi generate` writes (the hardware folder, the
simulated driver /usr/lib/fleet-sim/driver and /run/nvidia-sim, bind-mounted): nothing host-specific is baked.

Builds are deterministic: entries sorted, mtime 0, uid/gid 0, gzip without name or time, the config's
`created` fixed, so the same inputs give the same digests on every lab start. Blobs are kept by digest in an
OCI image layout under the cache folder (`oci-layout`, `index.json`, `blobs/sha256/`), which skopeo and podman
read as `oci:DIR:TAG`; the base layer is remembered by a fingerprint of its sources, so a second build only
re-tars the small release layers. `push_all` puts every image into a registry over the Docker Registry HTTP
API v2 and returns the manifest digests the bundles pin; `registry_service` runs Debian's docker-registry
(the CNCF distribution server) on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from lab.services import Service

VENDOR = Path(__file__).with_name("vendor")
REPOSITORY = "vllm/vllm-openai"
ENTRYPOINT = ["vllm", "serve"]
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "VLLM_USAGE_SOURCE=production-docker-image"]  # as the real image sets it
WORKDIR = "/vllm-workspace"
CREATED = "2025-10-09T08:53:20Z"  # SOURCE_DATE_EPOCH of lab/aptrepo.py: the same inputs, the same config
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# What the base layer leaves out of the standard library: tests, IDLE, Tk, pip's bootstrap, 2to3, the
# static libpython and build configuration, and bytecode caches (Python compiles what it imports).
PRUNED = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__")
PRUNED_PREFIXES = ("config-",)
PRUNED_FILES = ("sitecustomize.py",)  # Debian's is a link to /etc/python3.X, which the image does not have
PRUNED_FILE_PREFIXES = ("_test", "_xxtestfuzz")  # CPython's test extension modules (lib-dynload)
# bump when the base layer's recipe (below) changes: it is part of the cached layer's fingerprint
BASE_RECIPE = 1
GZIP_LEVEL = 6
PASSWD = "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class ImageBuildError(RuntimeError):
    """The base root has no usable Python, or a release names a serving engine the lab does not simulate."""


class RegistryError(RuntimeError):
    """The registry refused a request, or reported a digest other than the image's."""


@dataclass(frozen=True)
class Blob:
    """A blob in the layout: its media type, digest (sha256:...) and size; for a layer, its diff_id too."""

    media_type: str
    digest: str
    size: int
    diff_id: str = ""
    uncompressed: int = 0

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """One built image: its release, tag, layers, config and manifest (bytes as pushed) in `layout`."""

    version: str
    layout: Path
    layers: tuple[Blob, ...]
    config: Blob
    manifest: bytes

    @property
    def tag(self) -> str:
        return f"v{self.version}"

    @property
    def digest(self) -> str:
        """The manifest digest: what a bundle pins (NAME@sha256:...)."""
        return sha256(self.manifest)

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---- which releases ------------------------------------------------------------------------------------

def release_profiles() -> dict:
    """lab/vendor/serving/releases.yaml: the default profile and the known-bad releases' overrides."""
    return yaml.safe_load((VENDOR / "serving/releases.yaml").read_text())


def bad_serving_versions() -> list[str]:
    """The known-bad serving releases the lab builds images of besides those the bundles name."""
    return sorted(str(v) for v in release_profiles()["bad"])


def serving_versions(release_dirs: Iterable[Path]) -> list[str]:
    """Every serving release the lab simulates: those the bundles in `release_dirs` name (serving.version),
    and the known-bad releases of releases.yaml, as lab/aptrepo.py builds a deb for each."""
    versions = set(str(v) for v in release_profiles()["bad"])
    for folder in release_dirs:
        for path in sorted(Path(folder).glob("*.yaml")):
            serving = (yaml.safe_load(path.read_text()) or {}).get("serving") or {}
            if serving.get("engine", "vllm") != "vllm":
                raise ImageBuildError(f"{path}: serving.engine: the lab simulates vllm only, not "
                                      f"{serving.get('engine')!r}")
            if "version" in serving:
                versions.add(str(serving["version"]))
    return sorted(versions, key=lambda v: [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)])


def package_json(version: str) -> dict:
    """What the image bakes in for `version`, the same data as the vllm-serving deb's package.json."""
    profiles = release_profiles()
    profile = {**profiles["default"], **profiles["bad"].get(version, {})}
    return {"package": "vllm-serving", "version": f"{version}-1", "upstream_version": version, "release": profile}


# ---- deterministic layers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One tar entry: a directory, a file (content, mode) or a symlink (target)."""

    kind: str  # "dir" | "file" | "link"
    mode: int = 0o755
    data: bytes = b""
    target: str = ""


def layer_tar(entries: dict[str, Entry]) -> bytes:
    """An uncompressed layer tar of `entries` (paths without a leading /), parents added, sorted, owner 0:0,
    mtime 0: the same entries always give the same bytes."""
    full = dict(entries)
    for path in list(entries):
        parent = PurePosixPath(path).parent
        while str(parent) not in (".", ""):
            full.setdefault(str(parent), Entry("dir"))
            parent = parent.parent
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(full):
            entry = full[path]
            info = tarfile.TarInfo(path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = entry.mode & 0o7777
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "link":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no file name and mtime 0 (deterministic)."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=GZIP_LEVEL) as gz:
        gz.write(data)
    return out.getvalue()


class Layout:
    """An OCI image layout (image-spec image-layout.md) in `root`: blobs by digest, index.json by tag."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").exists():
            _write_atomic(root / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def put(self, data: bytes, media_type: str, diff_id: str = "", uncompressed: int = 0) -> Blob:
        digest = sha256(data)
        path = self.path(digest)
        if not path.exists() or path.stat().st_size != len(data):
            _write_atomic(path, data)
        return Blob(media_type, digest, len(data), diff_id, uncompressed)

    def layer(self, tar: bytes) -> Blob:
        return self.put(gzip_bytes(tar), LAYER_TYPE, sha256(tar), len(tar))

    def tag(self, images: Sequence[Image]) -> None:
        """index.json naming each image by its tag (org.opencontainers.image.ref.name)."""
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"mediaType": MANIFEST_TYPE, "digest": i.digest, "size": len(i.manifest),
             "annotations": {"org.opencontainers.image.ref.name": i.tag}} for i in images]}
        _write_atomic(self.root / "index.json", json.dumps(index, indent=2).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- the base layer: Python from a Debian root ---------------------------------------------------------

class _RootReader:
    """Collects entries from a root file system, following its symlinks inside the root (not the caller's)."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, Entry] = {}

    def resolve(self, path: str, depth: int = 0) -> str:
        """`path` (absolute, in the root) with every symlink component recorded and followed."""
        if depth > 40:
            raise ImageBuildError(f"{self.root}: too many levels of symbolic links at {path}")
        parts = PurePosixPath(path).parts[1:]
        current = PurePosixPath("/")
        for i, part in enumerate(parts):
            candidate = current / part
            host = self.root / str(candidate).lstrip("/")
            if host.is_symlink():
                target = os.readlink(host)
                self.entries[str(candidate).lstrip("/")] = Entry("link", target=target)
                joined = PurePosixPath(target) if target.startswith("/") else current / target
                rest = PurePosixPath(*parts[i + 1:]) if i + 1 < len(parts) else PurePosixPath("")
                return self.resolve(os.path.normpath(str(joined / rest)), depth + 1)
            current = candidate
        return str(current)

    def add_file(self, path: str) -> str:
        """Add a file (and the links on its way); returns its resolved path in the root."""
        real = self.resolve(path)
        host = self.root / real.lstrip("/")
        st = host.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ImageBuildError(f"{host}: not a regular file")
        self.entries[real.lstrip("/")] = Entry("file", st.st_mode & 0o7777, host.read_bytes())
        return real

    def add_tree(self, path: str) -> None:
        """Add a directory tree but PRUNED parts; symlinks inside it are kept as links."""
        real = self.resolve(path)
        top = self.root / real.lstrip("/")
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in PRUNED and not d.startswith(PRUNED_PREFIXES))
            rel = Path(folder).relative_to(self.root)
            self.entries[str(rel)] = Entry("dir", 0o755)
            for name in sorted(files + [d for d in os.listdir(folder) if (Path(folder) / d).is_symlink()
                                        and d not in files]):
                if name in PRUNED_FILES or name.startswith(PRUNED_FILE_PREFIXES) or name.endswith((".pyc", ".pyo")):
                    continue
                host = Path(folder) / name
                key = str(rel / name)
                if host.is_symlink():
                    self.entries[key] = Entry("link", target=os.readlink(host))
                elif host.is_file():
                    self.entries[key] = Entry("file", host.stat().st_mode & 0o7777, host.read_bytes())


def _loader(root: Path) -> Path:
    for candidate in ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                      "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        if (root / candidate).exists():
            return root / candidate
    raise ImageBuildError(f"{root}: no x86-64 dynamic loader (ld-linux-x86-64.so.2)")


def shared_libraries(root: Path, binary: Path) -> list[str]:
    """The shared libraries `binary` (a file in `root`) loads, as paths in `root`: the root's own loader lists
    them (what ldd does) with the root's library folders searched first."""
    folders = [str(root / d) for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64")
               if (root / d).is_dir()]
    proc = subprocess.run([str(_loader(root)), "--library-path", ":".join(folders), "--list", str(binary)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ImageBuildError(f"ld.so --list {binary} failed ({proc.returncode}): {proc.stderr.strip()}")
    libs = []
    resolved_root = str(root.resolve())
    for line in proc.stdout.splitlines():
        match = re.match(r"\s*(\S+)(?: => (\S+))? \(0x[0-9a-f]+\)", line)
        if not match:
            if "not found" in line:
                raise ImageBuildError(f"{binary}: {line.strip()}")
            continue
        path = match.group(2) or match.group(1)
        if not path.startswith("/"):
            continue  # linux-vdso.so.1: the kernel's
        real = os.path.realpath(path)
        for prefix in (str(root), resolved_root):
            if path.startswith(prefix + "/"):
                libs.append("/" + os.path.relpath(path, prefix))
                break
            if real.startswith(prefix + "/"):
                libs.append("/" + os.path.relpath(real, prefix))
                break
        else:
            libs.append(path)  # the loader itself, named by its canonical path
    return libs


def _python(root: Path) -> tuple[str, str]:
    """(/usr/bin/python3.X, "3.X") of the root's interpreter."""
    link = root / "usr/bin/python3"
    if not link.exists():
        raise ImageBuildError(f"{root}: no /usr/bin/python3 (the base needs Debian's python3)")
    name = os.path.basename(os.path.realpath(link))
    match = re.fullmatch(r"python(3\.\d+)", name)
    if not match:
        raise ImageBuildError(f"{root}: /usr/bin/python3 is {name}, not python3.X")
    return f"/usr/bin/{name}", match.group(1)


def _fingerprint(root: Path) -> str:
    """What the base layer is made of, cheaply: this recipe and the interpreter's files' names, sizes, mtimes."""
    binary, version = _python(root)
    digest = hashlib.sha256(json.dumps([BASE_RECIPE, str(root.resolve()), binary, PRUNED]).encode())
    for top in (root / binary.lstrip("/"), root / f"usr/lib/python{version}"):
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if "__pycache__" not in p.parts)
        for p in paths:
            with contextlib.suppress(OSError):
                st = p.lstat()
                digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for lib in ("lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"):
        with contextlib.suppress(OSError):
            st = (root / lib).stat()
            digest.update(f"{lib}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def base_entries(root: Path) -> dict[str, Entry]:
    """The base layer's entries from the Debian root `root` (see the module docstring)."""
    root = Path(root)
    binary, version = _python(root)
    reader = _RootReader(root)
    reader.add_file("/usr/bin/python3")
    interpreter = reader.add_file(binary)
    reader.add_tree(f"/usr/lib/python{version}")
    objects = [root / interpreter.lstrip("/")]
    dynload = root / f"usr/lib/python{version}/lib-dynload"
    objects += sorted(p for p in dynload.glob("*.so") if not p.name.startswith(PRUNED_FILE_PREFIXES)) \
        if dynload.is_dir() else []
    libs: set[str] = set()
    for obj in objects:
        libs.update(shared_libraries(root, obj))
    for lib in sorted(libs):
        reader.add_file(lib)
    entries = reader.entries
    entries["etc/passwd"] = Entry("file", 0o644, PASSWD.encode())
    entries["etc/group"] = Entry("file", 0o644, GROUP.encode())
    entries["tmp"] = Entry("dir", 0o1777)
    entries["root"] = Entry("dir", 0o700)
    entries[f"usr/local/lib/python{version}/dist-packages"] = Entry("dir", 0o755)
    entries["usr/local/bin"] = Entry("dir", 0o755)
    return entries


def base_layer(root: Path, layout: Layout, log: Callable[[str], None] = print) -> tuple[Blob, str]:
    """The base layer's blob (built, or found by its sources' fingerprint) and the Python version in it."""
    _, version = _python(root)
    key = layout.root / "base-layers" / f"{_fingerprint(root)}.json"
    if key.exists():
        known = json.loads(key.read_text())
        blob = Blob(LAYER_TYPE, known["digest"], known["size"], known["diff_id"], known["uncompressed"])
        if layout.path(blob.digest).is_file() and layout.path(blob.digest).stat().st_size == blob.size:
            return blob, version
    started = time.monotonic()
    blob = layout.layer(layer_tar(base_entries(root)))
    _write_atomic(key, json.dumps({"digest": blob.digest, "size": blob.size, "diff_id": blob.diff_id,
                                   "uncompressed": blob.uncompressed}).encode())
    log(f"serving image base layer (python{version} from {root}): {blob.uncompressed / 2**20:.1f} MiB, "
        f"{blob.size / 2**20:.1f} MiB compressed, built in {time.monotonic() - started:.1f}s")
    return blob, version


def release_entries(version: str, python_version: str) -> dict[str, Entry]:
    """The release layer's entries: the server as `vllm`, fleetsim where it imports it from, the release."""
    server = (VENDOR / "serving/vllm_serving.py").read_bytes()
    if not server.startswith(b"#!/usr/bin/python3\n"):
        raise ImageBuildError("lab/vendor/serving/vllm_serving.py must start with #!/usr/bin/python3")
    info = json.dumps(package_json(version), indent=2, sort_keys=True) + "\n"
    return {
        "usr/local/bin/vllm": Entry("file", 0o755, server),
        f"usr/local/lib/python{python_version}/dist-packages/fleetsim.py":
            Entry("file", 0o644, (VENDOR / "common/fleetsim.py").read_bytes()),
        "usr/lib/fleet-sim/vllm-serving/package.json": Entry("file", 0o644, info.encode()),
        WORKDIR.lstrip("/"): Entry("dir", 0o755),
    }


def image_config(version: str, layers: Sequence[Blob]) -> bytes:
    """The OCI image config: amd64/linux, vLLM's entrypoint, PATH, the layers' diff_ids."""
    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ENV, "Entrypoint": ENTRYPOINT, "WorkingDir": WORKDIR},
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
        "history": [
            {"created": CREATED, "created_by": "lab/images.py: python3 from the lab's Debian base"},
            {"created": CREATED, "created_by": f"lab/images.py: simulated vLLM {version} (vllm serve)"},
        ],
    }
    return json.dumps(config, separators=(",", ":")).encode()


def manifest(config: Blob, layers: Sequence[Blob]) -> bytes:
    """The OCI image manifest (application/vnd.oci.image.manifest.v1+json)."""
    doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config.descriptor(),
           "layers": [b.descriptor() for b in layers]}
    return json.dumps(doc, separators=(",", ":")).encode()


def build_images(base_root: Path, cache: Path, versions: Iterable[str],
                 log: Callable[[str], None] = print) -> dict[str, Image]:
    """Build (or find in the cache's layout) the image of every serving release in `versions`.

    `base_root` is the Debian root the interpreter comes from; `cache` holds the OCI layout (cache/oci).
    Safe to call from several processes: they serialise on cache/oci/.lock.
    """
    layout = Layout(Path(cache) / "oci")
    with open(layout.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base, python_version = base_layer(Path(base_root), layout, log)
        images = {}
        for version in versions:
            layers = (base, layout.layer(layer_tar(release_entries(version, python_version))))
            config = layout.put(image_config(version, layers), CONFIG_TYPE)
            body = manifest(config, layers)
            layout.put(body, MANIFEST_TYPE)
            images[version] = Image(version, layout.root, layers, config, body)
        layout.tag(list(images.values()))
    return images


def build_image(base_root: Path, cache: Path, version: str) -> Image:
    """The image of one serving release (build_images for one)."""
    return build_images(base_root, cache, [version], log=lambda _: None)[version]


# ---- the registry --------------------------------------------------------------------------------------

def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def _blob_upload(base: str, repository: str, data: bytes, digest: str) -> bool:
    """Upload a blob unless the registry has it (HEAD); True when it was uploaded."""
    status, _, _ = _request("HEAD", f"{base}/v2/{repository}/blobs/{digest}")
    if status == 200:
        return False
    status, headers, body = _request("POST", f"{base}/v2/{repository}/blobs/uploads/", b"",
                                     {"Content-Length": "0"})
    location = headers.get("Location") or headers.get("location")
    if status != 202 or not location:
        raise RegistryError(f"POST {base}/v2/{repository}/blobs/uploads/: {status} {body[:200]!r}")
    url = urllib.parse.urljoin(base + "/", location)
    url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
    status, _, body = _request("PUT", url, data, {"Content-Type": "application/octet-stream",
                                                  "Content-Length": str(len(data))})
    if status != 201:
        raise RegistryError(f"PUT blob {digest} to {base}/v2/{repository}: {status} {body[:200]!r}")
    return True


def push_image(registry: str, image: Image, repository: str = REPOSITORY) -> str:
    """Push `image` to `registry` (host:port, plain HTTP) as REPOSITORY:v<version>; the manifest digest the
    registry reports (Docker-Content-Digest), checked equal to the image's own."""
    base = f"http://{registry}"
    for blob in (*image.layers, image.config):
        _blob_upload(base, repository, image.blob_path(blob.digest).read_bytes(), blob.digest)
    status, headers, body = _request("PUT", f"{base}/v2/{repository}/manifests/{image.tag}", image.manifest,
                                     {"Content-Type": MANIFEST_TYPE, "Content-Length": str(len(image.manifest))})
    if status != 201:
        raise RegistryError(f"PUT manifest {repository}:{image.tag} to {registry}: {status} {body[:300]!r}")
    reported = headers.get("Docker-Content-Digest") or headers.get("docker-content-digest") or ""
    if reported != image.digest:
        raise RegistryError(f"{registry} stored {repository}:{image.tag} as {reported or 'no digest'}, "
                            f"not {image.digest}")
    return reported


def push_all(registry: str, base_root: Path, cache: Path, release_dirs: Sequence[Path] = (),
             versions: Iterable[str] | None = None, repository: str = REPOSITORY,
             log: Callable[[str], None] = print) -> dict[str, str]:
    """Build every serving image (`versions`, or serving_versions(release_dirs)) and push it to `registry`;
    {version: manifest digest "sha256:..."}."""
    wanted = list(versions) if versions is not None else serving_versions(release_dirs)
    started = time.monotonic()
    images = build_images(base_root, cache, wanted, log)
    built = time.monotonic()
    digests = {v: push_image(registry, image, repository) for v, image in images.items()}
    log(f"serving images {', '.join(i.tag for i in images.values())}: built in {built - started:.1f}s, "
        f"pushed to {registry}/{repository} in {time.monotonic() - built:.1f}s")
    return digests


def registry_config(root: Path, port: int) -> str:
    """docker-registry's configuration: filesystem storage under root/storage, HTTP on 127.0.0.1:port, no
    authentication, deletes disabled."""
    config = {
        "version": 0.1,
        "log": {"level": "info", "fields": {"service": "registry"}},
        "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": False},
                    "cache": {"blobdescriptor": "inmemory"}},
        "http": {"addr": f"127.0.0.1:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    return yaml.safe_dump(config, sort_keys=False)


def registry_service(root: Path, port: int) -> Service:
    """Debian's docker-registry (`docker-registry serve CONFIG`) on 127.0.0.1:port, its storage and log under
    root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "storage").mkdir(exist_ok=True)
    config = root / "config.yml"
    config.write_text(registry_config(root, port))
    return Service("registry", ["/usr/bin/docker-registry", "serve", str(config)], root / "registry.log",
                   port=port)
