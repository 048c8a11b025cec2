"""The post-maintenance checklist: pytest-testinfra checks of every host against one bundle.

    pytest tests/hosts --bundle releases/2026-10.yaml --ansible-inventory INVENTORY \\
        [--hosts 'ansible://PATTERN'] -n auto --dist loadgroup --junitxml reports/verify.xml

(`fleet verify --release F --inventory I` runs exactly this, with a progress display and a summary.)
Expected values come from the bundle and the host's inventory vars; what the host has comes from
its own tools, read with patching/hosts/facts.py's parsers. Each check asserts one fact and fails with
"<host>: <what>: expected <value>, found <value>". All checks of a host run on one xdist worker
(`--dist loadgroup`), so hosts are checked in parallel and each host's tools run once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from infra.model.errors import InputError, load_yaml
from patching.release.bundle import Bundle, load_bundle
from patching.release.pins import all_pinned_packages, host_pins
from tests.hosts.checks import HostReadings


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fleet host checks")
    group.addoption("--bundle", metavar="FILE", help="the release manifest the hosts must run (required)")
    group.addoption("--ups-min-charge", type=float, default=80.0, metavar="PERCENT",
                    help="lowest UPS battery charge that passes (default 80)")
    group.addoption("--host-vars", metavar="FILE",
                    help="YAML mapping of the fleet_* vars to check against, for hosts not reached through an "
                         "Ansible inventory (e.g. --hosts local:// on the host itself)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): checks of one host, kept on one xdist worker")
    # testinfra's ansible backend runs `ansible-inventory` from PATH: take the one beside this Python
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if config.getoption("--help"):
        return
    if config.getoption("--bundle") is None:
        raise pytest.UsageError("the host checks need the bundle the hosts must run: --bundle releases/YYYY-MM.yaml")
    if config.option.hosts is None:
        if not config.option.ansible_inventory:
            # without either, testinfra would check the machine pytest runs on
            raise pytest.UsageError("name the hosts: --ansible-inventory INVENTORY [--hosts 'ansible://PATTERN'], "
                                    "or --hosts local:// --host-vars FILE to check this machine")
        config.option.hosts = "ansible://all"
    elif not str(config.option.hosts).startswith("ansible://") and config.getoption("--host-vars") is None:
        raise pytest.UsageError(f"--hosts {config.option.hosts}: hosts outside an Ansible inventory need "
                                "--host-vars FILE (the fleet_* vars their checks expect)")


def _load(config: pytest.Config) -> Bundle:
    try:
        return load_bundle(config.getoption("--bundle"))
    except InputError as exc:
        raise pytest.UsageError(str(exc)) from exc


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pinned_package" in metafunc.fixturenames:
        metafunc.parametrize("pinned_package", all_pinned_packages(_load(metafunc.config)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # one xdist group per host: with --dist loadgroup a host's checks share a worker and its caches
    for item in items:
        spec = getattr(item, "callspec", None)
        host = spec.params.get("_testinfra_host") if spec else None
        if host is not None:
            item.add_marker(pytest.mark.xdist_group(host.backend.get_pytest_id()))


@pytest.fixture(scope="session")
def bundle(pytestconfig: pytest.Config) -> Bundle:
    return _load(pytestconfig)


def _inventory_name(host: Any) -> str:
    return getattr(host.backend, "host", None) or host.backend.get_hostname()


@pytest.fixture(scope="module")
def name(host) -> str:
    """The host's inventory name, as every message names it."""
    return _inventory_name(host)


@pytest.fixture(autouse=True)
def _host_property(request: pytest.FixtureRequest) -> None:
    # JUnit <property> elements, and `fleet verify`, read the host and the check from here: test ids
    # join host and parameters with "-", which host names contain too
    if "host" not in request.fixturenames:
        return
    spec = getattr(request.node, "callspec", None)
    params = [str(v) for k, v in (spec.params.items() if spec else ()) if k != "_testinfra_host"]
    check = request.node.originalname.removeprefix("test_") + (f"[{','.join(params)}]" if params else "")
    request.node.user_properties += [("host", _inventory_name(request.getfixturevalue("host"))), ("check", check)]


def _host_vars_file(path: str) -> dict[str, Any]:
    try:
        data = load_yaml(path)
    except InputError as exc:
        raise pytest.UsageError(str(exc)) from exc
    if not isinstance(data, dict):
        raise pytest.UsageError(f"{path}: expected a mapping of host vars, found {type(data).__name__}")
    return data


@pytest.fixture(scope="module")
def hostvars(host, pytestconfig: pytest.Config) -> dict[str, Any]:
    path = pytestconfig.getoption("--host-vars")
    return _host_vars_file(path) if path else host.ansible.get_variables()


@pytest.fixture(scope="module")
def pins(bundle: Bundle, hostvars: dict[str, Any]) -> dict[str, str]:
    return host_pins(bundle, hostvars)


_FACTS: dict[str, HostReadings] = {}


@pytest.fixture(scope="module")
def facts(host, name: str, hostvars: dict[str, Any], bundle: Bundle) -> HostReadings:
    if name not in _FACTS:
        _FACTS[name] = HostReadings(host, hostvars, all_pinned_packages(bundle))
    return _FACTS[name]
