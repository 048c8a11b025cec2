#!/usr/bin/python3
"""Simulated kernel-module load: run at boot (nvidia-driver-load.service) and by the driver's postinst.

The module loaded is the installed driver's version, and only when no module is loaded yet: a
loaded module stays until reboot, so upgrading the driver package without a reboot leaves the old
module loaded and NVML reports a Driver/library version mismatch until the host reboots.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main() -> int:
    """Load the installed version if nothing is loaded; report what is loaded."""
    try:
        version = fleetsim.package_info("driver")["upstream_version"]
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    if fleetsim.load_driver(version):
        print(f"nvidia: loaded kernel module {version}")
    else:
        loaded = fleetsim.loaded_driver()
        note = "" if loaded == version else f"; installed {version} takes effect after reboot"
        print(f"nvidia: kernel module {loaded} already loaded{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
