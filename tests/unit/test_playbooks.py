"""The roles' shape (STYLE.md), the bundle -> knobs mapping against patching/release/pins.py, and ansible-lint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.model.errors import InputError
from infra.model.fleet import load_stack
from infra.model.inventory import build_inventory
from patching.release.bundle import load_bundle
from patching.release.compat import rule_problems
from patching.release.pins import host_pins

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOKS = ROOT / "playbooks"
ROLES = PLAYBOOKS / "roles"
BIN = Path(sys.executable).parent
# The platforms the roles support (meta/main.yml) as their facts: distribution, major version, os_family
DISTRIBUTIONS = {"Debian": ("Debian", "12", "Debian"), "Ubuntu-22": ("Ubuntu", "22", "Debian"),
                 "Ubuntu-24": ("Ubuntu", "24", "Debian")}
# Each role's first_found over its vars/: the release's file, the distribution's, the family's
DISTRIBUTION_VARS_SEARCH = [
    "{{ ansible_facts['distribution'] }}-{{ ansible_facts['distribution_major_version'] }}.yml",
    "{{ ansible_facts['distribution'] }}.yml",
    "{{ ansible_facts['os_family'] }}.yml",
]
# roles that run on the controller or touch nothing distribution-specific
CONTROLLER_ROLES = {"lb_member"}
# roles the others include for one shared step: not a component, no distribution vars (names come from the caller)
SHARED_ROLES = {"pinned_packages"}
# roles site.yml includes after the converge on the hosts of a component, outside the platform table (no manifest
# record): the GPU diagnostics the hardware gate runs, on GPU hosts
SITE_ROLES = {"gpu_diagnostics": "gpu_driver"}


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _roles() -> list[str]:
    return sorted(p.name for p in ROLES.iterdir() if p.is_dir())


def _table() -> list[dict]:
    return _yaml(PLAYBOOKS / "group_vars/all/platform.yml")["fleet_platform_table"]


def _distribution_vars(role: str, distribution: str) -> Path | None:
    """The vars file the role's first_found picks on that platform (DISTRIBUTION_VARS_SEARCH), if any."""
    name, major, family = DISTRIBUTIONS[distribution]
    for candidate in (f"{name}-{major}.yml", f"{name}.yml", f"{family}.yml"):
        if (ROLES / role / "vars" / candidate).is_file():
            return ROLES / role / "vars" / candidate
    return None


@pytest.mark.parametrize("role", _roles())
def test_role_has_defaults_specs_and_distribution_vars(role):
    path = ROLES / role
    for name in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (path / name).is_file(), f"{role}: {name} missing"
    if role not in CONTROLLER_ROLES | SHARED_ROLES:
        for distribution in DISTRIBUTIONS:
            assert _distribution_vars(role, distribution), f"{role}: no vars file for {distribution}"
    defaults = _yaml(path / "defaults/main.yml") or {}
    options = _yaml(path / "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert all(k.startswith(f"{role}_") for k in [*defaults, *options]), f"{role}: knobs must start with {role}_"
    assert set(defaults) <= set(options), f"{role}: undocumented knobs {set(defaults) - set(options)}"
    for name, spec in options.items():
        if spec.get("required"):
            assert name not in defaults, f"{role}: required knob {name} has a default, so it can never be missing"
        else:
            assert name in defaults, f"{role}: optional knob {name} has no default in defaults/main.yml"


@pytest.mark.parametrize("role", sorted(set(_roles()) - CONTROLLER_ROLES - SHARED_ROLES))
def test_role_picks_distribution_vars_with_first_found(role):
    """The search the tests resolve is the role's own, and no vars file repeats the one it would fall back to."""
    load = _yaml(ROLES / role / "tasks/main.yml")[0]
    assert load["vars"][f"{role}_distribution_vars"]["files"] == DISTRIBUTION_VARS_SEARCH, role
    texts = [p.read_text() for p in sorted((ROLES / role / "vars").glob("*.yml")) if p.name != "main.yml"]
    assert len(texts) == len(set(texts)), f"{role}: identical vars files; keep one, first_found falls back to it"


def test_platform_table_is_in_converge_order():
    converge = [t["ansible.builtin.include_role"]["name"] for t in _yaml(PLAYBOOKS / "tasks/converge.yml")
                if "ansible.builtin.include_role" in t]
    assert converge == [row["component"] for row in _table()]
    assert set(converge) == set(_roles()) - CONTROLLER_ROLES - SHARED_ROLES - set(SITE_ROLES)
    play = next(p for p in _yaml(PLAYBOOKS / "site.yml") if p["name"] == "Converge hosts to the bundle")
    included = {t["ansible.builtin.include_role"]["name"]: t["when"] for t in play["tasks"]
                if "ansible.builtin.include_role" in t}
    assert included == {role: f"'{component}' in fleet_apply_components" for role, component in SITE_ROLES.items()}


def _stub_roles(tmp_path: Path) -> Path:
    """A role per component whose one task says it ran: the converge's includes, not the roles, under test."""
    for row in _table():
        tasks = tmp_path / "roles" / row["component"] / "tasks"
        tasks.mkdir(parents=True)
        (tasks / "main.yml").write_text(yaml.safe_dump([{"name": "Ran", "ansible.builtin.debug": {"msg": "ran"}}]))
    return tmp_path / "roles"


@pytest.mark.parametrize(("asked", "expected"), [
    (None, None),  # every component of the host
    ({"v3-aws-0": ["model_serving"]}, ["model_serving"]),
    ({"v3-aws-0": ["model_serving", "gpu_driver", "fabric_manager", "ofed"]},
     ["gpu_driver", "fabric_manager", "model_serving"]),
    ({"v3-aws-0": []}, []),
    ({"dgx-a1": ["ofed"]}, None),  # named for another host only
])
def test_a_patch_runs_the_roles_of_the_components_it_names_only(tmp_path, asked, expected):
    """converge.yml's includes (its manifest stamp left out), Ansible judging their `when`s, on a lab host
    (p4d: GPU, NVSwitch, EFA; no InfiniBand, no UPS): a role the patch does not name runs no task, nor one
    the host lacks."""
    includes = [t for t in _yaml(PLAYBOOKS / "tasks/converge.yml") if "ansible.builtin.include_role" in t]
    playbook = tmp_path / "converge.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Converge", "hosts": "all", "gather_facts": False,
                                         "connection": "local", "tasks": includes}]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json", "ANSIBLE_ROLES_PATH": str(_stub_roles(tmp_path))}
    extra = ["-e", json.dumps({"fleet_patch_components": asked})] if asked is not None else []
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(_lab_inventory(tmp_path)), str(playbook),
                           "--limit", "v3-aws-0", "-e", f"ansible_python_interpreter={sys.executable}",
                           "-e", f"@{PLAYBOOKS}/group_vars/all/platform.yml", *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ran = [t["task"]["name"].split(" : ")[0] for t in json.loads(proc.stdout)["plays"][0]["tasks"]
           if t["task"]["name"].endswith(" : Ran") and not t["hosts"]["v3-aws-0"].get("skipped")]
    everything = ["vendor_repo", "gpu_driver", "fabric_manager", "cuda_toolkit", "efa", "container_toolkit",
                  "model_serving"]
    assert ran == (everything if expected is None else expected)


@pytest.mark.parametrize("asked", ['{"fleet_patch_components": {"v3-aws-0": ["kernel"]}}',
                                   '{"fleet_patch_components": {"v3-aws-0": "model_serving"}}',
                                   '{"fleet_patch_components": ["model_serving"]}'])
def test_check_bundle_refuses_components_the_platform_table_lacks(tmp_path, asked):
    playbook = tmp_path / "check.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Check", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Check", "ansible.builtin.import_tasks": str(PLAYBOOKS / "tasks/check-bundle.yml")}]}]))
    proc = _ansible_json("ansible-playbook", "-i", str(_lab_inventory(tmp_path)), str(playbook),
                         "-e", f"@{PLAYBOOKS}/group_vars/all/bundle.yml",
                         "-e", f"@{PLAYBOOKS}/group_vars/all/platform.yml",
                         "-e", f"bundle_file={ROOT / 'releases/2026-11.yaml'}",
                         "-e", "fleet_artifacts_url=http://artifacts.example", "-e", asked)
    assert proc.returncode != 0
    failed = [r for task in json.loads(proc.stdout)["plays"][0]["tasks"] for r in task["hosts"].values()
              if r.get("failed")]
    assert failed and failed[0]["msg"].startswith("fleet_patch_components: expected"), failed


def _tasks(path: Path) -> list[dict]:
    """Every task of a task file, blocks flattened."""
    out = []
    for task in _yaml(path) or []:
        out += [t for part in ("block", "rescue", "always") for t in task.get(part, [])] or [task]
    return out


def test_packages_are_pinned_installed_and_held_in_one_place():
    """Every role that installs vendor packages includes pinned_packages; none pins, installs or holds itself."""
    pinning = {"container_toolkit", "cuda_toolkit", "efa", "fabric_manager", "gpu_diagnostics", "gpu_driver",
               "ofed"}
    for role in sorted(set(_roles()) - SHARED_ROLES):
        files = sorted((ROLES / role / "tasks").glob("*.yml"))
        tasks = [t for path in files for t in _tasks(path)]
        includes = [t["ansible.builtin.include_role"]["name"] for t in tasks if "ansible.builtin.include_role" in t]
        assert ("pinned_packages" in includes) == (role in pinning), role
        assert not [t["name"] for t in tasks if "ansible.builtin.dpkg_selections" in t], role
        assert "preferences.d" not in "".join(p.read_text() for p in files), role
        if role in pinning:
            assert not [t["name"] for t in tasks if "ansible.builtin.apt" in t], role


def _lab_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(build_inventory(load_stack("lab", ROOT))))
    return path


def _branch_570(tmp_path: Path) -> Path:
    """A bundle on a pre-R580 branch, where fabric manager and nscq packages carry the branch."""
    data = _yaml(ROOT / "releases/2026-10.yaml")
    data.update(release="2025-06", driver={"version": "570.172.08"}, fabric_manager="570.172.08",
                nscq="570.172.08", cuda="12.8.1")
    path = tmp_path / "2025-06.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


PIN_EXPRESSION = (
    "{{ gpu_driver_packages | combine(cuda_toolkit_packages, container_toolkit_packages,"
    " fabric_manager_packages if 'fabric_manager' in fleet_components else {},"
    " ofed_packages if 'ofed' in fleet_components else {}) }}"
)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("release", ["2026-10", "2026-11", "branch-570"])
def test_roles_pin_what_the_bundle_pins(tmp_path, distribution, release):
    """group_vars + each role's vars give every lab host the packages patching/release/pins.py expects."""
    bundle_path = _branch_570(tmp_path) if release == "branch-570" else ROOT / f"releases/{release}.yaml"
    inventory = _lab_inventory(tmp_path)
    args = ["-e", f"@{PLAYBOOKS}/group_vars/all/bundle.yml", "-e", f"@{PLAYBOOKS}/group_vars/all/platform.yml"]
    for role in _roles():
        for path in (ROLES / role / "vars/main.yml", _distribution_vars(role, distribution)):
            if path is not None and path.is_file():
                args += ["-e", f"@{path}"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json"}
    proc = subprocess.run([str(BIN / "ansible"), "all", "-i", str(inventory), "-m", "ansible.builtin.debug",
                           "-a", "var=fleet_test_pins", *args, "-e", f"bundle_file={bundle_path}",
                           "-e", json.dumps({"fleet_test_pins": PIN_EXPRESSION})],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rendered = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]
    hostvars = _yaml(inventory)["all"]["hosts"]
    bundle = load_bundle(bundle_path)
    assert set(rendered) == set(hostvars)
    for host, result in rendered.items():
        assert result["fleet_test_pins"] == host_pins(bundle, hostvars[host]), host


def _ansible_json(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json"}
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, cwd=ROOT)


def _mismatched_fabric_manager(tmp_path: Path) -> Path:
    data = _yaml(ROOT / "releases/2026-10.yaml")
    data["fabric_manager"] = "580.95.05"
    path = tmp_path / "fm-mismatch.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("bundle", ["fm-mismatch", "missing", "not-a-bundle"])
def test_site_refuses_a_bad_bundle_with_the_fleet_commands_problems(tmp_path, bundle):
    """check-bundle.yml applies compat.yaml's rules and the schema through patching/release (one source):
    the run stops before the first host is touched, with the problems `fleet release check` names."""
    if bundle == "fm-mismatch":
        path = _mismatched_fabric_manager(tmp_path)
        expected = [str(p) for p in rule_problems(load_bundle(path), str(path))]
        assert expected and all("[fabric-manager-equals-driver]" in e for e in expected)
    else:
        path = tmp_path / f"{bundle}.yaml"
        if bundle == "not-a-bundle":
            path.write_text("release: 2026-13\n")
        with pytest.raises(InputError) as refused:
            load_bundle(path)
        expected = [str(p) for p in refused.value.problems]
    proc = _ansible_json("ansible-playbook", "-i", str(_lab_inventory(tmp_path)), "playbooks/site.yml",
                         "-e", f"bundle_file={path}")
    assert proc.returncode != 0
    plays = json.loads(proc.stdout)["plays"]
    assert [p["play"]["name"] for p in plays] == ["Check the bundle before touching any host"]
    failed = [r for task in plays[0]["tasks"] for r in task["hosts"].values() if r.get("failed")]
    assert failed and failed[0]["msg"] == "; ".join(expected)


def test_check_bundle_passes_the_releases(tmp_path):
    playbook = tmp_path / "check.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Check", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": "Check", "ansible.builtin.import_tasks": str(PLAYBOOKS / "tasks/check-bundle.yml")}]}]))
    inventory = str(_lab_inventory(tmp_path))
    for release in ("2026-10", "2026-11"):
        proc = _ansible_json("ansible-playbook", "-i", inventory, str(playbook),
                             "-e", f"@{PLAYBOOKS}/group_vars/all/bundle.yml",
                             "-e", f"bundle_file={ROOT / 'releases' / f'{release}.yaml'}",
                             "-e", "fleet_artifacts_url=http://artifacts.example")  # the lab sets its own
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _keys(data) -> set:
    """Every mapping key anywhere in a YAML document."""
    if isinstance(data, dict):
        return set(data) | {k for v in data.values() for k in _keys(v)}
    return {k for v in data for k in _keys(v)} if isinstance(data, list) else set()


def test_patch_leaves_the_reboot_to_the_runner_and_site_does_not():
    """patch.yml converges with gpu_driver_reboot_deferred (the runner's rebooting state reboots); nothing
    else sets it, so site.yml (fleet converge) keeps the role's default: it reboots."""
    imports = [p for p in _yaml(PLAYBOOKS / "patch.yml") if "ansible.builtin.import_playbook" in p]
    assert [(p["ansible.builtin.import_playbook"], p["vars"]) for p in imports] == [
        ("site.yml", {"gpu_driver_reboot_deferred": True})]
    assert _yaml(ROLES / "gpu_driver/defaults/main.yml")["gpu_driver_reboot_deferred"] is False
    setters = [p.relative_to(PLAYBOOKS) for p in PLAYBOOKS.rglob("*.yml")
               if "gpu_driver_reboot_deferred" in _keys(_yaml(p)) and ROLES / "gpu_driver" not in p.parents]
    assert setters == [Path("patch.yml")]


@pytest.mark.parametrize(("case", "smi", "knobs", "failed_at", "pending"), [
    ("patch, driver changed", (18, "Failed to initialize NVML: Driver/library version mismatch"),
     {"gpu_driver_reboot_deferred": True}, None, True),
    ("patch, no driver loaded", (9, "NVIDIA-SMI has failed"), {"gpu_driver_reboot_deferred": True}, None, True),
    ("patch, driver loaded", (0, "580.95.05\n580.95.05"), {"gpu_driver_reboot_deferred": True}, None, False),
    ("converge, driver changed", (18, "Failed to initialize NVML: Driver/library version mismatch"), {},
     ("Reboot to load the installed driver", "would reboot the control node"), None),
    ("converge, driver loaded", (0, "580.95.05"), {}, None, False),
    ("converge, reboot refused", (18, "Failed to initialize NVML: Driver/library version mismatch"),
     {"gpu_driver_reboot": False}, ("Stop here when a reboot is needed but not allowed",
                                    "it takes a reboot, and gpu_driver_reboot is false"), None),
])
def test_gpu_driver_reboot_owner(tmp_path, case, smi, knobs, failed_at, pending):
    """gpu_driver's reboot step on this machine (local connection, where ansible's reboot refuses to reboot
    the controller: a reboot attempt fails that task) with a stand-in nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '%s\\n' '{smi[1]}'\nexit {smi[0]}\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    playbook = tmp_path / "reboot.yml"
    playbook.write_text(yaml.safe_dump([{"name": "Reboot step", "hosts": "localhost", "gather_facts": False,
                                         "tasks": [
        {"name": "Reboot", "ansible.builtin.include_role": {"name": "gpu_driver", "tasks_from": "reboot"},
         "vars": {"gpu_driver_version": "580.95.05", **knobs}},
        {"name": "Knobs", "ansible.builtin.debug": {"msg": "{{ [gpu_driver_reboot_pending, fabric_manager_start,"
                                                           " model_serving_start] }}"}},
    ]}]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
           "ANSIBLE_STDOUT_CALLBACK": "json", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
                           "-e", f"ansible_python_interpreter={sys.executable}",
                           "-e", f"@{PLAYBOOKS}/group_vars/all/platform.yml"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    tasks = {task["task"]["name"].split(" : ")[-1]: task["hosts"]["localhost"]  # without "gpu_driver : "
             for task in json.loads(proc.stdout)["plays"][0]["tasks"]}
    failed = [name for name, result in tasks.items() if result.get("failed")]
    if failed_at:
        assert proc.returncode != 0 and failed == [failed_at[0]], case
        assert failed_at[1] in tasks[failed_at[0]]["msg"], case
        return
    assert proc.returncode == 0 and not failed, (case, proc.stdout[-3000:])
    assert tasks["Reboot to load the installed driver"].get("skipped"), case
    assert tasks["Knobs"]["msg"] == [pending, not pending, not pending], case


def test_converge_stamps_the_digest_patching_computes(tmp_path, bundle_data):
    """The release stamp carries the bundle's content digest, and the playbooks get it from Bundle.digest
    (the fleet_bundle_digest filter), so hosts and the fleet commands compare one definition."""
    stamp = [t for t in _yaml(PLAYBOOKS / "tasks/converge.yml") if "fleet_manifest" in t][-1]["fleet_manifest"]
    assert stamp["release"] == "{{ fleet_bundle_release }}" and stamp["digest"] == "{{ fleet_bundle_digest }}"
    reformatted = tmp_path / "reformatted.yaml"
    reformatted.write_text(yaml.safe_dump(bundle_data, sort_keys=True, default_flow_style=True))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**bundle_data, "nscq": "580.82.07"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("release: 2026-13\n")
    digests = {}
    for path in (ROOT / "releases/2026-11.yaml", reformatted, other, bad):
        proc = _ansible_json("ansible", "localhost", "-c", "local", "-m", "ansible.builtin.debug",
                             "-a", "msg={{ fleet_bundle_digest }}", "-e", f"@{PLAYBOOKS}/group_vars/all/bundle.yml",
                             "-e", f"bundle_file={path}")
        digests[path.name] = json.loads(proc.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    nov = load_bundle(ROOT / "releases/2026-11.yaml").digest
    assert digests["2026-11.yaml"]["msg"] == digests["reformatted.yaml"]["msg"] == nov, digests
    assert digests["other.yaml"]["msg"] == load_bundle(other).digest != nov
    assert digests["bad.yaml"]["failed"] and "release" in digests["bad.yaml"]["msg"]


def test_ansible_lint_production_profile():
    proc = subprocess.run([str(BIN / "ansible-lint"), "--offline", "playbooks/"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
