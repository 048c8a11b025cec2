#!/usr/bin/python3
"""Ansible module: the host's bundle manifest, /etc/fleet/bundle.json."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_manifest
short_description: Record what a role installed in the host's bundle manifest
description:
  - Keeps C(/etc/fleet/bundle.json), the host's record of the bundle it runs. Each role records its
    component after installing it; the converge ends by stamping the release and its content digest.
  - The version and hold state of each named package are read from dpkg, so the manifest says what is
    installed, not what was asked for.
  - The file is rewritten only when its content changes, so a converged host reports no change.
options:
  path:
    description: The manifest file.
    type: path
    default: /etc/fleet/bundle.json
  component:
    description: The component (role) to record. Its previous record is replaced.
    type: str
  packages:
    description: Debian packages of the component whose installed version and hold state are recorded.
    type: list
    elements: str
    default: []
  data:
    description: Other facts about the component (a version, a weights checksum).
    type: dict
    default: {}
  release:
    description: Stamp the release (bundle) the host converged to.
    type: str
  digest:
    description:
      - With I(release), the bundle's content digest (sha256, 64 lowercase hex digits; the C(fleet_bundle_digest)
        filter, C(Bundle.digest) in patching/release/bundle.py), stamped beside the release so the host's
        release is known by its content, not only its name.
      - Stamping a release without it drops any digest recorded before (it belonged to an earlier stamp).
    type: str
  components:
    description: With I(release), the components the host has; records of any other are dropped.
    type: list
    elements: str
author:
  - GPU fleet platform team
"""

EXAMPLES = r"""
- name: Record the driver
  fleet_manifest:
    component: gpu_driver
    packages: [cuda-drivers-580]
    data:
      version: 580.82.07

- name: Stamp the release
  fleet_manifest:
    release: "2026-10"
    digest: "{{ 'releases/2026-10.yaml' | fleet_bundle_digest }}"
    components: [gpu_driver, cuda_toolkit]
"""

RETURN = r"""
manifest:
  description: The manifest after the change.
  returned: always
  type: dict
"""

import json  # noqa: E402 - Ansible modules start with their documentation
import os  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

FORMAT = 1
DIGEST = re.compile(r"^[0-9a-f]{64}$")


def dpkg_state(module: AnsibleModule, packages: list[str]) -> dict[str, dict]:
    """Installed version and hold state of each package; fails the module for one not installed."""
    if not packages:
        return {}
    rc, out, err = module.run_command(["dpkg-query", "-W", "-f=${Package}\t${Version}\t${Status}\n", *packages])
    found = {}
    for line in out.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status.endswith(" installed"):
            found[name] = {"version": version, "held": status.split()[0] == "hold"}
    missing = [p for p in packages if p not in found]
    if missing:
        module.fail_json(msg=f"not installed, cannot record: {', '.join(missing)}", stderr=err, rc=rc)
    return {p: found[p] for p in packages}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "default": "/etc/fleet/bundle.json"},
            "component": {"type": "str"},
            "packages": {"type": "list", "elements": "str", "default": []},
            "data": {"type": "dict", "default": {}},
            "release": {"type": "str"},
            "digest": {"type": "str"},
            "components": {"type": "list", "elements": "str"},
        },
        required_one_of=[("component", "release")],
        required_by={"components": "release", "digest": "release"},
        supports_check_mode=True,
    )
    p = module.params
    path = p["path"]
    if p["digest"] is not None and not DIGEST.match(p["digest"]):
        module.fail_json(msg=f"digest must be a sha256: 64 lowercase hex digits, got {p['digest']!r}")
    try:
        with open(path) as f:
            before = json.load(f)
        if not isinstance(before, dict):
            before = {}
    except FileNotFoundError:
        before = {}
    except ValueError:
        module.warn(f"{path} was not valid JSON; starting a new manifest")
        before = {}

    after = json.loads(json.dumps(before))
    after["format"] = FORMAT
    components = after.setdefault("components", {})
    if p["component"]:
        components[p["component"]] = {**p["data"], "packages": dpkg_state(module, p["packages"])}
    if p["release"]:
        after["release"] = p["release"]
        if p["digest"] is not None:
            after["digest"] = p["digest"]
        else:
            after.pop("digest", None)
        if p["components"] is not None:
            after["components"] = {k: v for k, v in components.items() if k in p["components"]}

    text = json.dumps(after, indent=2, sort_keys=True) + "\n"
    old_text = json.dumps(before, indent=2, sort_keys=True) + "\n" if before else ""
    changed = text != old_text
    if changed and not module.check_mode:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bundle.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        module.atomic_move(tmp, path)
    module.exit_json(changed=changed, manifest=after, diff={"before": old_text, "after": text})


if __name__ == "__main__":
    main()
