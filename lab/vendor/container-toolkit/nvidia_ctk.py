#!/usr/bin/python3
"""Simulated nvidia-ctk (nvidia-container-toolkit-base): `nvidia-ctk --version`."""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main(argv: list[str]) -> int:
    """Print the CLI version and commit, as the real tool does."""
    info = fleetsim.package_info("nvidia-container-toolkit-base")
    if argv[:1] not in (["--version"], ["-v"]):
        sys.stderr.write("Incorrect Usage. flag provided but not defined\n")
        return 1
    print(f"NVIDIA Container Toolkit CLI version {info['upstream_version']}\ncommit: {info['commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
