"""A minimal NUT network-protocol client (what `upsc` does): the variables of one UPS from upsd."""

from __future__ import annotations

import shlex
import socket


class NutError(Exception):
    """upsd answered ERR (UNKNOWN-UPS, DATA-STALE, ...) or could not be reached."""


# what upsd's ERR answers mean (NUT's network protocol, "Error responses")
_MEANING = {
    "UNKNOWN-UPS": "upsd serves no UPS of that name",
    "DATA-STALE": "the driver has no fresh data from the UPS",
    "DRIVER-NOT-CONNECTED": "upsd is not connected to the UPS's driver",
    "ACCESS-DENIED": "upsd refuses this client",
}


def _err(where: str, line: str) -> NutError:
    code = line.split()[1] if len(line.split()) > 1 else ""
    meaning = f" ({_MEANING[code]})" if code in _MEANING else ""
    return NutError(f"upsd {where} answered {line}{meaning}")


def ups_variables(ups: str, host: str, port: int = 3493, timeout: float = 5) -> dict[str, str]:
    """`LIST VAR <ups>`: {"ups.status": "OL CHRG", "battery.charge": "100", ...}.

    Raises NutError naming upsd and its answer (`ERR DATA-STALE`, ...) or the connection's error.
    """
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"LIST VAR {ups}\n".encode())
            reader = sock.makefile("r", encoding="utf-8", errors="replace", newline="\n")
            first = reader.readline().strip()
            if first.startswith("ERR"):
                raise _err(where, first)
            variables: dict[str, str] = {}
            for line in reader:
                line = line.strip()
                if line.startswith("END LIST VAR"):
                    sock.sendall(b"LOGOUT\n")
                    return variables
                if line.startswith("ERR"):
                    raise _err(where, line)
                try:
                    parts = shlex.split(line)
                except ValueError:
                    continue  # an unbalanced quote: not a variable line we can read
                if len(parts) == 4 and parts[0] == "VAR":
                    variables[parts[2]] = parts[3]
            raise NutError(f"upsd {where}: connection closed before END LIST VAR {ups}")
    except OSError as exc:
        raise NutError(f"upsd {where}: {exc}") from exc
