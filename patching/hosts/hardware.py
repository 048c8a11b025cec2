"""The hardware gate's figures on one host, from the output of the tools it runs (the gate judges them:
patching/rollout/gates.py `_judge_hardware`).

- NVIDIA DCGM's diagnostic, `dcgmi diag -r <level> -j`: JSON with a result per test and GPU. dcgmi exits
  non-zero when a test fails and still prints the JSON, so the output is read whatever the exit status.
- nccl-tests' all-reduce sweep, `all_reduce_perf -b 8 -e 8G -f 2 -g <GPUs>` (one process, every GPU of the
  host): a table per message size, the wrong-value counts and the average bus bandwidth. The figure judged is
  the largest bus bandwidth of the sweep (the large messages', as users of nccl-tests quote it: about 230 GB/s
  on 8 A100 GPUs with NVSwitch, 460-480 GB/s on 8 H100s).
"""

from __future__ import annotations

from typing import Any

from patching.hosts import facts as hostfacts


def dcgm_command(level: int) -> str:
    """The DCGM diagnostic at `level` (1 quick, 2 medium, 3 long), JSON output."""
    return f"dcgmi diag -r {int(level)} -j"


def nccl_command(path: str, gpus: int) -> str:
    """nccl-tests' all-reduce from 8 B to 8 GiB, doubling, over `gpus` GPUs of one host."""
    return f"{path} -b 8 -e 8G -f 2 -g {int(gpus)}"


def _head(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def dcgm_figures(rc: int | None, stdout: str, level: int) -> dict[str, Any]:
    """`{"dcgm": {...}}` from dcgmi's output, or `{"dcgm_error": why}` when it printed no diagnostic."""
    try:
        diag = hostfacts.parse_dcgm_diag(stdout)
    except hostfacts.ParseError as exc:
        return {"dcgm_error": f"`{dcgm_command(level)}` exit {rc}, no diagnostic ({exc}): {_head(stdout)}"}

    def result(r: hostfacts.DiagResult) -> dict[str, Any]:
        return {"test": r.test, "category": r.category, "gpu": r.gpu, "status": r.status, "info": r.info}

    return {"dcgm": {"level": int(level), "version": diag.version, "exit": rc, "tests": len(diag.results),
                     "failures": [result(r) for r in diag.failures],
                     "warnings": [result(r) for r in diag.results if r.status.lower().startswith("warn")]}}


def nccl_figures(rc: int | None, stdout: str, command: str, gpus: int) -> dict[str, Any]:
    """`{"nccl": {...}}` from all_reduce_perf's output, or `{"nccl_error": why}`: it printed no table, or ran
    over fewer GPUs than the host has. A table is read whatever the exit status (all_reduce_perf exits
    non-zero after a run with wrong values, which the judge fails on)."""
    try:
        perf = hostfacts.parse_nccl_perf(stdout)
    except hostfacts.ParseError as exc:
        return {"nccl_error": f"`{command}` exit {rc}, no result ({exc}): {_head(stdout)}"}
    if perf.gpus != gpus:
        return {"nccl_error": f"`{command}` ran over {perf.gpus} GPU(s); the host has {gpus}"}
    return {"nccl": {"gpus": perf.gpus, "devices": sorted(set(perf.devices)),
                     "busbw_gbps": round(perf.peak_busbw_gbps, 2), "avg_busbw_gbps": round(perf.avg_busbw_gbps, 3),
                     "wrong": perf.wrong, "out_of_bounds": perf.out_of_bounds, "sizes": len(perf.rows), "exit": rc}}
