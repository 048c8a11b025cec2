"""The post-maintenance checklist: pytest-testinfra checks of every host against one bundle.

    pytest tests/hosts --bundle releases/2026-10.yaml --ansible-inventory INVENTORY \\
        [--hosts 'ansible://PATTERN'] --junitxml reports/verify.xml

(`fleet verify --release F --inventory I` runs exactly this, with a progress display and a summary.)
Before the first check every host is read at once, a thread and one SSH session per host running every command
its checks will ask for (tests/hosts/checks.py HostReadings.read_all); the checks then judge what was read.
Expected values come from the bundle and the host's inventory vars; what the host has comes from
its own tools, read with patching/hosts/facts.py's parsers. Each check asserts one fact and fails with
"<host>: <what>: expected <value>, found <value>". Under xdist, all checks of a host run on one worker
(`--dist loadgroup`), which reads the host when it reaches it.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
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
    group.addoption("--command-by-command", action="store_true",
                    help="no reading ahead: each check runs its own command when it runs, host after host without "
                         "xdist (slower; for comparison and debugging)")
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


def _testinfra_host(item: pytest.Item) -> Any:
    """The testinfra host a check runs against (None for an item without one)."""
    spec = getattr(item, "callspec", None)
    return spec.params.get("_testinfra_host") if spec else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # one xdist group per host: with --dist loadgroup a host's checks share a worker and its caches
    for item in items:
        if (host := _testinfra_host(item)) is not None:
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


def _hostvars(host: Any, config: pytest.Config) -> dict[str, Any]:
    path = config.getoption("--host-vars")
    return _host_vars_file(path) if path else host.ansible.get_variables()


@pytest.fixture(scope="module")
def hostvars(host, pytestconfig: pytest.Config) -> dict[str, Any]:
    return _hostvars(host, pytestconfig)


@pytest.fixture(scope="module")
def pins(bundle: Bundle, hostvars: dict[str, Any]) -> dict[str, str]:
    return host_pins(bundle, hostvars)


_FACTS: dict[str, HostReadings] = {}


def _readings(host: Any, config: pytest.Config, bundle: Bundle) -> HostReadings:
    """The host's readings, made once per process: every command its checks will run, read in one SSH session."""
    name = _inventory_name(host)
    if name not in _FACTS:
        _FACTS[name] = HostReadings(host, _hostvars(host, config), all_pinned_packages(bundle), bundle)
        if not config.getoption("--command-by-command"):
            _FACTS[name].read_all()
    return _FACTS[name]


@pytest.fixture(scope="session", autouse=True)
def _read_every_host_at_once(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> None:
    """Before the first check, read every host at once: one thread and one SSH session per host, so the checks
    that follow only judge what was read. Under xdist each worker reads its hosts as it reaches them."""
    if hasattr(pytestconfig, "workerinput") or pytestconfig.getoption("--command-by-command"):
        return
    hosts: dict[str, Any] = {}
    for item in request.session.items:
        if (host := _testinfra_host(item)) is not None:
            hosts.setdefault(_inventory_name(host), host)
    if len(hosts) < 2:
        return
    bundle = _load(pytestconfig)
    if pytestconfig.getoption("--host-vars") is None:
        for host in hosts.values():  # the inventory is parsed once, before the threads share it
            host.ansible.get_variables()
    with ThreadPoolExecutor(max_workers=min(32, len(hosts)), thread_name_prefix="read-host") as pool:
        for future in [pool.submit(_readings, host, pytestconfig, bundle) for host in hosts.values()]:
            future.result()


@pytest.fixture(scope="module")
def facts(host, pytestconfig: pytest.Config, bundle: Bundle) -> HostReadings:
    return _readings(host, pytestconfig, bundle)
