#!/usr/bin/python3
"""Simulated nv-fabricmanager: starts only when its version equals the loaded driver's and the
board has NVSwitch, with the real daemon's messages when it refuses (GPU Operator issues 544, 356).
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402


def main(argv: list[str]) -> int:
    """`-v`/`--version` prints the version; otherwise check and fork into the background."""
    try:
        version = fleetsim.package_info("fabricmanager")["upstream_version"]
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    if argv[:1] in (["-v"], ["--version"]):
        print(f"Fabric Manager version is : {version}")
        return 0
    try:
        hw = fleetsim.load_hardware()
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    loaded = fleetsim.loaded_driver()
    if loaded is None:
        sys.stderr.write("fabric manager failed to open the NVIDIA GPU driver: the nvidia kernel module is not "
                         "loaded\n")
        return 1
    if loaded != version:
        sys.stderr.write(f"fabric manager NVIDIA GPU driver interface version {version} don't match with driver "
                         f"version {loaded}. Please update with matching NVIDIA driver package.\n")
        return 1
    if not hw.nvswitch:
        sys.stderr.write("request to query NVSwitch device information from NVSwitch driver failed with "
                         "error:WARNING Nothing to do [NV_WARN_NOTHING_TO_DO]\n")
        return 1
    fleetsim.daemonize("nv-fabricmanager.pid",
                       "Successfully configured all the available NVSwitches to route GPU NVLink traffic. "
                       "NVLink Peer-to-Peer support will be enabled once the GPUs are successfully registered "
                       "with the NVLink fabric.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
