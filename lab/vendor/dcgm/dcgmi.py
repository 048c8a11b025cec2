#!/usr/bin/python3
"""Simulated dcgmi (DCGM 4.2.3, package datacenter-gpu-manager-4-core): `dcgmi diag -r 1|2|3 [-j]` only.

What a run reports, from the lab's hardware files (NVIDIA/DCGM v4.2.3 dcgmi/Diag.cpp, nvvs/src/Software.cpp,
nvvs/src/NvidiaValidationSuite.cpp; the format in tests/unit/formats/SOURCES.md):

- level 1 runs the software plugin ("software", category "Deployment"), one result per GPU; level 2 adds
  "memory" (Hardware) and "pcie" (Integration), level 3 "diagnostic" and "nvbandwidth" (Hardware) and
  "memory_bandwidth", "targeted_stress", "targeted_power" (Stress). Those CUDA plugins ship in
  datacenter-gpu-manager-4-cuda12: without it a level 2 or 3 run is the software plugin alone, as on a real host.
- ecc-errors: GPU 0 has an uncorrectable error, so "Page Retirement/Row Remap" fails it (row remapping
  pending on Ampere and Hopper, a pending page retirement with a DBE on Turing, which fails every GPU) and
  NVVS stops there: no later test runs, whatever the level. gpu-missing: one GPU fewer. Persistence mode
  off (no nvidia-persistenced): every GPU's software result fails with DCGM's persistence warning.
- the JSON keeps DCGM's quirks: keys sorted, jsoncpp's tab-indented layout, and a warning shown as "Fail"
  (dcgmi prints "Warn" only in its text table's test line).
- exit status: 0 all passed; 226 (DCGM_ST_NVVS_ERROR, -30) a test failed; 205 (DCGM_ST_NVVS_ISOLATE_ERROR,
  -51) an error that asks for the GPU to be isolated; 200 (DCGM_ST_NVML_NOT_LOADED, -56) NVML cannot talk to
  the driver (none loaded, or a Driver/library version mismatch), with dcgmi's "Unable to complete
  diagnostic" message (as "runtime_error" under -j).

Without a running nv-hostengine, `dcgmi diag` starts an embedded host engine and runs the same diagnostic
(StartDiag::DoExecuteConnectionFailure in every DCGM release): a stopped nvidia-dcgm does not stop a diag.
"""

from __future__ import annotations

import hashlib
import json
import sys

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

# PCI device ids DCGM reports as an entity's "device_id" (its SKU device id), by the fleet model's GPU names.
PCI_DEVICE_IDS = {"A100-SXM4-40GB": "20b0", "A100-SXM4-80GB": "20b2", "H100-SXM5-80GB": "2330",
                  "H200-SXM5-141GB": "2335", "T4": "1eb8", "A10G": "2237"}
LEVELS = {"1": 1, "short": 1, "quick": 1, "2": 2, "medium": 2, "3": 3, "long": 3}
# (test, category) in the order NVVS runs them (TestFramework::Go: hardware, integration, performance), by level
PLUGIN_TESTS = {
    2: [("memory", "Hardware"), ("pcie", "Integration")],
    3: [("memory", "Hardware"), ("diagnostic", "Hardware"), ("nvbandwidth", "Hardware"), ("pcie", "Integration"),
        ("memory_bandwidth", "Stress"), ("targeted_stress", "Stress"), ("targeted_power", "Stress")],
}
# dcgmReturn_t values and what dcgmi's process exits with (the negative code as an unsigned byte)
DCGM_ST_NVVS_ERROR, DCGM_ST_NVVS_ISOLATE_ERROR, DCGM_ST_NVML_NOT_LOADED = -30, -51, -56
# dcgmErrorSeverity_t DCGM_ERROR_ISOLATE
SEVERITY_ISOLATE = 2
ENTITY_IDS = "*,cpu:*"  # dcgmi diag's default --entity-id
USAGE = ("dcgmi: the lab's simulated dcgmi implements `dcgmi diag -r 1|2|3 [-j]` only\n")


def warning(code: int, severity: int, category: int, message: str) -> dict:
    """One entry of a result's "warnings" (DCGM's error id, dcgmErrorSeverity_t, dcgmErrorCategory_t)."""
    return {"error_category": category, "error_id": code, "error_severity": severity, "warning": message}


def persistence_warning(gpu: int) -> dict:
    # DCGM_FR_PERSISTENCE_MODE (29): DCGM_ERROR_CONFIG, DCGM_FR_EC_SOFTWARE_OTHER
    return warning(29, 5, 8, f"Persistence Mode: Persistence mode for GPU {gpu} is disabled. Enable persistence "
                             f"mode by running \"nvidia-smi -i <gpuId> -pm 1 \" as root.")


def memory_error_warning(gpu: int, architecture: str) -> dict:
    if architecture == "Turing":
        # DCGM_FR_DBE_PENDING_PAGE_RETIREMENTS (83): DCGM_ERROR_RESET, DCGM_FR_EC_HARDWARE_MEMORY
        return warning(83, 6, 10, f"Page Retirement/Row Remap: Pending page retirements together with a DBE were "
                                  f"detected on GPU {gpu}. Drain the GPU and reset it or reboot the node to resolve "
                                  f"this issue.")
    # DCGM_FR_PENDING_ROW_REMAP (85): DCGM_ERROR_RESET, DCGM_FR_EC_HARDWARE_MEMORY
    return warning(85, 6, 10, f"Page Retirement/Row Remap: GPU {gpu} had memory errors and row remappings are pending "
                              f"Check DCGM and system logs for errors. Reset GPU. Restart DCGM. Rerun diagnostics.")


def serial_number(hostname: str, index: int) -> str:
    """A board serial number of the 13-digit form NVIDIA data-center GPUs report, stable per host and GPU."""
    digest = hashlib.sha256(f"{hostname}/gpu/{index}/serial".encode()).hexdigest()
    return "1" + str(int(digest[:16], 16))[-12:].rjust(12, "0")


class Diagnostic:
    """One `dcgmi diag` run against the host's simulated GPUs."""

    def __init__(self, level: int):
        self.level = level
        self.cli_status: dict[str, str] = {}  # the text table's test line shows a warning as "Warn"
        self.version = fleetsim.package_info("dcgm")["upstream_version"]
        self.plugins = (fleetsim.lib_dir() / "dcgm-cuda12" / "package.json").is_file()

    def run(self) -> tuple[dict, int]:
        """The JSON document dcgmi prints and its exit status; SimError when NVML cannot reach the driver."""
        try:
            driver = fleetsim.nvml_init()
        except fleetsim.SimError as exc:
            raise fleetsim.SimError(f"Error: Unable to complete diagnostic for entities {ENTITY_IDS}. "
                                    f"Return: ({DCGM_ST_NVML_NOT_LOADED}) \n", DCGM_ST_NVML_NOT_LOADED & 0xFF) from exc
        hw = fleetsim.load_hardware()
        gpus = hw.gpus()
        architecture = fleetsim.ARCHITECTURES.get(hw.gpu_model, "")
        persistence = fleetsim.pidfile_alive("nvidia-persistenced.pid")

        # The software plugin's subtests run in std::map order: "Page Retirement/Row Remap" before
        # "Persistence Mode", so a GPU's warnings come in that order.
        results: list[dict] = []
        stop = False
        for gpu in gpus:
            warnings = []
            if gpu.ecc_uncorrected_volatile > 0:
                warnings.append(memory_error_warning(gpu.index, architecture))
                stop = True  # NVVS stops after a pending row remap or page retirement (main_should_stop)
            if not persistence:
                warnings.append(persistence_warning(gpu.index))
            results.append(self.result(gpu.index, "Fail" if warnings else "Pass", warnings))
        if stop and architecture == "Turing":
            for result in results:  # the page-retirement check fails the whole test (SetResult, not per GPU)
                result["status"] = "Fail"
        tests = [("Deployment", self.test("software", results))]
        if results and not stop and any(r["status"] == "Fail" for r in results):
            self.cli_status["software"] = "Warn"  # persistence mode: a warning (SetResult NVVS_RESULT_WARN)
        if not stop and self.plugins:
            for name, category in PLUGIN_TESTS.get(self.level, []):
                tests.append((category, self.test(name, [self.result(g.index, "Pass", []) for g in gpus])))

        categories: list[dict] = []
        for category, test in tests:
            entry = next((c for c in categories if c["category"] == category), None)
            if entry is None:
                entry = {"category": category, "tests": []}
                categories.append(entry)
            entry["tests"].append(test)
        document = {
            "DCGM Diagnostic": {"test_categories": categories},
            "entity_groups": [{
                "entities": [{"device_id": PCI_DEVICE_IDS.get(g.model, "0000"), "entity_id": g.index,
                              "serial_num": serial_number(hw.hostname, g.index)} for g in gpus],
                "entity_group": "GPU",
                "entity_group_id": 1,
            }] if gpus else [],
            "metadata": {"Driver Version Detected": driver, "version": self.version},
        }
        if not gpus:
            del document["entity_groups"]
        return document, self.exit_status(categories)

    @staticmethod
    def result(gpu: int, status: str, warnings: list[dict]) -> dict:
        entry: dict = {"entity_group": "GPU", "entity_group_id": 1, "entity_id": gpu, "status": status}
        if warnings:
            entry["warnings"] = warnings
        return entry

    @staticmethod
    def test(name: str, results: list[dict]) -> dict:
        failed = any(r["status"] == "Fail" for r in results)
        return {"name": name, "results": results, "test_summary": {"status": "Fail" if failed else "Pass"}}

    @staticmethod
    def exit_status(categories: list[dict]) -> int:
        """Diag::GetFailureResult: an ISOLATE-severity error wins, any other error fails the run."""
        warnings = [w for c in categories for t in c["tests"] for r in t["results"] for w in r.get("warnings", [])]
        if any(w["error_severity"] == SEVERITY_ISOLATE for w in warnings):
            return DCGM_ST_NVVS_ISOLATE_ERROR & 0xFF
        return DCGM_ST_NVVS_ERROR & 0xFF if warnings else 0


def styled(value: object) -> str:
    """`Json::Value::toStyledString()` (jsoncpp's BuiltStyledStreamWriter with a tab indentation): keys sorted,
    objects and arrays of objects opened on their own line, short arrays of scalars on one line."""
    out: list[str] = []
    state = {"indented": True, "indent": ""}

    def write_indent() -> None:
        out.append("\n" + state["indent"])

    def write_with_indent(text: str) -> None:
        if not state["indented"]:
            write_indent()
        out.append(text)
        state["indented"] = False

    def scalar(v: object) -> str:
        return json.dumps(v)

    def write_value(v: object) -> None:
        if isinstance(v, dict):
            if not v:
                out.append("{}")
                return
            write_with_indent("{")
            state["indent"] += "\t"
            keys = sorted(v)
            for i, key in enumerate(keys):
                write_with_indent(json.dumps(key))
                out.append(" : ")
                write_value(v[key])
                if i + 1 < len(keys):
                    out.append(",")
            state["indent"] = state["indent"][:-1]
            write_with_indent("}")
        elif isinstance(v, list):
            write_array(v)
        else:
            out.append(scalar(v))

    def write_array(values: list) -> None:
        if not values:
            out.append("[]")
            return
        nested = any(isinstance(c, (dict, list)) and c for c in values) or len(values) * 3 >= 74
        children = [] if nested else [("[]" if c == [] else "{}" if c == {} else scalar(c)) for c in values]
        multiline = nested or 4 + (len(values) - 1) * 2 + sum(len(c) for c in children) >= 74
        if not multiline:
            out.append("[ " + ", ".join(children) + " ]")
            return
        write_with_indent("[")
        state["indent"] += "\t"
        for i, child in enumerate(values):
            if children:
                write_with_indent(children[i])
            else:
                if not state["indented"]:
                    write_indent()
                state["indented"] = True
                write_value(child)
                state["indented"] = False
            if i + 1 < len(values):
                out.append(",")
        state["indent"] = state["indent"][:-1]
        write_with_indent("]")

    write_value(value)
    return "".join(out) + "\n"


def table(document: dict, cli_status: dict[str, str]) -> str:
    """dcgmi diag's text output (Diag::HelperDisplayAsCli) for a document from Diagnostic.run; `cli_status`
    overrides a test line's status ("Warn", which the JSON and the per-GPU lines print as "Fail")."""
    line = "+---------------------------+------------------------------------------------+\n"

    def row(name: str, info: str) -> str:
        return f"| {name:<25} | {info:<46} |\n"

    out = ["Successfully ran diagnostic for group.\n", line,
           "| Diagnostic                | Result                                         |\n",
           "+===========================+================================================+\n",
           "|-----  Metadata  ----------+------------------------------------------------|\n",
           row("DCGM Version", document["metadata"]["version"]),
           row("Driver Version Detected", document["metadata"]["Driver Version Detected"])]
    entities = [e for g in document.get("entity_groups", []) for e in g["entities"]]
    if entities:
        out.append(row("GPU Device IDs Detected", ", ".join(e["device_id"] for e in entities)))
    banners = {"Deployment": "|-----  Deployment  --------+------------------------------------------------|\n",
               "Hardware": "+-----  Hardware  ----------+------------------------------------------------+\n",
               "Integration": "+-----  Integration  -------+------------------------------------------------+\n",
               "Stress": "+-----  Stress  ------------+------------------------------------------------+\n"}
    categories = {c["category"]: c for c in document["DCGM Diagnostic"]["test_categories"]}
    for name, banner in banners.items():
        if name not in categories:
            continue
        out.append(banner)
        for test in categories[name]["tests"]:
            out.append(row(test["name"], cli_status.get(test["name"], test["test_summary"]["status"])))
            for result in test["results"]:
                out.append(row("", f"GPU{result['entity_id']}: {result['status']}"))
                for w in result.get("warnings", []):
                    message = w["warning"]
                    for start in range(0, len(message), 45):
                        out.append(row(f"Warning: GPU{result['entity_id']}" if start == 0 else "",
                                       message[start:start + 45]))
    out.append(line)
    return "".join(out)


def main(argv: list[str]) -> int:
    """`dcgmi diag -r LEVEL [-j]`; returns dcgmi's exit status."""
    if argv[:1] != ["diag"]:
        sys.stderr.write(USAGE)
        return 1
    level, as_json = None, False
    args = argv[1:]
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=")
        if name in ("-r", "--run"):
            if not eq:
                if not args:
                    sys.stderr.write(USAGE)
                    return 1
                inline = args.pop(0)
            level = LEVELS.get(inline.lower())
            if level is None:
                sys.stderr.write(USAGE)
                return 1
        elif arg in ("-j", "--json"):
            as_json = True
        else:
            sys.stderr.write(USAGE)
            return 1
    if level is None:
        sys.stderr.write(USAGE)
        return 1
    try:
        diagnostic = Diagnostic(level)
        document, status = diagnostic.run()
    except fleetsim.SimError as exc:
        if as_json and exc.code == DCGM_ST_NVML_NOT_LOADED & 0xFF:
            # Diag::HelperDisplayFailureMessage: the message under "runtime_error", then std::endl
            version = fleetsim.package_info("dcgm")["upstream_version"]
            sys.stdout.write(styled({"DCGM Diagnostic": {"runtime_error": exc.message, "version": version}}) + "\n")
        else:
            sys.stdout.write(exc.message + "\n")
        return exc.code
    sys.stdout.write(styled(document) if as_json else table(document, diagnostic.cli_status))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
