"""Jinja2 filters that apply the project's own release rules, so the playbooks restate none of them.

The compatibility data lives in patching/release/compat.yaml: patching/release/rules.py reads it (package
names per driver branch) and patching/release/compat.py applies its rules to a bundle, the code `fleet
release check` and every fleet command run. These filters call that code. Filters run on the controller,
where the project is installed (the venv `make venv` builds, whose ansible-playbook the fleet commands run).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ansible.errors import AnsibleFilterError


def _project(name: str) -> ModuleType:
    """A module of the fleet project."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise AnsibleFilterError(f"the fleet project is not importable by this Ansible ({exc}): run the "
                                 "ansible-playbook of the project's venv (.venv/bin/ansible-playbook)") from exc


def fleet_bundle_problems(path: Any) -> list[str]:
    """What is wrong with the bundle file at `path`, as the fleet commands say it; [] for a usable bundle.

    A file that cannot be read or does not fit the schema gives its schema problems; a valid bundle gives
    every compatibility rule of compat.yaml it breaks with an error.
    """
    errors = _project("infra.model.errors")
    try:
        bundle = _project("patching.release.bundle").load_bundle(str(path))
    except errors.InputError as exc:
        return [str(p) for p in exc.problems]
    return [str(p) for p in _project("patching.release.compat").rule_problems(bundle, str(path))]


def fleet_bundle_digest(path: Any) -> str:
    """The content digest of the bundle file at `path` (sha256 hex), `Bundle.digest`: the one definition.

    The converge stamps it beside the release in the host manifest; the fleet commands compare it with the
    digest of the bundle they were given. A file that is not a valid bundle fails with its problems.
    """
    errors = _project("infra.model.errors")
    try:
        bundle = _project("patching.release.bundle").load_bundle(str(path))
    except errors.InputError as exc:
        raise AnsibleFilterError("; ".join(str(p) for p in exc.problems)) from exc
    return str(bundle.digest)


def fleet_fabric_manager_package(branch: Any) -> str:
    """The fabric manager's Debian package on a driver branch: nvidia-fabricmanager[-<branch>]."""
    return _project("patching.release.rules").fabric_manager_package(int(branch))


def fleet_nscq_package(branch: Any) -> str:
    """libnvidia-nscq's Debian package on a driver branch: libnvidia-nscq[-<branch>]."""
    return _project("patching.release.rules").nscq_package(int(branch))


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "fleet_bundle_problems": fleet_bundle_problems,
            "fleet_bundle_digest": fleet_bundle_digest,
            "fleet_fabric_manager_package": fleet_fabric_manager_package,
            "fleet_nscq_package": fleet_nscq_package,
        }
