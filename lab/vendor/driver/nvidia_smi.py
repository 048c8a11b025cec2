#!/usr/bin/python3
"""Simulated nvidia-smi: the real tool's output formats, from the lab's hardware files.

Supports `--query-gpu=FIELDS --format=csv[,noheader][,nounits]`, `-q`, `-L`, `topo -m`, `-i ID`
and the bare summary table. Fails like the real tool: NVML "Driver/library version mismatch" (exit
18) when the installed driver differs from the loaded kernel module, exit 9 when none is loaded.
"""

from __future__ import annotations

import sys
import time

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

# field -> (unit shown in the header and after values, or "")
FIELDS = {
    "index": "", "name": "", "uuid": "", "pci.bus_id": "", "driver_version": "", "count": "",
    "memory.total": "MiB", "memory.used": "MiB", "memory.free": "MiB", "persistence_mode": "",
    "ecc.mode.current": "", "ecc.mode.pending": "", "ecc.errors.uncorrected.volatile.total": "",
}
ALIASES = {"gpu_name": "name", "gpu_uuid": "uuid", "gpu_bus_id": "pci.bus_id", "persistence-mode": "persistence_mode"}
USAGE = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n"


class Smi:
    """One nvidia-smi invocation's view of the driver and GPUs."""

    def __init__(self, gpu_ids: str | None):
        self.driver = fleetsim.nvml_init()
        self.hw = fleetsim.load_hardware()
        gpus = self.hw.gpus()
        if gpu_ids is not None:
            wanted = set(gpu_ids.split(","))
            gpus = [g for g in gpus if str(g.index) in wanted or g.uuid in wanted or g.bus_id in wanted]
            if not gpus:
                raise fleetsim.SimError(f"No devices were found matching {gpu_ids!r}\n", 6)
        self.gpus = gpus
        self.used = fleetsim.fb_used()
        self.persistence = fleetsim.pidfile_alive("nvidia-persistenced.pid")

    def value(self, gpu: fleetsim.Gpu, name: str) -> str:
        used = self.used.get(gpu.index, 0)
        values = {
            "index": str(gpu.index),
            "name": gpu.product_name,
            "uuid": gpu.uuid,
            "pci.bus_id": gpu.bus_id,
            "driver_version": self.driver,
            "count": str(len(self.hw.gpus())),
            "memory.total": str(gpu.memory_mib),
            "memory.used": str(used),
            "memory.free": str(max(gpu.memory_mib - used, 0)),
            "persistence_mode": "Enabled" if self.persistence else "Disabled",
            "ecc.mode.current": "Enabled",
            "ecc.mode.pending": "Enabled",
            "ecc.errors.uncorrected.volatile.total": str(gpu.ecc_uncorrected_volatile),
        }
        return values[name]

    def csv(self, fields: list[str], fmt: set[str]) -> str:
        lines = []
        if "noheader" not in fmt:
            lines.append(", ".join(f"{f} [{FIELDS[f]}]" if FIELDS[f] else f for f in fields))
        for gpu in self.gpus:
            cells = []
            for f in fields:
                value = self.value(gpu, f)
                cells.append(f"{value} {FIELDS[f]}" if FIELDS[f] and "nounits" not in fmt else value)
            lines.append(", ".join(cells))
        return "".join(line + "\n" for line in lines)

    def query(self) -> str:
        def kv(indent: int, key: str, value: object) -> str:
            # Keys are padded so that every colon sits in column 42, at any depth.
            return f"{' ' * indent}{key.ljust(42 - indent)}: {value}\n"

        def section(indent: int, name: str) -> str:
            return f"{' ' * indent}{name}\n"

        out = ["\n==============NVSMI LOG==============\n\n",
               kv(0, "Timestamp", time.strftime("%a %b %d %H:%M:%S %Y")),
               kv(0, "Driver Version", self.driver),
               kv(0, "CUDA Version", fleetsim.cuda_version(self.driver)), "\n",
               kv(0, "Attached GPUs", len(self.hw.gpus()))]
        for gpu in self.gpus:
            used = self.used.get(gpu.index, 0)
            errors = gpu.ecc_uncorrected_volatile
            out += [
                f"GPU {gpu.bus_id}\n",
                kv(4, "Product Name", gpu.product_name),
                kv(4, "Product Brand", "Tesla" if gpu.model == "T4" else "NVIDIA"),
                kv(4, "Product Architecture", fleetsim.ARCHITECTURES.get(gpu.model, "N/A")),
                kv(4, "Display Mode", "Disabled"),
                kv(4, "Display Active", "Disabled"),
                kv(4, "Persistence Mode", "Enabled" if self.persistence else "Disabled"),
                kv(4, "GPU UUID", gpu.uuid),
                kv(4, "Minor Number", gpu.index),
                section(4, "FB Memory Usage"),
                kv(8, "Total", f"{gpu.memory_mib} MiB"),
                kv(8, "Reserved", "0 MiB"),
                kv(8, "Used", f"{used} MiB"),
                kv(8, "Free", f"{max(gpu.memory_mib - used, 0)} MiB"),
                section(4, "ECC Mode"),
                kv(8, "Current", "Enabled"),
                kv(8, "Pending", "Enabled"),
                section(4, "ECC Errors"),
                section(8, "Volatile"),
                kv(12, "SRAM Correctable", 0),
                kv(12, "SRAM Uncorrectable Parity", 0),
                kv(12, "SRAM Uncorrectable SEC-DED", 0),
                kv(12, "DRAM Correctable", 0),
                kv(12, "DRAM Uncorrectable", errors),
                section(8, "Aggregate"),
                kv(12, "SRAM Correctable", 0),
                kv(12, "SRAM Uncorrectable Parity", 0),
                kv(12, "SRAM Uncorrectable SEC-DED", 0),
                kv(12, "DRAM Correctable", 0),
                kv(12, "DRAM Uncorrectable", errors),
                "\n",
            ]
        return "".join(out)

    def list_gpus(self) -> str:
        return "".join(f"GPU {g.index}: {g.product_name} (UUID: {g.uuid})\n" for g in self.gpus)

    def topo(self) -> str:
        gpus = self.gpus
        nics = [h["name"] for h in self.hw.ib_hcas]
        names = [f"GPU{g.index}" for g in gpus] + [f"NIC{i}" for i in range(len(nics))]
        # GPUs, then NICs, are spread evenly over two sockets in order: the first half on socket 0.
        socket = [int(i >= len(gpus) / 2) for i in range(len(gpus))]
        socket += [int(i >= len(nics) / 2) for i in range(len(nics))]
        nvlink = f"NV{fleetsim.NVLINKS.get(self.hw.gpu_model, 12)}" if self.hw.nvswitch else None

        def link(a: int, b: int) -> str:
            if a == b:
                return " X "
            if nvlink and a < len(gpus) and b < len(gpus):
                return nvlink
            if socket[a] != socket[b]:
                return "SYS"
            return "NODE" if a < len(gpus) and b < len(gpus) else "PXB"

        # the real tool (580.159.04, seen on an H200) underlines the header row, even into a pipe
        lines = ["\t\x1b[4m" + "\t".join(names) + "\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"]
        for a, name in enumerate(names):
            cells = [link(a, b) for b in range(len(names))]
            if a < len(gpus):
                cells += ["0-47,96-143" if socket[a] == 0 else "48-95,144-191", str(socket[a]), "N/A"]
            lines.append(name + "\t" + "\t".join(cells) + "\n")
        lines.append(
            "\nLegend:\n\n"
            "  X    = Self\n"
            "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
            "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges "
            "within a NUMA node\n"
            "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
            "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)\n"
            "  PIX  = Connection traversing at most a single PCIe bridge\n"
            "  NV#  = Connection traversing a bonded set of # NVLinks\n"
        )
        if nics:
            lines.append("\nNIC Legend:\n\n" + "".join(f"  NIC{i}: {n}\n" for i, n in enumerate(nics)))
        return "".join(lines)

    def summary(self) -> str:
        bar = "+-----------------------------------------+------------------------+----------------------+\n"
        out = [time.strftime("%a %b %d %H:%M:%S %Y") + "\n",
               "+" + "-" * 89 + "+\n",
               f"| NVIDIA-SMI {self.driver:<22} Driver Version: {self.driver:<14} "
               f"CUDA Version: {fleetsim.cuda_version(self.driver):<9}|\n",
               bar,
               "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n",
               "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |\n",
               "|                                         |                        |               MIG M. |\n",
               "|=========================================+========================+======================|\n"]
        for gpu in self.gpus:
            used = self.used.get(gpu.index, 0)
            persistence = "On" if self.persistence else "Off"
            out += [
                f"| {gpu.index:>3}  {gpu.product_name:<28}{persistence:>5}  | {gpu.bus_id:>18} Off |"
                f" {gpu.ecc_uncorrected_volatile:>20} |\n",
                f"| N/A   33C    P0             61W /  400W | {f'{used}MiB /  {gpu.memory_mib}MiB':>22} |"
                "      0%      Default |\n",
                "|                                         |                        |             Disabled |\n",
                bar,
            ]
        out += ["\n", "+" + "-" * 89 + "+\n",
                "| Processes:" + " " * 78 + "|\n",
                "|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |\n",
                "|        ID   ID                                                               Usage      |\n",
                "|" + "=" * 89 + "|\n",
                "|  No running processes found" + " " * 61 + "|\n",
                "+" + "-" * 89 + "+\n"]
        return "".join(out)


def main(argv: list[str]) -> int:
    """Run nvidia-smi with `argv` (without the program name); returns the exit status."""
    query_fields = fmt = gpu_ids = None
    mode = "summary"
    args = list(argv)
    if args[:1] == ["topo"]:
        if args[1:] != ["-m"]:
            sys.stderr.write(USAGE)
            return 2
        mode, args = "topo", []
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("--query-gpu", "--format", "-i", "--id"):
            if not eq:
                if not args:
                    sys.stderr.write(USAGE)
                    return 2
                inline = args.pop(0)
            if name == "--query-gpu":
                query_fields, mode = inline, "csv"
            elif name == "--format":
                fmt = inline
            else:
                gpu_ids = inline
        elif arg in ("-q", "--query"):
            mode = "query"
        elif arg in ("-L", "--list-gpus"):
            mode = "list"
        else:
            sys.stderr.write(USAGE)
            return 2
    if mode == "csv":
        fields = [ALIASES.get(f.strip(), f.strip()) for f in query_fields.split(",") if f.strip()]
        bad = next((f for f in fields if f not in FIELDS), None)
        if bad:
            sys.stdout.write(f'Field "{bad}" is not a valid field to query.\n\n')
            return 2
        options = set((fmt or "").split(","))
        if "csv" not in options:
            sys.stdout.write("Format option needs to be specified. Please run 'nvidia-smi -h' for help.\n")
            return 2
    try:
        smi = Smi(gpu_ids)
    except fleetsim.SimError as exc:
        sys.stdout.write(exc.message)
        return exc.code
    if mode == "csv":
        sys.stdout.write(smi.csv(fields, options))
    elif mode == "query":
        sys.stdout.write(smi.query())
    elif mode == "list":
        sys.stdout.write(smi.list_gpus())
    elif mode == "topo":
        sys.stdout.write(smi.topo())
    else:
        sys.stdout.write(smi.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
