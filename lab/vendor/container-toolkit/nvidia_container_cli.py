#!/usr/bin/python3
"""Simulated nvidia-container-cli (libnvidia-container-tools): `--version`.

Its lib-version comes from the installed libnvidia-container1, so a mismatched pair shows, and a
missing library fails the way the dynamic loader does.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main(argv: list[str]) -> int:
    """Print cli and lib versions."""
    cli = fleetsim.package_info("libnvidia-container-tools")
    try:
        lib = fleetsim.package_info("libnvidia-container1")
    except fleetsim.SimError:
        sys.stderr.write("nvidia-container-cli: error while loading shared libraries: libnvidia-container.so.1: "
                         "cannot open shared object file: No such file or directory\n")
        return 127
    if argv[:1] != ["--version"]:
        sys.stderr.write("nvidia-container-cli: only --version is simulated\n")
        return 2
    print(f"cli-version: {cli['upstream_version']}\nlib-version: {lib['upstream_version']}\n"
          f"build revision: {lib['commit']}\nbuild platform: x86_64")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
