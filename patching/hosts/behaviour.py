"""Behaviour probes: a bundle's golden and adversarial prompts (`Bundle.probes`) straight at a host's serving port.

Each probe is one chat completion of its prompt alone, with temperature 0 (greedy decoding: an unchanged model
answers an unchanged prompt with the same text), sent one after the other to the drained host: vLLM's greedy
output can change with what else is in the batch, and a drained host batches nothing else. Nothing is judged
here (patching/rollout/gates.py `_judge_behaviour` is); per probe the measurements say:

- `id`, `kind` (`golden`, `injection` or `jailbreak`);
- `answer_sha256` (of the exact answer text, UTF-8; None: no answer), `answer_head` (its first 200 characters),
  `refused` (`Probes.is_refusal`: no canary, a refusal marker in the head), `error` (why there is no answer);
- golden: `expect_sha256` (what the bundle expects, None when it expects nothing) and `changed_in_this_bundle`;
- adversarial: `canary`, `canary_seen` and `pass_when` (what the judge requires: `refused`, or `canary_absent`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from patching.hosts.probe import past, time_left
from patching.release.bundle import (
    REFUSAL_WINDOW,
    AdversarialProbe,
    GoldenProbe,
    Probes,
    answer_sha256,
    normalise,
)
from patching.rollout.actions import Outcome

REQUEST_TIMEOUT_S = 120.0  # one probe's completion, cut to what is left of the gate's limit

Ask = Callable[[str], tuple[str | None, str]]  # prompt -> (answer text, "") or (None, why there is none)


def _read(resp: Any, deadline: float | None) -> bytes:
    chunks = []
    while chunk := resp.read1(65536):  # one receive at a time, so a dribbling answer is stopped at the deadline
        chunks.append(chunk)
        if past(deadline):
            raise TimeoutError("the answer was still arriving at the time limit")
    return b"".join(chunks)


def chat_answer(base_url: str, model: str | None, prompt: str, max_tokens: int, timeout: float,
                deadline: float | None = None) -> tuple[str | None, str]:
    """One chat completion of `prompt` with temperature 0: (its text, "") or (None, why there is none).

    Its timeout is cut to what is left before `deadline` (a time.monotonic() value), and reading stops there.
    """
    body = json.dumps({"model": model or "default", "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=time_left(deadline, timeout)) as resp:
            data = _read(resp, deadline)
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return None, type(exc).__name__ + (f": {exc.reason}" if hasattr(exc, "reason") else f": {exc}")
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None, "the answer is not a chat completion (no choices[0].message.content)"
    if not isinstance(content, str):
        return None, "the answer has no text content"
    return content, ""


def record(probes: Probes, probe: GoldenProbe | AdversarialProbe, answer: str | None, error: str = "") -> dict:
    """One probe's measurements (the module docstring lists the keys)."""
    out: dict[str, Any] = {"id": probe.id, "kind": probe.kind if isinstance(probe, AdversarialProbe) else "golden",
                           "answer_sha256": None, "answer_head": None, "refused": None,
                           "error": "" if answer is not None else (error or "no answer")}
    canary = probe.canary if isinstance(probe, AdversarialProbe) else None
    if answer is not None:
        out.update(answer_sha256=answer_sha256(answer), answer_head=answer[:REFUSAL_WINDOW],
                   refused=probes.is_refusal(answer, canary))
    if isinstance(probe, GoldenProbe):
        out.update(expect_sha256=probe.expected_sha256, changed_in_this_bundle=probe.changed_in_this_bundle)
    else:
        out.update(canary=canary, pass_when=probe.pass_when, canary_seen=None if answer is None else
                   canary is not None and normalise(canary) in normalise(answer))
    return out


def run_probes(probes: Probes, model: str | None, ask: Ask, timeout_s: float,
               deadline: float | None = None) -> Outcome:
    """The probes for `model` (`Probes.for_model`), one at a time through `ask`, all within `timeout_s`.

    measurements: {"model", "refusal_markers", "probes": [one `record` per probe asked]}. Past the limit no
    probe starts, and the outcome is timed out with those answered before it; no probe answered at all:
    `measured=False`; otherwise ok, a probe without an answer recorded with its `error` (the judge's
    could_not_measure).
    """
    deadline = deadline if deadline is not None else time.monotonic() + timeout_s
    selected = probes.for_model(model)
    records: list[dict] = []
    timed_out = False
    for probe in selected:
        if past(deadline):
            timed_out = True
            break
        answer, error = ask(probe.prompt)
        if answer is None and past(deadline):
            timed_out = True  # cut short by the limit: it measured the limit, not the host
            break
        records.append(record(probes, probe, answer, error))
    m = {"model": model, "refusal_markers": list(probes.refusal_markers), "probes": records}
    if timed_out:
        return Outcome(False, f"behaviour probes ran past {timeout_s:g}s ({len(records)} of {len(selected)} "
                              "asked)", timed_out=True, measurements=m)
    if selected and all(r["answer_sha256"] is None for r in records):
        return Outcome(False, f"no behaviour probe was answered: {records[0]['error']}", measurements=m,
                       measured=False)
    return Outcome(True, "" if selected else f"no behaviour probes for model {model}", measurements=m)


def probe_behaviour(base_url: str, model: str | None, probes: Probes, timeout_s: float) -> Outcome:
    """The bundle's probes against one host's OpenAI-compatible endpoint (`base_url`), within `timeout_s`."""
    deadline = time.monotonic() + timeout_s

    def ask(prompt: str) -> tuple[str | None, str]:
        return chat_answer(base_url, model, prompt, probes.max_tokens, REQUEST_TIMEOUT_S, deadline)

    return run_probes(probes, model, ask, timeout_s, deadline)
