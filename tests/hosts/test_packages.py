"""Every package the bundle pins is installed at its exact version, and held (apt preferences alone
do not stop `apt install pkg`; a dpkg hold alone does not stop a pinned upgrade: both, ansible 53918)."""

from __future__ import annotations

from patching.release.bundle import CONTAINER_TOOLKIT_PACKAGES
from tests.hosts.checks import expect, only_where


def test_pinned_version(name, facts, pins, pinned_package):
    only_where(pinned_package in pins, name, f"{pinned_package} is not pinned on this kind of host")
    state = facts.dpkg.get(pinned_package)
    expect(state is not None and state.version == pins[pinned_package], name, pinned_package,
           pins[pinned_package], state.version if state else "not installed")


def test_pinned_held(name, facts, pins, pinned_package):
    only_where(pinned_package in pins, name, f"{pinned_package} is not pinned on this kind of host")
    state = facts.dpkg.get(pinned_package)
    expect(state is not None and state.held, name, f"{pinned_package} hold", "held (dpkg --set-selections hold)",
           "not installed" if state is None else "not held")


def test_container_toolkit_one_version(name, facts):
    found = {p: facts.dpkg[p].version if p in facts.dpkg else "not installed" for p in CONTAINER_TOOLKIT_PACKAGES}
    expect(len(set(found.values())) == 1 and "not installed" not in found.values(), name,
           "container toolkit", "its four packages at one version", ", ".join(f"{p}={v}" for p, v in found.items()))


def test_manifest_release(name, facts, bundle):
    manifest = facts.manifest
    found = "no manifest" if manifest is None else manifest.get("release", "no release in it")
    expect(found == bundle.release, name, "/etc/fleet/bundle.json release", bundle.release, found)
