#!/usr/bin/python3
"""Simulated nvidia-container-runtime-hook (nvidia-container-toolkit): `--version`."""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main(argv: list[str]) -> int:
    """Print the hook's version and commit."""
    info = fleetsim.package_info("nvidia-container-toolkit")
    if argv[:1] != ["--version"]:
        sys.stderr.write("nvidia-container-runtime-hook: only --version is simulated\n")
        return 2
    print(f"NVIDIA Container Runtime Hook version {info['upstream_version']}\ncommit: {info['commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
