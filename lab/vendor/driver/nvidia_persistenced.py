#!/usr/bin/python3
"""Simulated nvidia-persistenced: while it runs, nvidia-smi reports Persistence Mode Enabled.

Like the real daemon it needs a working NVML: with no module loaded, or after a driver upgrade
without reboot, it fails to start.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main() -> int:
    """Check NVML, then fork into the background (the unit is Type=forking)."""
    try:
        fleetsim.nvml_init()
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message)
        sys.stderr.write("nvidia-persistenced failed to initialize. Check syslog for more details.\n")
        return 1
    fleetsim.daemonize("nvidia-persistenced.pid", "Started (persistence mode on all GPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
