#!/usr/bin/python3
"""Simulated ibstat (infiniband-diags): the host's HCAs from hardware.json.

`ibstat` lists every CA, `ibstat CA` one, `ibstat -l` the names. The ib-port-down fault takes
mlx5_0's port down the way a pulled cable or disabled switch port shows (State: Down, Physical
state: Disabled, Rate: 10, as in NVIDIA/nccl-tests issue 128).
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

# ConnectX generation by link rate (Gb/s): CA type (PCI device id) and a firmware of that family.
CONNECTX = {100: ("MT4119", "16.35.2000"), 200: ("MT4123", "20.31.1014"), 400: ("MT4129", "28.39.1002"),
            800: ("MT4131", "40.44.1036")}


def describe(hca: dict, down: bool) -> str:
    """One CA block as ibstat prints it (tab-indented)."""
    ca_type, firmware = CONNECTX.get(int(hca["rate"]), CONNECTX[200])
    guid = hca["guid"]
    # The subnet manager assigns unicast LIDs (1..0xbfff); derive a stable one from the port GUID.
    lid = int(guid, 16) % 0xBFFF + 1
    state = ("Down", "Disabled", 10, 65535, 0) if down else ("Active", "LinkUp", int(hca["rate"]), lid, 1)
    return (
        f"CA '{hca['name']}'\n"
        f"\tCA type: {ca_type}\n"
        "\tNumber of ports: 1\n"
        f"\tFirmware version: {firmware}\n"
        "\tHardware version: 0\n"
        f"\tNode GUID: {guid}\n"
        f"\tSystem image GUID: {guid}\n"
        "\tPort 1:\n"
        f"\t\tState: {state[0]}\n"
        f"\t\tPhysical state: {state[1]}\n"
        f"\t\tRate: {state[2]}\n"
        f"\t\tBase lid: {state[3]}\n"
        "\t\tLMC: 0\n"
        f"\t\tSM lid: {state[4]}\n"
        "\t\tCapability mask: 0x2651e848\n"
        f"\t\tPort GUID: {guid}\n"
        "\t\tLink layer: InfiniBand\n"
    )


def main(argv: list[str]) -> int:
    """Print the CAs (all, one named, or just the names with -l)."""
    try:
        hw = fleetsim.load_hardware()
    except fleetsim.SimError as exc:
        sys.stderr.write(exc.message + "\n")
        return 1
    hcas = hw.ib_hcas
    if argv[:1] == ["-l"]:
        sys.stdout.write("".join(h["name"] + "\n" for h in hcas))
        return 0
    if argv:
        hcas = [h for h in hcas if h["name"] == argv[0]]
        if not hcas:
            sys.stderr.write(f"ibpanic: [1] main: '{argv[0]}' IB device can't be found: No such file or directory\n")
            return 255
    port_down = "ib-port-down" in hw.faults
    sys.stdout.write("".join(describe(h, port_down and h["name"] == "mlx5_0") for h in hcas))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
