"""The lab's host image: one debootstrap'd Debian bookworm, built once and cached on disk.

The cache directory name carries a hash of the recipe below, so changing the recipe builds a new
base and an unchanged one is reused. Every lab host is an overlayfs upper dir on top of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict


class Recipe(TypedDict):
    """What the base image is built from: debootstrap suite, variant, extra packages, setup revision."""

    suite: str
    variant: str
    include: list[str]
    setup: int


RECIPE: Recipe = {
    "suite": "bookworm",
    "variant": "minbase",
    # what a real server of ours has before Ansible: systemd, sshd, python for Ansible, apt tooling,
    # and the NUT client the UPS role configures; podman and crun are Debian's, which the model_serving
    # role installs (present here so a lab converge needs no package mirror)
    "include": [
        "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "iproute2",
        "procps", "ca-certificates", "curl", "nut-client", "sudo", "less", "gnupg", "podman", "crun",
        "netavark",  # podman needs a container-network-stack; debootstrap resolves no virtual package
        # cloud-init, as on an Ubuntu AMI: the lab's cloud-like hosts boot with it (lab/cloud.py), the others
        # carry /etc/cloud/cloud-init.disabled. python3-cryptography needs python3-cffi-backend-api-max, a
        # virtual package python3-cffi-backend provides
        "cloud-init", "python3-cffi-backend",
    ],
    # bump when the post-install setup in `_configure` changes
    "setup": 3,
}

# Units that make no sense in a container and only slow boots down.
MASKED_UNITS = [
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
    "systemd-networkd-wait-online.service", "getty@tty1.service", "console-getty.service",
    "nut-monitor.service",  # started by the UPS role once it is configured
]


def recipe_hash() -> str:
    """Short hash of RECIPE; it names the cached base image, so a changed recipe builds a new one."""
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def ensure_base(cache: Path, log: Callable[[str], None] = print) -> Path:
    """Return the cached base image for the current recipe, building it (about a minute) if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"base-{recipe_hash()}"
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two labs starting at once build it once
        if (target / ".fleet-lab-base").exists():
            return target
        work = cache / f"building-{recipe_hash()}"
        if work.exists():
            shutil.rmtree(work)
        log(f"building the lab's Debian {RECIPE['suite']} base image in {target} (cached afterwards)")
        started = time.monotonic()
        cmd = ["debootstrap", f"--variant={RECIPE['variant']}", "--include=" + ",".join(RECIPE["include"]),
               RECIPE["suite"], str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
            raise RuntimeError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        _require_configured(work)
        _configure(work)
        (work / ".fleet-lab-base").write_text(json.dumps(RECIPE, indent=2))
        work.rename(target)
        log(f"base image built in {time.monotonic() - started:.0f}s")
        for old in cache.glob("base-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target


def _require_configured(root: Path) -> None:
    """debootstrap exits 0 even when a package stayed unconfigured (a missing virtual dependency): refuse it."""
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Status}\n"],
                         capture_output=True, text=True, check=True).stdout
    broken = [line.split()[0] for line in out.splitlines()
              if line.strip() and not line.endswith("install ok installed")]
    if broken:
        raise RuntimeError(f"debootstrap left packages unconfigured: {', '.join(broken)}")


def _configure(root: Path) -> None:
    """Settings every lab host shares; per-host files go into its overlay upper dir."""
    sshd = root / "etc/ssh/sshd_config.d"
    sshd.mkdir(parents=True, exist_ok=True)
    (sshd / "00-fleet-lab.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UseDNS no\nMaxStartups 100:30:200\n"
    )
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each host gets its own keys
    (root / "etc/machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    # cloud-init's units, enabled as on a cloud image (debootstrap's chroot did not): its generator still
    # leaves cloud-init out of a boot when /etc/cloud/cloud-init.disabled exists (every non-cloud lab host)
    subprocess.run(["systemctl", f"--root={root}", "enable", "cloud-init-local.service", "cloud-init.service",
                    "cloud-config.service", "cloud-final.service"], check=True, capture_output=True)
    # the lab's repositories are on loopback; a retry covers a repository server still starting
    (root / "etc/apt/apt.conf.d/99fleet-lab").write_text('Acquire::Retries "3";\n')
