#!/usr/bin/python3
"""Simulated nvidia-ctk (nvidia-container-toolkit-base): `--version`, `cdi generate`, `cdi list`.

`nvidia-ctk cdi generate [--output PATH] [--format yaml|json] [--device-name-strategy index|uuid]` writes a
CDI spec in the real tool's shape (cmd/nvidia-ctk/cdi/generate, pkg/nvcdi): `cdiVersion`, `kind`
nvidia.com/gpu, one device per GPU named by its index (or UUID), a device `all`, and spec-wide
`containerEdits`; YAML as the toolkit writes it (`---`, 4-space indentation), or JSON. Without --output
it goes to stdout; the format follows --output's extension unless --format is given.

What the edits hold is the lab's, since the lab has no /dev/nvidia* nodes and no driver libraries: the
simulated GPUs are the hardware folder (fleetsim.hw_dir(), mounted read-only as each device's edit, as a
real spec gives each device its /dev/nvidiaN), the simulated driver is fleetsim.lib_dir()/driver
(read-only, in place of libcuda.so and friends) and its runtime state fleetsim.run_dir() (writable: a
server in the container registers its GPU memory there). Each is mounted at the path a process in the
container reads by default, so the vLLM simulator there sees the GPUs and driver the host does. No hooks
(the lab has no nvidia-cdi-hook). tests/unit/test_fidelity.py KNOWN_GAPS lists the differences.

Like the real tool it needs NVML: with no driver loaded, or a driver/library mismatch, it fails (exit 1).
`nvidia-ctk cdi list [--spec-dir DIR]...` prints the CDI devices of the specs in /etc/cdi and /var/run/cdi,
sorted, after `Found N CDI devices` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

CDI_VERSION = "0.5.0"
KIND = "nvidia.com/gpu"
SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")  # tags.cncf.io/container-device-interface DefaultSpecDirs
RO = ["ro", "nosuid", "nodev", "rbind", "rprivate"]  # the toolkit's mount options for driver files
RW = ["nosuid", "nodev", "rbind", "rprivate"]


def log(level: str, message: str) -> None:
    """A logrus line as the toolkit prints it: `INFO[0000] msg` on a terminal, key=value otherwise."""
    if sys.stderr.isatty():
        sys.stderr.write(f"{level.upper()[:4]}[0000] {message}\n")
    else:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sys.stderr.write(f'time="{stamp}" level={level} msg={json.dumps(message)}\n')


def mount(path: str, options: list[str]) -> dict:
    return {"hostPath": path, "containerPath": path, "options": list(options)}


def nvml_devices(strategy: str) -> list[tuple[str, fleetsim.Gpu]]:
    """(CDI device name, GPU) per GPU NVML enumerates; SimError with the toolkit's message when NVML fails."""
    try:
        fleetsim.package_info("driver")
    except fleetsim.SimError as exc:
        raise fleetsim.SimError("failed to generate CDI spec: failed to create device CDI specs: failed to "
                                "initialize NVML: ERROR_LIBRARY_NOT_FOUND", 1) from exc
    try:
        fleetsim.nvml_init()
    except fleetsim.SimError as exc:
        reason = "Driver/library version mismatch" if exc.code == 18 else "Driver Not Loaded"
        raise fleetsim.SimError("failed to generate CDI spec: failed to create device CDI specs: failed to "
                                f"initialize NVML: {reason}", 1) from exc
    gpus = fleetsim.load_hardware().gpus()
    return [(str(g.index) if strategy == "index" else g.uuid, g) for g in gpus]


def generate_spec(strategy: str = "index") -> dict:
    """The CDI spec for this host's GPUs (see the module docstring for what the edits mount)."""
    hw = str(fleetsim.hw_dir())
    devices = [{"name": name, "containerEdits": {"mounts": [mount(hw, RO)]}} for name, _ in nvml_devices(strategy)]
    if devices:  # the merged device: every device's edits, deduplicated
        devices.append({"name": "all", "containerEdits": {"mounts": [mount(hw, RO)]}})
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": devices,
        "containerEdits": {
            "env": ["NVIDIA_VISIBLE_DEVICES=void"],
            "mounts": [mount(str(fleetsim.lib_dir() / "driver"), RO), mount(str(fleetsim.run_dir()), RW)],
        },
    }


def _scalar(value: object) -> str:
    """A YAML scalar as go-yaml writes a string: quoted when it would read back as a number, bool or null."""
    text = str(value)
    try:
        float(text)
        ambiguous = True
    except ValueError:
        ambiguous = text.lower() in ("", "true", "false", "null", "~", "yes", "no", "on", "off")
    if ambiguous or re.search(r"^(?:[?:,\[\]{}#&*!|>'\"%@`]|- |-$)|: | #|\s$", text):
        return json.dumps(text)
    return text


def to_yaml(value: object, indent: int = 0, key_column: int | None = None) -> list[str]:
    """The toolkit's YAML layout (go-yaml, 4-space indentation) for the spec's types.

    A block at `indent` has its nested blocks at indent + 4; a mapping that is a sequence item starts on
    its dash line, its keys two columns right of the dash (`key_column`), its nested blocks still at the
    dash's column + 4 (as the capture shows: `    - name: "0"` / `      containerEdits:` / `        deviceNodes:`).
    """
    lines: list[str] = []
    if isinstance(value, dict):
        pad = " " * (indent if key_column is None else key_column)
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines += to_yaml(item, indent + 4)
            else:
                lines.append(f"{pad}{key}: {_scalar(item) if item != [] else '[]'}")
    elif isinstance(value, list):
        pad = " " * indent
        for item in value:
            if isinstance(item, dict):
                inner = to_yaml(item, indent, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def render(spec: dict, fmt: str) -> str:
    """The spec as the toolkit writes it: YAML after a `---` line, or JSON."""
    if fmt == "json":
        return json.dumps(spec, separators=(",", ":"))  # json.Marshal: compact, no newline
    return "---\n" + "\n".join(to_yaml(spec)) + "\n"


def spec_devices(path: str) -> list[str]:
    """Qualified device names in a spec file (JSON, or YAML in the layout `cdi generate` writes)."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        spec = json.loads(text)
        kind, names = spec["kind"], [d["name"] for d in spec.get("devices", [])]
    else:
        match = re.search(r"^kind: *(\S+)", text, re.MULTILINE)
        if match is None:
            raise ValueError("no kind")
        kind = match.group(1).strip("\"'")
        block = re.search(r"^devices:\n((?:[ -].*\n)*)", text, re.MULTILINE)
        names = [n.strip().strip("\"'") for n in re.findall(r"^ {0,4}- name: *(.+)$", block.group(1) if block else "",
                                                             re.MULTILINE)]
    return [f"{kind}={n}" for n in names]


def cdi_list(spec_dirs: list[str]) -> int:
    devices: set[str] = set()
    errors = []
    for folder in spec_dirs:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith((".json", ".yaml", ".yml")) or not os.path.isfile(path):
                continue
            try:
                devices.update(spec_devices(path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                errors.append(f"{path}: {exc}")
    if errors:
        log("warning", "The following registry errors were reported:")
        for error in errors:
            log("warning", error)
    log("info", f"Found {len(devices)} CDI devices")
    for device in sorted(devices):
        print(device)
    return 0


def cdi_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nvidia-ctk cdi generate")
    parser.add_argument("--output", default="")
    parser.add_argument("--format", default=None)
    parser.add_argument("--device-name-strategy", default="index")
    parser.add_argument("--mode", "--discovery-mode", default="auto")
    args = parser.parse_args(argv)
    fmt = (args.format or "yaml").lower()
    if fmt not in ("yaml", "json"):
        log("error", f"invalid output format: {fmt}")
        return 1
    if args.format is None and args.output.lower().endswith(".json"):
        fmt = "json"
    if args.device_name_strategy not in ("index", "uuid"):
        log("error", f"invalid device name strategy: {args.device_name_strategy}")
        return 1
    if args.mode.lower() not in ("auto", "nvml"):
        log("error", f"only the auto and nvml discovery modes are simulated, not {args.mode}")
        return 1
    try:
        spec = generate_spec(args.device_name_strategy)
    except fleetsim.SimError as exc:
        log("error", exc.message)
        return exc.code
    if not spec["devices"]:
        log("error", 'failed to write spec: invalid CDI Spec: invalid spec, no devices')
        return 1
    log("info", f"Generated CDI spec with version {spec['cdiVersion']}")
    text = render(spec, fmt)
    if not args.output:
        sys.stdout.write(text)
        return 0
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(args.output)}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.output)
    return 0


def main(argv: list[str]) -> int:
    """Dispatch `--version`, `cdi generate`, `cdi list`."""
    if argv[:1] in (["--version"], ["-v"]):
        info = fleetsim.package_info("nvidia-container-toolkit-base")
        print(f"NVIDIA Container Toolkit CLI version {info['upstream_version']}\ncommit: {info['commit']}")
        return 0
    if argv[:2] == ["cdi", "generate"]:
        return cdi_generate(argv[2:])
    if argv[:2] == ["cdi", "list"]:
        parser = argparse.ArgumentParser(prog="nvidia-ctk cdi list")
        parser.add_argument("--spec-dir", action="append", default=None)
        args = parser.parse_args(argv[2:])
        dirs = args.spec_dir or [d for d in os.environ.get("NVIDIA_CTK_CDI_SPEC_DIRS", "").split(",") if d] \
            or list(SPEC_DIRS)
        return cdi_list(dirs)
    sys.stderr.write("Incorrect Usage. flag provided but not defined\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
