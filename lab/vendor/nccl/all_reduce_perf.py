#!/usr/bin/python3
"""Simulated all_reduce_perf (nccl-tests 2.19.6, single-process build): the real output, line for line.

`all_reduce_perf [-b MIN] [-e MAX] [-f FACTOR | -i STEP] [-g GPUS] [-t THREADS] [-n ITERS] [-w WARMUP]
[-c CHECK] [-m AGG] [-d float] [-o sum]` prints what nccl-tests' src/util.cu and src/common.cu print
(tests/unit/formats/SOURCES.md): the run header, one "# Using devices" line per rank, the out-of-place /
in-place table, "# Out of bounds values", "# Avg bus bandwidth" and the closing lines.

Bandwidth: each row's time is latency + bytes on the wire / peak bus bandwidth + a term in the square root
of the size, so small sizes see a fraction of the peak and large ones approach it, as on real hardware;
the peak comes from the GPU model (PEAK_BUSBW), times the installed libnccl2's busbw_factor
(lab/vendor/nccl/nccl-versions.yaml), halved by the nvlink-degraded fault on NVSwitch boards, with a
per-run jitter of about +-1.5 % and +-0.5 % per row. Failures as the real tool fails: more GPUs asked for
than present ("Invalid number of GPUs", exit 5), CUDA unable to reach the driver (a "Test CUDA failure",
exit 2; NVML mismatch after a driver upgrade), libnccl2 missing (the dynamic loader, exit 127).
"""

from __future__ import annotations

import math
import os
import random
import socket
import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

PROGRAM = "all_reduce_perf"
VERSION = "2.19.6"
# 8-GPU all-reduce bus bandwidth at large sizes (GB/s) and small-message latency (us). NVSwitch boards:
# ~230-240 on A100 (NVLink 3), ~460-480 on H100/H200 (NVLink 4 with NVLink SHARP); PCIe cards (g4dn T4,
# g5 A10G, no NVLink) reach a few tens at most through the host bridges.
PEAK_BUSBW = {
    "A100-SXM4-40GB": (235.0, 22.0), "A100-SXM4-80GB": (235.0, 22.0),
    "H100-SXM5-80GB": (470.0, 18.0), "H200-SXM5-141GB": (475.0, 18.0),
    "T4": (10.5, 32.0), "A10G": (16.0, 30.0),
}
PCIE_DEFAULT = (10.0, 32.0)
# util.cu / common.cu source lines nccl-tests 2.19.6 reports in its failure messages
CUDA_CHECK_LINE = "util.cu:674"
TESTCHECK_LINE = "common.cu:1454"
TEST_CUDA_ERROR, TEST_NOT_IMPLEMENTED = 2, 5
CUDA_ERRORS = {"mismatch": "system has unsupported display driver / cuda driver combination",
               "no-driver": "no CUDA-capable device is detected"}
OPTIONS_WITH_VALUE = set("tgbeifnmwNpIKcodrzyTGCaRxDVJSMu")
SIMULATED = set("tgbeifnmwcod")
LONG_OPTIONS = {"nthreads": "t", "ngpus": "g", "minbytes": "b", "maxbytes": "e", "stepbytes": "i", "stepfactor": "f",
                "iters": "n", "agg_iters": "m", "warmup_iters": "w", "run_cycles": "N", "parallel_init": "p",
                "check": "c", "op": "o", "datatype": "d", "root": "r", "blocking": "z", "stream_null": "y",
                "timeout": "T", "cudagraph": "G", "report_cputime": "C", "report_timestamps": "S",
                "output_file": "J", "average": "a", "local_register": "R", "cta_policy": "x",
                "device_implementation": "D", "device_cta_count": "V", "memory": "M", "unalign": "u",
                "per_iter_timing": "I", "per_iter_skip": "K", "help": "h"}
USAGE = (
    "USAGE: {} \n\t"
    "[-t,--nthreads <num threads>] \n\t"
    "[-g,--ngpus <gpus per thread>] \n\t"
    "[-b,--minbytes <min size in bytes>] \n\t"
    "[-e,--maxbytes <max size in bytes>] \n\t"
    "[-i,--stepbytes <increment size>] \n\t"
    "[-f,--stepfactor <increment factor>] \n\t"
    "[-n,--iters <iteration count>] \n\t"
    "[-m,--agg_iters <aggregated iteration count>] \n\t"
    "[-w,--warmup_iters <warmup iteration count>] \n\t"
    "[-N,--run_cycles <cycle count> run & print each cycle (default: 1; 0=infinite)] \n\t"
    "[-p,--parallel_init <0/1>] \n\t"
    "[-c,--check <check iteration count>] \n\t"
    "[-o,--op <sum/prod/min/max/avg/mulsum/all>] \n\t"
    "[-d,--datatype <nccltype/all>] \n\t"
    "[-r,--root <root>] \n\t"
    "[-z,--blocking <0/1/2/3> 1=barrier after each inner iter (-m), 2=no barrier, 3=wait and barrier after each "
    "outer iter (-n)] \n\t"
    "[-y,--stream_null <0/1>] \n\t"
    "[-T,--timeout <time in seconds>] \n\t"
    "[-G,--cudagraph <num graph launches>] \n\t"
    "[-C,--report_cputime <0/1>] \n\t"
    "[-S,--report_timestamps <0/1> report timestamps (default 0)] \n\t"
    "[-J,--output_file <file> write output to filepath, if accessible. Infer type from suffix (only json supported "
    "presently.)] \n\t"
    "[-a,--average <0/1/2/3> report average iteration time <0=RANK0/1=AVG/2=MIN/3=MAX>] \n\t"
    "[-R,--local_register <0/1/2> enable local (1) or symmetric (2) buffer registration on send/recv buffers "
    "(default: disable (0))] \n\t"
    "[-x,--cta_policy <0/1/2> set CTA policy (NCCL_CTA_POLICY_DEFAULT (0), NCCL_CTA_POLICY_EFFICIENCY (1), "
    "NCCL_CTA_POLICY_ZERO (2)) (default: do not set)] \n\t"
    "[-D,--device_implementation <implementation number> enable device implementation (default: 0, use NCCL "
    "implementation; requires -R 2 if > 0)] \n\t"
    "[-V,--device_cta_count <number> set number of CTAs for device implementation (default: 16)] \n\t"
    "[-M,--memory <0/1> enable memory usage report (default: 0)] \n\t"
    "[-u,--unalign <index of first element> Misalign source and destination buffers (default: 0)] \n\t"
    "[-I,--per_iter_timing <0/1> per-iteration CUDA event timing\n\t"
    "    (best with -z 0, -z 2, or -z 3; with -z 1 includes barrier wait;\n\t"
    "    i_p99 uses nearest-rank percentile and may equal i_max\n\t"
    "    with <100 samples) (default: 0)] \n\t"
    "[-K,--per_iter_skip <count> exclude leading samples from -I summary stats (default: 0)] \n\t"
    "[-h,--help]\n"
)
GIB = 1 << 30


def parse_size(text: str) -> float:
    """nccl-tests' parsesize: a number with an optional K/M/G (binary) suffix; -1 when malformed."""
    number = text.rstrip("GgMmKk")
    units = {"g": GIB, "m": 1 << 20, "k": 1 << 10}.get(text[len(number):].lower(), 1)
    if len(text) - len(number) > 1:
        return -1.0
    try:
        return float(number) * units
    except ValueError:
        return -1.0


def strtol(text: str) -> int:
    """C's strtol(text, NULL, 0) for the decimal and 0x forms: the leading number, 0 when there is none."""
    try:
        return int(text, 0)
    except ValueError:
        digits = ""
        for char in text.strip():
            if not (char.isdigit() or (char == "-" and not digits)):
                break
            digits += char
        return int(digits) if digits.strip("-") else 0


def float_str(value: float, width: int) -> str:
    """getFloatStr: the most decimals (2, 1, 0) that fit the column, else scientific notation."""
    for spec in (".2f", ".1f", ".0f"):
        text = f"{value:{width}{spec}}"
        if len(text) <= width:
            return text
    return f"{value:{width}.1e}" if width >= 7 else f"{value:{width}.0e}"


class Options:
    """The parsed command line, with nccl-tests' defaults."""

    def __init__(self) -> None:
        self.threads, self.gpus = 1, 1
        self.min_bytes = self.max_bytes = 32 << 20
        self.step_bytes, self.step_factor = 1 << 20, 1
        self.iters, self.agg_iters, self.warmup, self.check = 20, 1, 1, 1


def parse(argv: list[str]) -> Options | int:
    """Options, or the exit status after printing what nccl-tests prints for a bad command line."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            letter = LONG_OPTIONS.get(name)
            if letter is None:
                sys.stderr.write(f"{PROGRAM}: unrecognized option '{arg}'\n")
                letter, value = "?", ""
            elif letter != "h" and not eq:
                if not args:
                    sys.stderr.write(f"{PROGRAM}: option '{arg}' requires an argument\n")
                    letter = "?"
                else:
                    value = args.pop(0)
        elif arg.startswith("-") and len(arg) > 1:
            letter, value = arg[1], arg[2:]
            if letter in OPTIONS_WITH_VALUE and not value:
                if not args:
                    sys.stderr.write(f"{PROGRAM}: option requires an argument -- '{letter}'\n")
                    letter = "?"
                else:
                    value = args.pop(0)
            elif letter not in OPTIONS_WITH_VALUE and letter != "h":
                sys.stderr.write(f"{PROGRAM}: invalid option -- '{letter}'\n")
                letter = "?"
        else:
            continue  # getopt leaves operands alone; nccl-tests ignores them
        if letter in ("h", "?"):
            if letter != "h":
                sys.stdout.write("invalid option '?'\n")
            sys.stdout.write(USAGE.format(PROGRAM))
            return 0
        if letter not in SIMULATED:
            sys.stderr.write(f"{PROGRAM}: option -{letter} is not simulated by the fleet lab\n")
            return 1
        if letter in "bei":
            parsed = parse_size(value)
            if parsed < 0:
                name = {"b": "minbytes", "e": "maxbytes", "i": "stepBytes"}[letter]
                sys.stderr.write(f"invalid size specified for '{name}'\n")
                return 255
            setattr(opts, {"b": "min_bytes", "e": "max_bytes", "i": "step_bytes"}[letter], int(parsed))
        elif letter in "od" and value not in ("sum", "float"):
            sys.stderr.write(f"{PROGRAM}: -{letter} {value} is not simulated by the fleet lab (sum/float only)\n")
            return 1
        elif letter in "tgfnmwc":
            setattr(opts, {"t": "threads", "g": "gpus", "f": "step_factor", "n": "iters", "m": "agg_iters",
                           "w": "warmup", "c": "check"}[letter], strtol(value))
    if opts.min_bytes > opts.max_bytes:
        sys.stderr.write(f"invalid sizes for 'minbytes' and 'maxbytes': {opts.min_bytes} > {opts.max_bytes}\n")
        return 255
    return opts


def nccl_version_code(version: str) -> int:
    """NCCL_VERSION_CODE of an upstream version such as 2.28.3 (major*10000 + minor*100 + patch)."""
    major, minor, patch = (int(p) for p in version.split(".")[:3])
    return major * 10000 + minor * 100 + patch


def bus_id(gpu: fleetsim.Gpu) -> str:
    """cudaDeviceProp's PCI domain, bus and device as nccl-tests prints them: [0000:07:00]."""
    domain, bus, rest = gpu.bus_id.split(":")
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(rest.split('.')[0], 16):02x}"


def main(argv: list[str]) -> int:
    """Run the all-reduce sweep; returns the exit status."""
    opts = parse(argv)
    if isinstance(opts, int):
        return opts
    try:
        nccl = fleetsim.package_info("libnccl2")
        tests = fleetsim.package_info("nccl-tests")
    except fleetsim.SimError:
        sys.stderr.write(f"{sys.argv[0]}: error while loading shared libraries: libnccl.so.2: cannot open shared "
                         "object file: No such file or directory\n")
        return 127
    host = socket.gethostname().split(".")[0]
    pid = os.getpid()
    out = sys.stdout
    step = (f"{opts.step_factor}(factor)" if opts.step_factor > 1 else f"{opts.step_bytes}(bytes)")
    out.write(f"# nccl-tests version {VERSION} nccl-headers={tests['nccl_headers']} "
              f"nccl-library={nccl_version_code(nccl['upstream_version'])}\n"
              f"# Collective test starting: {PROGRAM}\n"
              f"# nThread {opts.threads} nGpus {opts.gpus} minBytes {opts.min_bytes} maxBytes {opts.max_bytes} "
              f"step: {step} warmup iters: {opts.warmup} iters: {opts.iters} agg iters: {opts.agg_iters} "
              f"validation: {opts.check} graph: 0 unalign: 0\n#\n# Using devices\n")
    out.flush()

    def test_failure(code: int) -> int:
        out.write(f" .. {host} pid {pid}: Test failure {TESTCHECK_LINE}\n")
        return code

    try:
        fleetsim.nvml_init()
    except fleetsim.SimError as exc:
        kind = "mismatch" if exc.code == 18 else "no-driver"
        out.write(f"{host}: Test CUDA failure {CUDA_CHECK_LINE} '{CUDA_ERRORS[kind]}'\n")
        return test_failure(TEST_CUDA_ERROR)
    hw = fleetsim.load_hardware()
    gpus = hw.gpus()
    ranks = opts.threads * opts.gpus
    if ranks > len(gpus):
        out.flush()
        sys.stderr.write(f"Invalid number of GPUs: {ranks} requested but only {len(gpus)} were found.\n"
                         "Please check the number of processes and GPUs per process.\n")
        sys.stderr.flush()
        return test_failure(TEST_NOT_IMPLEMENTED)
    out.write("".join(f"#  Rank {i:2d} Group {0:2d} Pid {pid:6d} on {host:>10} device {i:2d} [{bus_id(g)}] "
                      f"{g.product_name}\n" for i, g in enumerate(gpus[:ranks])))
    # Reserve 1 GiB per 16 GiB installed (at most 4), 1 GiB for the rest, and three buffers with validation.
    max_mem = min(g.memory_mib for g in gpus[:ranks]) << 20
    reserve = min(-(-max_mem // (16 * GIB)) * GIB, 4 * GIB)
    mem_max_bytes = (max_mem - reserve - GIB) // (3 if opts.check else 2)
    max_bytes, min_bytes = opts.max_bytes, opts.min_bytes
    if max_bytes > mem_max_bytes:
        max_bytes = mem_max_bytes
        min_bytes = min(min_bytes, max_bytes)
        out.write(f"#\n# Reducing maxBytes to {max_bytes} due to memory limitation\n")
    if os.environ.get("NCCL_DEBUG", "").upper() in ("VERSION", "WARN", "INFO", "TRACE"):
        cuda = nccl["version"].rsplit("+cuda", 1)[-1]
        out.write(f"NCCL version {nccl['upstream_version']}+cuda{cuda}\n")

    peak, latency_us = (PEAK_BUSBW.get(hw.gpu_model, PCIE_DEFAULT) if hw.nvswitch or hw.gpu_model in ("T4", "A10G")
                        else PCIE_DEFAULT)
    peak *= float(nccl.get("busbw_factor", 1.0))
    if "nvlink-degraded" in hw.faults and hw.nvswitch:
        peak *= 0.5
    rng = random.Random()
    peak *= rng.uniform(0.985, 1.015)
    bytes_per_us = peak * 1e3
    factor = 2 * (ranks - 1) / ranks

    # writeResultHeader's printf formats: "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s %*s"
    def header(cells: tuple[str, ...]) -> str:
        widths = (10, 12, 8, 6, 6, 7, 6, 6, 6, 7, 6, 6, 6)
        return "# " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)) + " \n"

    out.write(f"#\n# {'':>10}  {'':>12}  {'':>8}  {'':>6}  {'':>6}           out-of-place                       "
              "in-place          \n")
    out.write(header(("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time",
                      "algbw", "busbw", "#wrong")))
    out.write(header(("(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)",
                      "(GB/s)", "")))
    busbw_sum, rows = 0.0, 0
    size = min_bytes
    while size <= max_bytes:
        count = size // 4
        nbytes = count * 4
        line = f"{nbytes:12d}  {count:12d}  {'float':>8}  {'sum':>6}  {-1:6d}"
        for _ in ("out-of-place", "in-place"):
            wire = nbytes * factor if ranks > 1 else float(nbytes)
            time_us = (latency_us + wire / bytes_per_us + (420.0 / bytes_per_us) * math.sqrt(wire))
            time_us *= rng.uniform(0.995, 1.005)
            algbw = nbytes / (time_us * 1e3)
            busbw = algbw * factor
            busbw_sum += busbw
            rows += 1
            line += f"  {float_str(time_us, 7):>7}  {float_str(algbw, 6):>6}  {float_str(busbw, 6):>6}  {0:6g}"
        out.write(line + "\n")
        if size == 0:
            break
        size = size * opts.step_factor if opts.step_factor > 1 else size + opts.step_bytes
    average = busbw_sum / rows if rows else 0.0
    out.write(f"# {'Out of bounds values':<20} : 0 OK\n"
              f"# {'Avg bus bandwidth':<20} : {average:g} \n#\n"
              f"# Collective test concluded: {PROGRAM}\n#\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
