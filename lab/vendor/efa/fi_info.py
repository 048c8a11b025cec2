#!/usr/bin/python3
"""Simulated fi_info (libfabric from the AWS EFA installer): one entry per EFA device.

`fi_info -p efa [-t FI_EP_RDM|FI_EP_DGRAM]`. Device names follow the rdmapXsY form EFA uses on
Nitro instances; checks should count entries, not match names. With no EFA device (or another
provider) it fails as libfabric does: `fi_getinfo: -61 (No data available)`.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

# p4d.24xlarge's four EFA devices sit beside the GPU pairs on PCI buses 0x10, 0x20, 0x90, 0xa0.
DEVICES = ("rdmap16s27", "rdmap32s27", "rdmap144s27", "rdmap160s27")
NO_DATA = "fi_getinfo: -61 (No data available)\n"


def main(argv: list[str]) -> int:
    """Print the matching provider entries."""
    provider = ep_type = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-p", "--provider", "-t", "--ep_type") and args:
            value = args.pop(0)
            if arg in ("-p", "--provider"):
                provider = value
            else:
                ep_type = value
        else:
            sys.stderr.write(f"fi_info: unsupported argument {arg!r}\n")
            return 1
    try:
        hw = fleetsim.load_hardware()
        version = fleetsim.package_info("libfabric1-aws")["provider_version"]
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    types = [t for t in ("FI_EP_RDM", "FI_EP_DGRAM") if ep_type in (None, t)]
    if provider not in (None, "efa") or not types or hw.efa_devices == 0:
        sys.stderr.write(NO_DATA)
        return 1
    names = [DEVICES[i] if i < len(DEVICES) else f"rdmap{i}s0" for i in range(hw.efa_devices)]
    suffix = {"FI_EP_RDM": "rdm", "FI_EP_DGRAM": "dgrm"}
    blocks = [
        f"provider: efa\n    fabric: efa\n    domain: {name}-{suffix[t]}\n    version: {version}\n"
        f"    type: {t}\n    protocol: FI_PROTO_EFA\n"
        for name in names for t in types
    ]
    sys.stdout.write("".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
