"""A minimal NUT network-protocol client (what `upsc` does): the variables of one UPS from upsd."""

from __future__ import annotations

import shlex
import socket


class NutError(Exception):
    """upsd answered ERR (UNKNOWN-UPS, DATA-STALE, ...) or could not be reached."""


def ups_variables(ups: str, host: str, port: int = 3493, timeout: float = 5) -> dict[str, str]:
    """`LIST VAR <ups>`: {"ups.status": "OL CHRG", "battery.charge": "100", ...}."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"LIST VAR {ups}\n".encode())
            reader = sock.makefile("r", encoding="utf-8", newline="\n")
            first = reader.readline().strip()
            if first.startswith("ERR"):
                raise NutError(f"{ups}@{host}:{port}: {first}")
            variables: dict[str, str] = {}
            for line in reader:
                line = line.strip()
                if line.startswith("END LIST VAR"):
                    sock.sendall(b"LOGOUT\n")
                    return variables
                if line.startswith("ERR"):
                    raise NutError(f"{ups}@{host}:{port}: {line}")
                parts = shlex.split(line)
                if len(parts) == 4 and parts[0] == "VAR":
                    variables[parts[2]] = parts[3]
            raise NutError(f"{ups}@{host}:{port}: connection closed before END LIST VAR")
    except OSError as exc:
        raise NutError(f"{ups}@{host}:{port}: {exc}") from exc
