"""How the controller reaches a cloud host and knows its SSH host key before the first connection.

Pure helpers (no Pulumi, no AWS), shared by the inventory builder, the host-keys provider
(infra/hostkeys_provider.py), `fleet known-hosts` and the lab:

- `host_keys_from_console`: the public host keys cloud-init prints to the instance's console at first boot
  (`/usr/lib/cloud-init/write-ssh-key-fingerprints`, run by the `keys_to_console` module), checked against the
  SHA256 fingerprints printed beside them. The console is the out-of-band channel EC2 gives (GetConsoleOutput):
  the private keys never leave the instance and nothing secret goes into user data or Pulumi state.
- `ssh_common_args` / `proxy_command`: `ansible_ssh_common_args` that check host keys strictly against one
  known_hosts file, through a bastion when the site has one. A ProxyCommand rather than ProxyJump: OpenSSH does
  not hand command-line `-o` options (UserKnownHostsFile, IdentityFile) to a ProxyJump's connection, so the
  bastion's own key would be checked against the default files, or not found.
- `known_hosts_lines` / `merge_known_hosts`: the known_hosts lines an inventory's host vars imply, and writing
  them into a known_hosts file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
BEGIN_KEYS = "-----BEGIN SSH HOST KEY KEYS-----"
END_KEYS = "-----END SSH HOST KEY KEYS-----"
BEGIN_FINGERPRINTS = "-----BEGIN SSH HOST KEY FINGERPRINTS-----"
END_FINGERPRINTS = "-----END SSH HOST KEY FINGERPRINTS-----"

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_DOTTED_NUMBERS = re.compile(r"^[\d.]+$")
# a key of a known type anywhere on a line: whatever precedes it (a timestamp, `cloud-init[123]: `) is dropped
_KEY_LINE = re.compile(r"(?<![A-Za-z0-9-])(" + "|".join(re.escape(t) for t in KEY_TYPES) + r")\s+(\S+)")
# `ssh-keygen -l`: "256 SHA256:base64 comment (ED25519)"; before OpenSSH 6.8 "2048 aa:bb:...:ff comment (RSA)"
_FINGERPRINT = re.compile(r"(?<!\S)\d+\s+(SHA256:[A-Za-z0-9+/]+=*|(?:MD5:)?(?:[0-9a-f]{2}:){15}[0-9a-f]{2})(?!\S)")
_NOT_IN_PATH = re.compile(r"[\s\"'\\]")
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./~-]+$")
_ECDSA_CURVES = {"ecdsa-sha2-nistp256": "nistp256", "ecdsa-sha2-nistp384": "nistp384",
                 "ecdsa-sha2-nistp521": "nistp521"}


class HostVarError(ValueError):
    """A host var that cannot make a known_hosts line: which host, which var, the value, what is wrong."""

    def __init__(self, host: str, var: str, value: Any, message: str):
        self.host, self.var, self.value, self.message = host, var, value, message
        super().__init__(f"{host}: {var}: {message} (value: {value!r})")


def ip_or_dns_name(value: str) -> str:
    """`value` when it is an IP address or a DNS name; ValueError saying what is wrong otherwise."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if _DOTTED_NUMBERS.match(value):  # 999.300.1.12 is a broken IPv4 address, not a name
        raise ValueError("not a valid IP address")
    if not _DNS_NAME.match(value):
        raise ValueError("expected an IP address or a DNS name (letters, digits, '-', '.')")
    return value


def _ssh_strings(raw: bytes) -> list[bytes]:
    """The length-prefixed strings of an SSH wire-format public key blob (RFC 4253 section 6.6)."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("truncated key data")
        size = int.from_bytes(raw[i:i + 4], "big")
        if size > len(raw) - i - 4:
            raise ValueError("truncated key data")
        out.append(raw[i + 4:i + 4 + size])
        i += 4 + size
    return out


def parse_public_key(text: str) -> tuple[str, str]:
    """("ssh-ed25519", "AAAA...") from an OpenSSH public key line "TYPE BASE64 [comment]"; ValueError when the type
    is unknown, the data is not base64, or the blob is not a well-formed key of the type it names."""
    parts = str(text).split()
    if len(parts) < 2:
        raise ValueError("expected an OpenSSH public key: 'TYPE BASE64 [comment]'")
    kind, blob = parts[0], parts[1]
    if kind not in KEY_TYPES:
        raise ValueError(f"unknown key type {kind!r} (known: {', '.join(KEY_TYPES)})")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{kind} key data is not valid base64") from exc
    size = int.from_bytes(raw[:4], "big")
    named = raw[4:4 + size] if len(raw) >= 4 + size else b""
    if named != kind.encode():  # the type the data itself names, checked before its body
        raise ValueError(f"the key data is a {named.decode(errors='replace')!r} key, not {kind!r}")
    fields = _ssh_strings(raw)
    if kind == "ssh-ed25519":
        well_formed = len(fields) == 2 and len(fields[1]) == 32
    elif kind in _ECDSA_CURVES:
        well_formed = len(fields) == 3 and fields[1] == _ECDSA_CURVES[kind].encode() and fields[2][:1] == b"\x04"
    else:  # ssh-rsa: exponent, modulus
        well_formed = len(fields) == 3 and len(fields[2]) >= 128
    if not well_formed:
        raise ValueError(f"malformed {kind} key data")
    return kind, blob


def fingerprint(blob: str) -> str:
    """The key's SHA256 fingerprint as `ssh-keygen -l` prints it: 'SHA256:' + unpadded base64 of the digest."""
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _md5_fingerprint(blob: str) -> str:
    digest = hashlib.md5(base64.b64decode(blob), usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, 32, 2))


def _blocks(lines: list[str], begin: str, end: str) -> list[list[str]]:
    """Every complete begin..end block: the lines between the markers, whatever precedes a marker on its line."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if begin in line:
            current = []  # a block begun again restarts: the earlier one never completed
        elif end in line:
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def host_keys_from_console(text: str) -> list[str]:
    """The public host keys ("type base64", comment dropped) in the last complete SSH HOST KEY KEYS block of an
    instance's console output; [] when there is none yet.

    Lines may carry a prefix before the marker or the key (kernel timestamps, `ec2: `, `cloud-init[123]: `,
    `<14>Dec  7 10:00:00 cloud-init: `); lines in the block with no key of a known type (a kernel message
    interleaved on the console, a type such as ssh-dss) are skipped. A key line of a known type that is not a
    well-formed key raises ValueError. When a FINGERPRINTS block with fingerprints is present, every key must match
    one of them (SHA256, or MD5 on old images), else ValueError naming the key.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks = _blocks(lines, BEGIN_KEYS, END_KEYS)
    if not blocks:
        return []
    keys: list[str] = []
    for line in blocks[-1]:
        match = _KEY_LINE.search(line)
        if not match:
            continue
        try:
            kind, blob = parse_public_key(f"{match.group(1)} {match.group(2)}")
        except ValueError as exc:
            raise ValueError(f"console host key line {line.strip()!r}: {exc}") from exc
        if f"{kind} {blob}" not in keys:
            keys.append(f"{kind} {blob}")
    printed = set()
    for block in _blocks(lines, BEGIN_FINGERPRINTS, END_FINGERPRINTS)[-1:]:
        for line in block:
            if found := _FINGERPRINT.search(line):
                printed.add(found.group(1).removeprefix("MD5:"))
    if printed:
        for key in keys:
            kind, blob = key.split()
            if fingerprint(blob) not in printed and _md5_fingerprint(blob) not in printed:
                raise ValueError(f"console host key {kind} {fingerprint(blob)} matches none of the fingerprints "
                                 f"printed beside it ({', '.join(sorted(printed))}): the console output is not "
                                 "consistent, the key is not trusted")
    return keys


def _word(text: str) -> str:
    """`text` as one shell word: as is when it holds nothing a POSIX shell would interpret, quoted otherwise."""
    return text if _SHELL_SAFE.match(text) else shlex.quote(text)


def _known_hosts_options(known_hosts_file: str) -> list[str]:
    if not known_hosts_file or _NOT_IN_PATH.search(known_hosts_file):
        # ssh splits UserKnownHostsFile's value into several files at whitespace, and reads quotes itself
        raise ValueError(f"known_hosts file {known_hosts_file!r}: a path without whitespace, quotes or backslashes")
    return ["-o", _word(f"UserKnownHostsFile={known_hosts_file}"), "-o", "StrictHostKeyChecking=yes"]


def proxy_command(bastion: Mapping[str, Any], known_hosts_file: str, identity_file: str | None = None) -> str:
    """The ProxyCommand that reaches a host through `bastion` ({host, port, user}): an ssh to the bastion that
    checks the bastion's key strictly against `known_hosts_file` and forwards stdin/stdout to the target (-W).
    `identity_file` is the key this inner ssh logs in to the bastion with (Ansible hands its private key file only
    to the outer ssh). ssh runs the command through /bin/sh: every word is quoted for it where needed."""
    words = ["ssh", *_known_hosts_options(known_hosts_file)]
    if identity_file:
        words += ["-i", _word(identity_file)]
    port = int(bastion.get("port") or 22)
    words += ["-W", "%h:%p", "-p", str(port), _word(f"{bastion['user']}@{bastion['host']}")]
    return " ".join(words)


def ssh_common_args(known_hosts_file: str, bastion: Mapping[str, Any] | None,
                    identity_file: str | None = None) -> str:
    """`ansible_ssh_common_args`: strict host-key checking against `known_hosts_file`, through `bastion` (a
    ProxyCommand) when given. Ansible splits the string with shlex.split; the ProxyCommand is one argument."""
    words = _known_hosts_options(known_hosts_file)
    if bastion:
        command = proxy_command(bastion, known_hosts_file, identity_file)
        words += ["-o", 'ProxyCommand="' + command.replace("\\", "\\\\").replace('"', '\\"') + '"']
    return " ".join(words)


def _address(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _port(host: str, var: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit() \
            or not 1 <= int(value) <= 65535:
        raise HostVarError(host, var, value, "expected a port number 1-65535")
    return int(value)


def _name(host: str, var: str, value: Any) -> str:
    if not isinstance(value, str):
        raise HostVarError(host, var, value, "expected an IP address or a DNS name")
    try:
        return ip_or_dns_name(value)
    except ValueError as exc:
        raise HostVarError(host, var, value, str(exc)) from exc


def _keys(host: str, var: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise HostVarError(host, var, value, "expected a list of public keys 'TYPE BASE64'")
    keys = []
    for i, text in enumerate(value):
        try:
            kind, blob = parse_public_key(text if isinstance(text, str) else "")
        except ValueError as exc:
            raise HostVarError(host, f"{var}[{i}]", text, str(exc)) from exc
        keys.append(f"{kind} {blob}")
    return keys


def known_hosts_lines(hostvars: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """known_hosts lines for every host with `fleet_ssh_host_keys` (at its `ansible_host`, else its inventory name;
    `[addr]:port` when `ansible_port` is not 22) and for each distinct `fleet_ssh_bastion`; sorted, deduplicated.
    A malformed var raises HostVarError naming the host and the var."""
    lines: set[str] = set()
    for host, hv in sorted(hostvars.items()):
        if hv.get("fleet_ssh_host_keys") is not None:
            address = _name(host, "ansible_host", hv.get("ansible_host", host))
            port = _port(host, "ansible_port", hv.get("ansible_port", 22))
            lines |= {f"{_address(address, port)} {key}"
                      for key in _keys(host, "fleet_ssh_host_keys", hv["fleet_ssh_host_keys"])}
        bastion = hv.get("fleet_ssh_bastion")
        if bastion is not None:
            if not isinstance(bastion, Mapping):
                raise HostVarError(host, "fleet_ssh_bastion", bastion, "expected a mapping {host, port, user, "
                                                                       "host_keys}")
            address = _name(host, "fleet_ssh_bastion.host", bastion.get("host"))
            port = _port(host, "fleet_ssh_bastion.port", bastion.get("port", 22))
            lines |= {f"{_address(address, port)} {key}"
                      for key in _keys(host, "fleet_ssh_bastion.host_keys", bastion.get("host_keys"))}
    return sorted(lines)


def _hashed_match(entry: str, pattern: str) -> bool:
    """Whether a hashed known_hosts host field (|1|salt|hash, HashKnownHosts) stands for `pattern`."""
    try:
        _, magic, salt, digest = entry.split("|")
        if magic != "1":
            return False
        mac = hmac.new(base64.b64decode(salt), pattern.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, base64.b64decode(digest))
    except (ValueError, binascii.Error):
        return False


def _make_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents, each 0700 (whatever the umask); existing ones are left as is."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)


def merge_known_hosts(path: Path, lines: list[str]) -> None:
    """Write `lines` into the known_hosts file at `path`: lines of the file for the same host patterns (plain or
    hashed) go, the rest stays (comments, other hosts, @cert-authority and @revoked lines). Written atomically
    (a temporary file renamed over it), mode 0600; missing parent folders are created 0700."""
    patterns = {p for line in lines for p in line.split(maxsplit=1)[0].split(",")}
    kept: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split(maxsplit=1)
            if not fields or line.lstrip().startswith(("#", "@")):
                kept.append(line)
                continue
            hosts = fields[0].split(",")
            remaining = [h for h in hosts if h not in patterns and not any(_hashed_match(h, p) for p in patterns)]
            if remaining == hosts:
                kept.append(line)
            elif remaining:
                kept.append(",".join(remaining) + " " + fields[1])
    text = "".join(f"{line}\n" for line in [*kept, *lines])
    _make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
