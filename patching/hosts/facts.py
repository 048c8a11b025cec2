"""Parsers for what the hosts' tools print: pure functions from text to dataclasses.

Used by the host checks and by the lab's tests alike, so the lab is judged by the same reading a
real host gets. Each parser accepts the real tools' output, quirks included (FORMATS.md):

- `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`: `parse_smi_csv`, `gpus_from_csv`
- `nvidia-smi -q`: `parse_smi_query`; `nvidia-smi topo -m`: `parse_topo_matrix`
- the NVML failures (version mismatch, no driver): `nvml_failure`
- `ibstat`: `parse_ibstat`; `nvcc --version`: `parse_nvcc_version`
- `fi_info -p efa`: `parse_fi_info`, `efa_device_count`
- `upsc UPS@HOST`: `parse_upsc`; Prometheus text exposition: `parse_prometheus`
- `podman container inspect --format '{{.State.Running}} {{.ImageDigest}}' NAME`: `container_image_command`,
  `parse_container_image` (the serving container's image digest, as the runtime reports it)
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field

NA_VALUES = ("[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]")


class ParseError(ValueError):
    """The text is not the tool's output (or the tool reported a failure instead)."""


# ---- NVML failures ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NvmlFailure:
    """nvidia-smi could not initialise NVML: `mismatch` (driver changed without reboot) or `no-driver`."""

    kind: str
    message: str
    library_version: str | None = None


def nvml_failure(text: str) -> NvmlFailure | None:
    """The NVML failure nvidia-smi printed instead of data, or None when it printed data."""
    if "Driver/library version mismatch" in text:
        match = re.search(r"NVML library version:\s*(\S+)", text)
        return NvmlFailure("mismatch", "Failed to initialize NVML: Driver/library version mismatch",
                           match.group(1) if match else None)
    if "couldn't communicate with the NVIDIA driver" in text or "Failed to initialize NVML" in text:
        line = next(line for line in text.splitlines() if "NVIDIA" in line or "NVML" in line)
        return NvmlFailure("no-driver", line.strip())
    return None


def _no_nvml_failure(text: str) -> None:
    failure = nvml_failure(text)
    if failure:
        raise ParseError(failure.message + (f" (NVML library {failure.library_version})"
                                            if failure.library_version else ""))


# ---- nvidia-smi --query-gpu CSV ----------------------------------------------------------------------

@dataclass(frozen=True)
class SmiCsv:
    """Rows of a --query-gpu CSV: field -> value with units stripped, None for N/A values."""

    fields: tuple[str, ...]
    rows: tuple[dict[str, str | None], ...]

    def column(self, name: str) -> list[str | None]:
        """One field's values, GPU by GPU."""
        return [row[name] for row in self.rows]


def _field_name(header: str) -> str:
    # "memory.total [MiB]" -> "memory.total"
    return header.split(" [", 1)[0].strip()


def _value(raw: str) -> str | None:
    raw = raw.strip()
    if raw in NA_VALUES:
        return None
    match = re.fullmatch(r"(-?[\d.]+) (MiB|W|%|MHz|C)", raw)
    return match.group(1) if match else raw


def parse_smi_csv(text: str, fields: list[str] | tuple[str, ...] | None = None) -> SmiCsv:
    """Parse `nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]`.

    With a header the field names come from it (units in brackets dropped); for `noheader` output
    pass the fields you queried. Values lose their units (`40960 MiB` -> `40960`); `[N/A]` and
    `[Not Supported]` become None. Raises ParseError on an NVML failure or a column-count mismatch.
    """
    _no_nvml_failure(text)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and re.match(r"^Field \".*\" is not a valid field", lines[0]):
        raise ParseError(lines[0])
    if fields is None:
        if not lines:
            raise ParseError("no header: pass the queried fields for noheader output")
        fields = tuple(_field_name(h) for h in lines[0].split(","))
        lines = lines[1:]
    elif lines and [_field_name(h) for h in lines[0].split(",")] == [f.strip() for f in fields]:
        lines = lines[1:]  # a header the caller did not expect: skip it rather than read it as a GPU
    fields = tuple(f.strip() for f in fields)
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.split(", ")] if ", " in line else [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            raise ParseError(f"expected {len(fields)} values ({', '.join(fields)}), found {len(cells)}: {line!r}")
        rows.append({f: _value(c) for f, c in zip(fields, cells, strict=True)})
    return SmiCsv(fields, tuple(rows))


@dataclass(frozen=True)
class GpuInfo:
    """The common per-GPU facts from a --query-gpu result (None where not queried or N/A)."""

    index: int | None = None
    name: str | None = None
    uuid: str | None = None
    bus_id: str | None = None
    driver_version: str | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    persistence_mode: bool | None = None
    ecc_mode_current: bool | None = None
    ecc_mode_pending: bool | None = None
    ecc_uncorrected_volatile: int | None = None


def gpus_from_csv(table: SmiCsv) -> list[GpuInfo]:
    """Typed per-GPU facts from a parsed --query-gpu table."""

    def num(v: str | None) -> int | None:
        return None if v is None else int(float(v))

    def enabled(v: str | None) -> bool | None:
        return None if v is None else v.strip().lower() in ("enabled", "on", "1")

    out = []
    for row in table.rows:
        out.append(GpuInfo(
            index=num(row.get("index")),
            name=row.get("name") or row.get("gpu_name"),
            uuid=row.get("uuid") or row.get("gpu_uuid"),
            bus_id=row.get("pci.bus_id") or row.get("gpu_bus_id"),
            driver_version=row.get("driver_version"),
            memory_total_mib=num(row.get("memory.total")),
            memory_used_mib=num(row.get("memory.used")),
            persistence_mode=enabled(row.get("persistence_mode")),
            ecc_mode_current=enabled(row.get("ecc.mode.current")),
            ecc_mode_pending=enabled(row.get("ecc.mode.pending")),
            ecc_uncorrected_volatile=num(row.get("ecc.errors.uncorrected.volatile.total")),
        ))
    return out


# ---- nvidia-smi -q -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SmiQueryGpu:
    """One GPU section of `nvidia-smi -q`."""

    bus_id: str
    product_name: str | None
    uuid: str | None
    persistence_mode: bool | None
    ecc_mode_current: bool | None
    ecc_mode_pending: bool | None
    ecc_uncorrected_volatile: int | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    values: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class SmiQuery:
    """`nvidia-smi -q`: header versions and the GPU sections."""

    driver_version: str | None
    cuda_version: str | None
    attached_gpus: int | None
    gpus: tuple[SmiQueryGpu, ...]


_GPU_HEADER = re.compile(r"^GPU ([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])\s*$")
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>\S.*?)\s*:(?:\s+(?P<value>.*?))?\s*$")


def parse_smi_query(text: str) -> SmiQuery:
    """Parse `nvidia-smi -q` (any column width). Nested keys are joined with '/' in SmiQueryGpu.values,
    e.g. `ECC Errors/Volatile/DRAM Uncorrectable`. Raises ParseError on an NVML failure."""
    _no_nvml_failure(text)
    top: dict[str, str] = {}
    gpus: list[tuple[str, dict[str, str]]] = []
    stack: list[tuple[int, str]] = []  # (indent, section name) inside the current GPU
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("=="):
            continue
        indent = len(line) - len(line.lstrip())
        gpu = _GPU_HEADER.match(line)
        if gpu:
            gpus.append((gpu.group(1), {}))
            stack = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        match = _KEY_LINE.match(line)
        if match is None:
            stack.append((indent, line.strip()))  # a section header such as "    ECC Errors"
            continue
        key, value = match.group("key"), match.group("value") or ""
        if indent == 0 or not gpus:
            top[key] = value
        else:
            gpus[-1][1]["/".join([s for _, s in stack] + [key])] = value

    def flag(v: str | None) -> bool | None:
        return None if v in (None, "", "N/A") else v == "Enabled"

    def mib(v: str | None) -> int | None:
        match = re.match(r"(\d+)\s*MiB", v or "")
        return int(match.group(1)) if match else None

    def uncorrected(values: dict[str, str]) -> int | None:
        # R525+ lists SRAM/DRAM Uncorrectable under Volatile; older drivers "Double Bit/.../Total".
        keys = [k for k in values if k.startswith("ECC Errors/Volatile/")
                and ("Uncorrectable" in k or k.endswith("Double Bit/Total"))]
        nums = [int(values[k]) for k in keys if values[k].isdigit()]
        return sum(nums) if nums else None

    parsed = tuple(SmiQueryGpu(
        bus_id=bus,
        product_name=v.get("Product Name"),
        uuid=v.get("GPU UUID"),
        persistence_mode=flag(v.get("Persistence Mode")),
        ecc_mode_current=flag(v.get("ECC Mode/Current")),
        ecc_mode_pending=flag(v.get("ECC Mode/Pending")),
        ecc_uncorrected_volatile=uncorrected(v),
        memory_total_mib=mib(v.get("FB Memory Usage/Total")),
        memory_used_mib=mib(v.get("FB Memory Usage/Used")),
        values=v,
    ) for bus, v in gpus)
    attached = top.get("Attached GPUs")
    return SmiQuery(top.get("Driver Version"), top.get("CUDA Version"),
                    int(attached) if attached and attached.isdigit() else None, parsed)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_topo_matrix(text: str) -> dict[tuple[str, str], str]:
    """`nvidia-smi topo -m` as {(row, column): link} for the GPU/NIC matrix, e.g. ('GPU0', 'GPU1'): 'NV12'."""
    _no_nvml_failure(text)
    # the real tool underlines its header row with ANSI escapes even when writing to a pipe or file
    lines = [line for line in ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    if not lines:
        raise ParseError("empty topology output")
    columns = [c for c in lines[0].split("\t") if re.fullmatch(r"(GPU|NIC)\d+", c.strip())]
    links = {}
    for line in lines[1:]:
        cells = line.split("\t")
        row = cells[0].strip()
        if not re.fullmatch(r"(GPU|NIC)\d+", row):
            break  # the legend follows the matrix
        for column, cell in zip(columns, cells[1:], strict=False):
            links[(row, column.strip())] = cell.strip()
    return links


# ---- ibstat --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IbPort:
    """One port of an HCA as ibstat reports it."""

    number: int
    state: str | None
    physical_state: str | None
    rate: int | None
    base_lid: int | None
    sm_lid: int | None
    port_guid: str | None
    link_layer: str | None

    @property
    def up(self) -> bool:
        """The port is Active and its physical link is up."""
        return self.state == "Active" and self.physical_state == "LinkUp"

    @property
    def infiniband(self) -> bool:
        """False for RoCE (Link layer: Ethernet)."""
        return self.link_layer == "InfiniBand"


@dataclass(frozen=True)
class IbCa:
    """One channel adapter (HCA)."""

    name: str
    ca_type: str | None
    firmware: str | None
    node_guid: str | None
    ports: tuple[IbPort, ...]


def parse_ibstat(text: str) -> list[IbCa]:
    """Parse `ibstat` output (tab- or space-indented, one or many CAs, blank lines or none between)."""
    cas: list[tuple[str, dict[str, str], list[tuple[int, dict[str, str]]]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        ca = re.fullmatch(r"CA '([^']+)'", line)
        port = re.fullmatch(r"Port (\d+):", line)
        if ca:
            cas.append((ca.group(1), {}, []))
        elif not cas:
            continue  # noise before the first CA (e.g. a warning)
        elif port:
            cas[-1][2].append((int(port.group(1)), {}))
        elif ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            (cas[-1][2][-1][1] if cas[-1][2] else cas[-1][1])[key] = value

    def num(v: str | None) -> int | None:
        return int(v) if v and v.isdigit() else None

    if not cas and text.strip():
        raise ParseError("no \"CA '...'\" block in ibstat output")
    return [IbCa(name, attrs.get("CA type"), attrs.get("Firmware version"), attrs.get("Node GUID"), tuple(
        IbPort(number, p.get("State"), p.get("Physical state"), num(p.get("Rate")), num(p.get("Base lid")),
               num(p.get("SM lid")), p.get("Port GUID"), p.get("Link layer"))
        for number, p in ports)) for name, attrs, ports in cas]


# ---- nvcc ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NvccVersion:
    """`nvcc --version`: the CUDA release (13.0) and the compiler's own version (13.0.88)."""

    release: str
    version: str


def parse_nvcc_version(text: str) -> NvccVersion:
    """Parse `nvcc --version`; ParseError when the `Cuda compilation tools` line is missing."""
    match = re.search(r"Cuda compilation tools, release (\d+\.\d+), V(\d+\.\d+\.\d+)", text)
    if not match:
        raise ParseError("no 'Cuda compilation tools, release X.Y, VX.Y.Z' line in nvcc output")
    return NvccVersion(match.group(1), match.group(2))


# ---- fi_info -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FiInfoEntry:
    """One provider entry of `fi_info`."""

    provider: str
    fabric: str | None
    domain: str | None
    version: str | None
    type: str | None
    protocol: str | None


def parse_fi_info(text: str) -> list[FiInfoEntry]:
    """Parse `fi_info` (default, non-verbose) output. `fi_getinfo: -61 (No data available)`, what
    libfabric prints when nothing matches, gives []. mpirun's `[1,0]<stdout>:` prefixes are dropped."""
    entries: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = re.sub(r"^\[\d+,\d+\]<std(out|err)>:", "", raw).strip()
        key, sep, value = line.partition(":")
        if not sep or " " in key:
            continue
        if key == "provider":
            entries.append({"provider": value.strip()})
        elif entries:
            entries[-1].setdefault(key, value.strip())
    return [FiInfoEntry(e["provider"], e.get("fabric"), e.get("domain"), e.get("version"), e.get("type"),
                        e.get("protocol")) for e in entries]


def efa_device_count(entries: list[FiInfoEntry], ep_type: str = "FI_EP_RDM") -> int:
    """EFA devices in `fi_info -p efa` entries: distinct domains of the plain `efa` provider.

    Device names differ by instance (efa_0, rdmap16s27), so nothing is matched by name. libfabric
    2.x lists each device twice (fabric `efa` and `efa-direct`) and utility providers such as
    `efa;ofi_rxd` repeat them, hence distinct domains of provider `efa` rather than entries.
    """
    return len({e.domain for e in entries if e.provider == "efa" and e.type == ep_type and e.domain})


# ---- NUT upsc ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpsStatus:
    """`upsc UPS@HOST[:PORT]` variables; `error` holds upsc's `Error: ...` (e.g. Data stale) instead."""

    variables: dict[str, str]
    error: str | None = None

    @property
    def status(self) -> tuple[str, ...]:
        """ups.status tokens, e.g. ('OL', 'CHRG'); ('WAIT',) before the driver's first data."""
        return tuple(self.variables.get("ups.status", "").split())

    @property
    def on_line(self) -> bool:
        """On utility power (OL, not OB)."""
        return "OL" in self.status and "OB" not in self.status

    @property
    def on_battery(self) -> bool:
        """Running on battery (OB)."""
        return "OB" in self.status

    def number(self, name: str) -> float | None:
        """A numeric variable (battery.charge, battery.runtime, ups.load), None when absent."""
        try:
            return float(self.variables[name])
        except (KeyError, ValueError):
            return None


def parse_upsc(text: str) -> UpsStatus:
    """Parse `upsc` output; lines without `name: value` (like `Init SSL without certificate database`,
    which upsc prints on stderr when both streams are captured together) are skipped."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("Error: "):
            return UpsStatus({}, line[len("Error: "):].strip())
        name, sep, value = line.partition(": ")
        if sep and re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", name):
            variables[name] = value.strip()
    return UpsStatus(variables)


# ---- Prometheus text exposition ------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One sample: metric name, labels, value (and the optional timestamp in ms)."""

    name: str
    labels: dict[str, str]
    value: float
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class Metrics:
    """A scrape: its samples, with lookups by name and label subset."""

    samples: tuple[Sample, ...]

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples of `name` whose labels include `labels`."""
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum over matching samples (e.g. a counter split by a label you do not filter on); None if none."""
        found = self.find(name, **labels)
        return sum(s.value for s in found) if found else None

    def histogram_quantile(self, name: str, q: float, **labels: str) -> float | None:
        """The q-quantile of histogram `name` (without _bucket), interpolated in the bucket as Prometheus does."""
        buckets: dict[float, float] = {}
        for s in self.find(f"{name}_bucket", **labels):
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
        if not buckets or buckets.get(math.inf, 0.0) == 0:
            return None
        bounds = sorted(buckets)
        rank = q * buckets[bounds[-1]]
        previous_bound, previous_count = 0.0, 0.0
        for bound in bounds:
            if buckets[bound] >= rank:
                if math.isinf(bound):
                    return previous_bound
                width = buckets[bound] - previous_count
                return previous_bound + (bound - previous_bound) * ((rank - previous_count) / width if width else 1)
            previous_bound, previous_count = bound, buckets[bound]
        return bounds[-1]


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?"
                     r"\s+(?P<value>\S+)(?:\s+(?P<ts>-?\d+))?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}.get(m.group(1), m.group(0)), value)


def parse_prometheus(text: str) -> Metrics:
    """Parse the Prometheus text format (0.0.4): comments skipped, escaped label values, +Inf/NaN,
    optional timestamps. ParseError names the first line that is not a sample."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ParseError(f"line {number}: not a Prometheus sample: {line!r}")
        labels: dict[str, str] = {}
        rest = match.group("labels") or ""
        while rest.strip():
            label = _LABEL.match(rest)
            if not label:
                raise ParseError(f"line {number}: bad labels: {match.group('labels')!r}")
            labels[label.group(1)] = _unescape(label.group(2))
            rest = rest[label.end():]
        try:
            value = float(match.group("value"))
        except ValueError as exc:
            raise ParseError(f"line {number}: bad value {match.group('value')!r}") from exc
        ts = match.group("ts")
        samples.append(Sample(match.group("name"), labels, value, int(ts) if ts else None))
    return Metrics(tuple(samples))


# ---- dcgmi diag -j -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiagResult:
    """One result of `dcgmi diag`: a test on one GPU (or the whole test when it has no per-GPU results)."""

    test: str          # as DCGM names it: "software", "memory", "pcie" (4.x); "Denylist", "PCIe" (3.x)
    category: str      # "Deployment", "Hardware", "Integration", "Stress"
    gpu: str | None    # the GPU id as DCGM prints it ("0"); "cpu:0" for another entity; None for the test
    status: str        # "Pass" | "Fail" | "Warn" | "Skip", as printed (DCGM 4.x's JSON prints a warning as "Fail")
    info: str          # the warnings, then the info messages, joined with "; " ("" when none)


@dataclass(frozen=True)
class DcgmDiag:
    """`dcgmi diag -r N -j`: the DCGM version and every result, in DCGM's order."""

    version: str | None
    results: tuple[DiagResult, ...]

    @property
    def failures(self) -> tuple[DiagResult, ...]:
        """The results whose status is Fail."""
        return tuple(r for r in self.results if r.status.lower() == "fail")

    @property
    def passed(self) -> bool:
        """No result failed (Warn and Skip do not fail)."""
        return not self.failures


def _diag_messages(entry: dict) -> str:
    messages = []
    for warning in entry.get("warnings") or []:
        text = warning.get("warning") if isinstance(warning, dict) else warning
        if isinstance(text, str) and text:
            messages.append(text)
    info = entry.get("info") or []
    messages += [i for i in ([info] if isinstance(info, str) else info) if isinstance(i, str) and i]
    return "; ".join(messages)


def _diag_entities(entry: dict) -> list[str | None]:
    """The GPU ids a result entry names: DCGM 4.x's entity_group/entity_id, DCGM 3.x's gpu_ids ("0,1" or 0)."""
    if "entity_id" in entry:
        group = entry.get("entity_group", "GPU")
        return [str(entry["entity_id"]) if group == "GPU" else f"{str(group).lower()}:{entry['entity_id']}"]
    if "gpu_ids" in entry:
        return [g.strip() for g in str(entry["gpu_ids"]).split(",") if g.strip()]
    return [None]


def parse_dcgm_diag(text: str) -> DcgmDiag:
    """Parse `dcgmi diag -j`: DCGM 4.x's document ("DCGM Diagnostic", per-entity results, test_summary) or
    DCGM 3.x's ("DCGM GPU Diagnostic", gpu_ids). Text before the document (a banner) is skipped. Raises
    ParseError for anything else, a truncated document, a document without results, or dcgmi's runtime_error
    (the diagnostic could not run: no NVML, no GPUs), whose message it carries."""
    start = text.find("{")
    if start < 0:
        raise ParseError("no JSON document in dcgmi diag output")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError as exc:
        raise ParseError(f"dcgmi diag output is not complete JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ParseError("dcgmi diag output is not a JSON object")
    key = next((k for k in ("DCGM Diagnostic", "DCGM GPU Diagnostic") if isinstance(data.get(k), dict)), None)
    if key is None:
        raise ParseError("no \"DCGM Diagnostic\" object in dcgmi diag output")
    body = data[key]
    if body.get("runtime_error"):
        raise ParseError(f"dcgmi diag could not run: {str(body['runtime_error']).strip()}")
    metadata = data.get("metadata")
    version = (metadata.get("version") if isinstance(metadata, dict) else None) or body.get("version")
    categories = body.get("test_categories")
    if not isinstance(categories, list):
        raise ParseError("dcgmi diag output has no test_categories list")
    results: list[DiagResult] = []
    for category in categories:
        if not isinstance(category, dict) or not isinstance(category.get("tests"), list):
            raise ParseError(f"not a dcgmi diag test category: {category!r}")
        name = str(category.get("category", ""))
        for test in category["tests"]:
            if test is None:
                continue  # DCGM 3.x's arrays have null holes
            if not isinstance(test, dict) or not isinstance(test.get("name"), str):
                raise ParseError(f"not a dcgmi diag test: {test!r}")
            entries = test.get("results") or []
            summary = test.get("test_summary")
            if not entries and isinstance(summary, dict):
                entries = [summary]  # a test without per-entity results: its summary is the result
            for entry in entries:
                if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
                    raise ParseError(f"not a dcgmi diag result of {test['name']}: {entry!r}")
                for gpu in _diag_entities(entry):
                    results.append(DiagResult(test["name"], name, gpu, entry["status"], _diag_messages(entry)))
    if not results:
        raise ParseError("dcgmi diag output has no results")
    return DcgmDiag(str(version) if version is not None else None, tuple(results))


# ---- nccl-tests (all_reduce_perf and the other *_perf) ------------------------------------------------------

@dataclass(frozen=True)
class NcclRow:
    """One size of an nccl-tests sweep: out-of-place and in-place time (us), algbw and busbw (GB/s), #wrong."""

    size_bytes: int
    count: int
    dtype: str
    redop: str
    oop_time_us: float
    oop_algbw: float
    oop_busbw: float
    oop_wrong: int | None   # None when the test ran without validation (N/A)
    ip_time_us: float
    ip_algbw: float
    ip_busbw: float
    ip_wrong: int | None


@dataclass(frozen=True)
class NcclPerf:
    """An nccl-tests run: its ranks, the table and the summary lines."""

    gpus: int                  # ranks: the "Using devices" lines, else nThread x nGpus
    devices: tuple[str, ...]   # product names from "Using devices", rank by rank
    rows: tuple[NcclRow, ...]
    avg_busbw_gbps: float      # "# Avg bus bandwidth"
    out_of_bounds: int         # "# Out of bounds values : N OK|FAILED"

    @property
    def peak_busbw_gbps(self) -> float:
        """The largest busbw of the sweep, out-of-place or in-place."""
        return max((max(r.oop_busbw, r.ip_busbw) for r in self.rows), default=0.0)

    @property
    def wrong(self) -> int:
        """Wrong elements over the sweep (N/A counts 0)."""
        return sum((r.oop_wrong or 0) + (r.ip_wrong or 0) for r in self.rows)


_NCCL_RANK = re.compile(r"^#\s+Rank\s+\d+\s+(?:Group\s+\d+\s+)?Pid\s+\d+\s+on\s+\S+\s+device\s+\d+\s+"
                        r"\[[^\]]*\]\s+(.+?)\s*$")
_NCCL_HEADER = re.compile(r"^#\s*nThread\s+(\d+)\s+nGpus\s+(\d+)\b")
_NCCL_FOOTER = re.compile(r"^#\s*(Out of bounds values|Avg bus bandwidth)\s*:\s*(\S+)(?:\s+(\S+))?")
_NCCL_FAILURE = re.compile(r"Test (?:CUDA |NCCL )?failure|Invalid number of GPUs|error while loading shared libraries")


def _nccl_number(raw: str, line: str) -> float:
    try:
        return float(raw)
    except ValueError as exc:
        raise ParseError(f"not a number {raw!r} in nccl-tests row {line!r}") from exc


def _nccl_wrong(raw: str, line: str) -> int | None:
    return None if raw == "N/A" else int(_nccl_number(raw, line))


def parse_nccl_perf(text: str) -> NcclPerf:
    """Parse nccl-tests' stdout (any release from 2.x: with or without the root column, `[0x07]` or
    `[0000:07:00]` device ids, mpirun's `[1,0]<stdout>:` prefixes). ParseError when the summary lines are
    missing (the run failed or was cut short; the failure nccl-tests printed is named) or a row is malformed."""
    threads = gpus_per_thread = None
    devices: list[str] = []
    rows: list[NcclRow] = []
    summary: dict[str, tuple[str, str | None]] = {}
    failure = None
    for raw in text.splitlines():
        line = re.sub(r"^\[\d+,\d+\]<std(out|err)>:", "", raw).rstrip()
        if not line.strip():
            continue
        if line.startswith("#"):
            header = _NCCL_HEADER.match(line)
            rank = _NCCL_RANK.match(line)
            footer = _NCCL_FOOTER.match(line)
            if header:
                threads, gpus_per_thread = int(header.group(1)), int(header.group(2))
            elif rank:
                devices.append(rank.group(1))
            elif footer:
                summary[footer.group(1)] = (footer.group(2), footer.group(3))
            continue
        if _NCCL_FAILURE.search(line):
            failure = failure or line.strip()
            continue
        fields = line.split()
        if not fields[0].isdigit():
            continue  # NCCL's own lines ("NCCL version 2.28.3+cuda13.0"), MPI noise
        if len(fields) not in (12, 13):  # size count type redop [root] + 2 x (time algbw busbw #wrong)
            raise ParseError(f"not an nccl-tests row (expected 12 or 13 columns): {line!r}")
        size, count, dtype, redop = int(fields[0]), int(_nccl_number(fields[1], line)), fields[2], fields[3]
        oop, ip = fields[-8:-4], fields[-4:]
        rows.append(NcclRow(size, count, dtype, redop,
                            _nccl_number(oop[0], line), _nccl_number(oop[1], line), _nccl_number(oop[2], line),
                            _nccl_wrong(oop[3], line),
                            _nccl_number(ip[0], line), _nccl_number(ip[1], line), _nccl_number(ip[2], line),
                            _nccl_wrong(ip[3], line)))
    if "Out of bounds values" not in summary or "Avg bus bandwidth" not in summary:
        why = f": {failure}" if failure else ""
        raise ParseError(f"no nccl-tests summary (Out of bounds values, Avg bus bandwidth) in the output{why}")
    if not rows:
        raise ParseError("nccl-tests output has no result rows")
    out_of_bounds = summary["Out of bounds values"][0]
    if not out_of_bounds.isdigit():
        raise ParseError(f"bad out-of-bounds count {out_of_bounds!r}")
    ranks = len(devices) or (threads or 0) * (gpus_per_thread or 0)
    if not ranks:
        raise ParseError("nccl-tests output names no ranks (no nThread/nGpus header, no Using devices lines)")
    return NcclPerf(ranks, tuple(devices), tuple(rows), _nccl_number(summary["Avg bus bandwidth"][0], text),
                    int(out_of_bounds))


# ---- the serving container, as podman reports it -------------------------------------------------------

# podman >= 4.3 (`ImageDigest` in container inspect): "true sha256:<64 hex>"; the image's manifest digest, the
# digest a bundle pins (NAME@sha256:...)
CONTAINER_IMAGE_FORMAT = "{{.State.Running}} {{.ImageDigest}}"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def serving_container(engine: str) -> str:
    """The serving container's (and its unit's) name: <engine>-serving, as the model_serving role names it."""
    return f"{engine}-serving"


def image_digest(reference: str) -> str:
    """The digest of an image reference by digest: 'docker.io/vllm/vllm-openai@sha256:ab..' -> 'sha256:ab..'."""
    return reference.rpartition("@")[2]


def container_image_command(container: str) -> str:
    """The shell command whose output (stdout and stderr, then `rc=N`) `parse_container_image` reads."""
    return (f"podman container inspect --format {shlex.quote(CONTAINER_IMAGE_FORMAT)} {shlex.quote(container)} 2>&1;"
            " echo rc=$?")


@dataclass(frozen=True)
class ContainerImage:
    """A container's state: running, the manifest digest of its image, or why podman could not say."""

    running: bool
    digest: str | None
    error: str | None = None

    def describe(self) -> str:
        """What a check prints as found: the digest, 'stopped (digest)', or podman's error."""
        if self.error:
            return self.error
        return str(self.digest) if self.running else f"not running (image {self.digest})"


def parse_container_image(text: str) -> ContainerImage:
    """The output of `container_image_command`: the state and digest, or the error podman printed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    rc_line = lines.pop() if lines and lines[-1].startswith("rc=") else "rc=?"
    if rc_line != "rc=0" or len(lines) != 1:
        message = lines[-1] if lines else "no output"
        if "no such container" in message.lower():
            return ContainerImage(False, None, "no such container")
        return ContainerImage(False, None, f"podman container inspect: {message} ({rc_line})")
    running, _, digest = lines[0].partition(" ")
    if running not in ("true", "false") or not _DIGEST.match(digest.strip()):
        return ContainerImage(False, None, f"podman container inspect: unexpected output {lines[0][:120]!r}")
    return ContainerImage(running == "true", digest.strip())
