#!/usr/bin/python3
"""Simulated NVIDIA DCGM exporter: `dcgm-exporter [-f COUNTERS.csv] [-a ADDRESS] [-c MILLISECONDS]`.

What the real one serves, on its own port (`-a`, ":9400" by default), path /metrics: Prometheus text,
one sample per GPU of each field the counters file (`-f`, "DCGM FIELD, type, help" lines) lists, labelled `gpu` (the
index), `UUID`, `pci_bus_id`, `device` (nvidiaN), `modelName`, `Hostname`, and `DCGM_FI_DRIVER_VERSION`.
It collects every `-c` milliseconds (30000 by default) and a scrape returns the last collection. The
lab's GPU memory in use is what the host's processes registered with the simulated driver (fleetsim),
so a serving release that leaks memory shows here, as on a real host. It needs NVML at start, as the
real exporter does, and exits 1 when the driver cannot be reached.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.dont_write_bytecode = True
import fleetsim  # noqa: E402

DEFAULT_COUNTERS = "/etc/dcgm-exporter/default-counters.csv"
SIMULATED = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED"}


def read_counters(path: str) -> list[tuple[str, str, str]]:
    """(field, Prometheus type, help) per line of a counters file; ValueError naming the line when malformed."""
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.split(",", 2)]
            if len(parts) != 3 or parts[1] not in ("gauge", "counter", "label"):
                raise ValueError(f"{path}:{number}: expected 'DCGM FIELD, gauge|counter|label, help', found {line!r}")
            if parts[0] not in SIMULATED:
                sys.stderr.write(f'level=warning msg="Skipping line {number} (\'{parts[0]}\'): metric not enabled"\n')
                continue
            out.append((parts[0], parts[1], parts[2]))
    return out


def collect(fields: list[tuple[str, str, str]]) -> str:
    """One collection: every field for every GPU the driver sees; SimError when NVML cannot answer."""
    driver = fleetsim.nvml_init()
    hw = fleetsim.load_hardware()
    used = fleetsim.fb_used()
    out = []
    for name, kind, help_text in fields:
        out += [f"# HELP {name} {help_text}\n", f"# TYPE {name} {kind}\n"]
        for g in hw.gpus():
            mib = min(used.get(g.index, 0), g.memory_mib)
            value = {"DCGM_FI_DEV_GPU_UTIL": 0 if mib == 0 else 35,
                     "DCGM_FI_DEV_FB_FREE": g.memory_mib - mib,
                     "DCGM_FI_DEV_FB_USED": mib}[name]
            out.append(f'{name}{{gpu="{g.index}",UUID="{g.uuid}",pci_bus_id="{g.bus_id}",device="nvidia{g.index}",'
                       f'modelName="{g.product_name}",Hostname="{hw.hostname}",DCGM_FI_DRIVER_VERSION="{driver}"}} '
                       f"{value}\n")
    return "".join(out)


class Collector:
    """The last collection, refreshed every interval (a failed collection keeps the previous one)."""

    def __init__(self, fields: list[tuple[str, str, str]], interval_s: float):
        self.fields, self.interval_s = fields, interval_s
        self.text = collect(fields)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.text = collect(self.fields)
            except fleetsim.SimError as exc:
                sys.stderr.write(f'level=error msg="Failed to collect metrics: {str(exc).strip()}"\n')


def serve(address: str, collector: Collector) -> ThreadingHTTPServer:
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                body, status, kind = b"404 page not found\n", 404, "text/plain; charset=utf-8"
            else:
                body, status, kind = collector.text.encode(), 200, "text/plain; version=0.0.4; charset=utf-8"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            pass

    return ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dcgm-exporter")
    parser.add_argument("-f", "--collectors", default=DEFAULT_COUNTERS,
                        help="path to the file of DCGM fields to collect")
    parser.add_argument("-a", "--address", default=":9400", help="address of the HTTP server (default :9400)")
    parser.add_argument("-c", "--collect-interval", type=int, default=30000,
                        help="interval of time at which point metrics are collected, in milliseconds")
    args = parser.parse_args(argv)
    try:
        fields = read_counters(args.collectors)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f'level=fatal msg="{exc}"\n')
        return 1
    try:
        collector = Collector(fields, args.collect_interval / 1000)
        server = serve(args.address, collector)
    except fleetsim.SimError as exc:
        sys.stderr.write(f'level=fatal msg="Error starting nv-hostengine: {str(exc).strip()}"\n')
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f'level=fatal msg="Failed to start the HTTP server on {args.address}: {exc}"\n')
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: collector.stop.set())
    threading.Thread(target=collector.run, name="collector", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    sys.stderr.write(f'level=info msg="Starting webserver" address="{args.address}"\n')
    collector.stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
