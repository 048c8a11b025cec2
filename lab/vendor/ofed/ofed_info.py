#!/usr/bin/python3
"""Simulated ofed_info (MLNX_OFED): `-s` prints `MLNX_OFED_LINUX-<version>:`, `-n` the bare version."""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main(argv: list[str]) -> int:
    """Print the installed OFED version in the short (-s) or numeric (-n) form."""
    version = fleetsim.package_info("mlnx-ofed-basic")["version"]
    if argv[:1] == ["-n"]:
        print(version)
    elif argv[:1] == ["-s"]:
        print(f"MLNX_OFED_LINUX-{version}:")
    else:
        sys.stderr.write("ofed_info: only -s and -n are simulated\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
