"""The lab's cloud-like hosts: an EC2 instance as AWS gives it, behind a bastion.

The hosts of the lab's AWS sites boot the way an Ubuntu AMI does: real cloud-init (Debian's package)
reads the user data the Pulumi program renders (infra/aws_common.py `render_user_data`) from a NoCloud
seed, creates the AMI's default user `ubuntu` with passwordless sudo, puts the authorized keys on it,
answers a root login with cloud-init's "Please login as the user ubuntu" (disable_root), generates
the host keys and prints them to the console, which the lab keeps as EC2 keeps an instance's console
output (GetConsoleOutput). The controller learns the keys only from there, as the program does.

They sit in a private subnet: their SSH port answers only connections the lab's bastion makes for a
login on it (ProxyCommand `ssh -W`). A firewall rule (nftables, in a table of the lab's own) resets
every other connection to those ports, the controller's included. The bastion is one more nspawn
container with sshd and an unprivileged jump user; the rule tells its forwarded connections by that
user's uid (containers share the machine's user ids).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from infra.model.fleet import Fleet
from lab.layout import HostDirs
from lab.services import ssh_banner

BASTION = "lab-bastion"  # the bastion's container (machine) name
JUMP_USER = "fleetjump"
JUMP_UID = 2901  # the jump user's uid, in the bastion and so on the machine: the firewall lets it through
DEFAULT_USER = "ubuntu"  # Canonical's Ubuntu AMIs' default user (their cloud.cfg system_info.default_user)

# What the Ubuntu AMI's image configuration says (its /etc/cloud/cloud.cfg system_info); the datasource is
# NoCloud (a seed folder) where EC2's is Ec2, and the lab hosts share the machine's network: cloud-init
# must not configure it.
CLOUD_CFG = f"""\
# The lab's cloud-like host: what an Ubuntu AMI's image configuration sets (lab/cloud.py)
datasource_list: [NoCloud]
network: {{config: disabled}}
disable_root: true
# Ubuntu's images run in C.UTF-8 (Debian's cloud-init would set en_US.UTF-8, which the image does not have: its
# locale module then fails cloud-config.service, and once a loaded machine never went on to cloud-final)
locale: C.UTF-8
system_info:
  default_user:
    name: {DEFAULT_USER}
    lock_passwd: true
    gecos: Ubuntu
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
"""


def cloud_hosts(fleet: Fleet) -> list[str]:
    """The lab hosts that stand for EC2 instances: those of the fleet's AWS sites."""
    return sorted(n for n, h in fleet.hosts.items() if fleet.site_of(h).kind == "aws")


def machines(fleet: Fleet) -> list[str]:
    """Every container of a lab: the fleet's hosts, and the bastion when the fleet has cloud-like hosts."""
    return sorted(fleet.hosts) + ([BASTION] if cloud_hosts(fleet) else [])


def instance_id(name: str) -> str:
    """A stable, EC2-shaped instance id for a lab host."""
    return "i-" + hashlib.sha256(name.encode()).hexdigest()[:17]


def write_cloud_host_files(dirs: HostDirs, name: str, ssh_port: int, user_data: str) -> None:
    """Seed cloud-init (NoCloud) with the host's user data; no key of ours goes in: cloud-init makes them."""
    root = dirs.merged
    (root / "etc/cloud/cloud-init.disabled").unlink(missing_ok=True)
    cfg = root / "etc/cloud/cloud.cfg.d"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "90-fleet-lab-ami.cfg").write_text(CLOUD_CFG)
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True, exist_ok=True)
    (seed / "meta-data").write_text(f"instance-id: {instance_id(name)}\nlocal-hostname: {name}\n")
    (seed / "user-data").write_text(user_data)
    os.chmod(seed / "user-data", 0o600)
    (root / "etc/hostname").write_text(name + "\n")
    (root / "etc/ssh/sshd_config.d/10-fleet-lab-listen.conf").write_text(f"Port {ssh_port}\nListenAddress 127.0.0.1\n")


def write_bastion_files(dirs: HostDirs, ssh_port: int, authorized_key: str) -> str:
    """The bastion: sshd on its port, the jump user (no shell) allowed to forward; returns its public host key."""
    root = dirs.merged
    (root / "etc/cloud").mkdir(parents=True, exist_ok=True)
    (root / "etc/cloud/cloud-init.disabled").write_text("a lab bastion, not a cloud instance\n")
    (root / "etc/hostname").write_text(BASTION + "\n")
    (root / "etc/machine-id").write_text(os.urandom(16).hex() + "\n")
    (root / "etc/ssh/sshd_config.d/10-fleet-lab-listen.conf").write_text(
        f"Port {ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin no\nAllowUsers {JUMP_USER}\n"
        "AllowTcpForwarding yes\nX11Forwarding no\nPermitTTY no\n")
    _add_user(root, JUMP_USER, JUMP_UID)
    home = root / "home" / JUMP_USER
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(authorized_key.strip() + "\n")
    for path, mode in ((home, 0o755), (ssh_dir, 0o700), (ssh_dir / "authorized_keys", 0o600)):
        os.chown(path, JUMP_UID, JUMP_UID)
        os.chmod(path, mode)
    key = root / "etc/ssh/ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{BASTION}", "-f", str(key)],
                       check=True)
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def _add_user(root: Path, name: str, uid: int) -> None:
    passwd = root / "etc/passwd"
    if any(line.split(":")[0] == name for line in passwd.read_text().splitlines()):
        return
    with passwd.open("a") as f:
        f.write(f"{name}:x:{uid}:{uid}:fleet lab jump user:/home/{name}:/usr/sbin/nologin\n")
    with (root / "etc/group").open("a") as f:
        f.write(f"{name}:x:{uid}:\n")
    with (root / "etc/shadow").open("a") as f:
        f.write(f"{name}:*:20000:0:99999:7:::\n")


# --- the private subnet -----------------------------------------------------------------------------


def firewall_table(port_base: int) -> str:
    """The nftables table of one lab (its port base tells labs apart)."""
    return f"fleet_lab_{port_base}"


def firewall_up(port_base: int, ssh_ports: list[int]) -> None:
    """Reset every loopback connection to the cloud hosts' SSH ports but the bastion's jump user's."""
    firewall_down(port_base)
    if not ssh_ports:
        return
    table = firewall_table(port_base)
    ports = ", ".join(str(p) for p in sorted(ssh_ports))
    rules = (f"table inet {table} {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n"
             f"    oif lo tcp dport {{ {ports} }} meta skuid != {JUMP_UID} reject with tcp reset\n  }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)


def firewall_down(port_base: int) -> None:
    """Remove the lab's table (nothing when there is none)."""
    subprocess.run(["nft", "delete", "table", "inet", firewall_table(port_base)], capture_output=True)


def firewall_present(port_base: int) -> bool:
    """Whether the lab's table is loaded."""
    return subprocess.run(["nft", "list", "table", "inet", firewall_table(port_base)],
                          capture_output=True).returncode == 0


def banner_as_jump_user(port: int, timeout: float = 2) -> bool:
    """Whether the sshd on a cloud host's port greets the jump user (the only one the firewall lets through):
    the lab's banner check (lab.services.ssh_banner), run in a child process with the jump user's ids."""
    pid = os.fork()
    if pid == 0:  # the child only connects and exits: nothing of the parent's state is touched
        code = 1
        try:
            os.setgroups([])
            os.setgid(JUMP_UID)
            os.setuid(JUMP_UID)
            code = 0 if ssh_banner(port, timeout) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
