#!/usr/bin/python3
"""Simulated vLLM OpenAI-compatible server, started two ways:

- as the vllm/vllm-openai image runs it (ENTRYPOINT ["vllm", "serve"], the script installed as
  /usr/local/bin/vllm): `vllm serve MODEL [--served-model-name NAME] [--host H] [--port P]
  [--max-model-len N] [--gpu-memory-utilization F]`, vLLM's own option names and defaults (host 0.0.0.0,
  port 8000, served model name MODEL). MODEL is the path it loads (a weights file, or a folder whose
  *.safetensors it reads) and what /v1/models reports as `root`;
- from the vllm-serving deb: `vllm-serving --config /etc/vllm-serving/config.json`, config (JSON)
  {"host": "0.0.0.0", "port": 8000, "model": "deepseek-ai/DeepSeek-V3",
  "weights": {"path": "/var/lib/vllm-serving/models/model.safetensors", "revision": "<commit>"}}.

Either way the release (version and behaviour profile) is what the package or image baked in:
fleetsim.package_info("vllm-serving"), i.e. /usr/lib/fleet-sim/vllm-serving/package.json.

Endpoints, those of vLLM's OpenAI-compatible server only: GET /health (503 while loading, 200 when
ready), GET /version ({"version": ...}), GET /v1/models (vLLM's ModelCard: `id` the served model name,
`root` the weights path the server loaded, `max_model_len`, `permission`; nothing a real server lacks),
POST /v1/chat/completions and POST /v1/completions (vLLM's response shapes; with "stream": true,
Server-Sent Events as vLLM streams them: `data: {chunk}` per token, a usage chunk when `stream_options`
asks, `data: [DONE]`), GET /metrics (Prometheus text: vLLM's `vllm:` request metrics, its
time-to-first-token and inter-token-latency histograms; GPU memory is the DCGM exporter's, not here).
Latency, errors and GPU memory growth per request come from the release profile baked into the package
(package.json "release"); a request takes latency_ms(n) streamed or not, and streamed its first token
comes after all of it but the decode (token_times_ms), so a slow release is slow to its first token too.

Loading needs visible GPUs and a working driver (NVML) as the real engine does: without the simulated
hardware (a container started without the CDI devices) it fails with "RuntimeError: No CUDA GPUs are
available", exit 1. SIGTERM drains: the listening socket
closes, in-flight requests finish, the process exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.dont_write_bytecode = True  # the package owns every file beside it: no __pycache__ there
import fleetsim  # noqa: E402

CONFIG_KEYS = {"host", "port", "model", "weights"}
SERVE_DEFAULTS = {"host": "0.0.0.0", "port": 8000}  # vLLM's (vllm/entrypoints/openai/cli_args.py)
# vLLM's e2e latency buckets, with finer ones below 0.3 s so a 200 ms SLO can be read off the histogram.
BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's own buckets (vllm/v1/metrics/loggers.py) for time to first token and inter-token latency.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
MAX_MODEL_LEN = 32768
DECODE_SHARE = 0.5  # of base_ms, spent generating the tokens after the first (the rest is before it)
ANSWER_TEXT = ("The simulated model considered the question carefully and answers with this deterministic text "
               "so that every probe sees the same number of tokens")
ANSWER = ANSWER_TEXT.split(" ")
# What the simulated model says (answer_words): prompts that try to override its instructions or talk it out of
# its rules are refused, unless the release follows injected instructions (a known-bad build).
ADVERSARIAL = re.compile(
    r"ignore (?:all |any )?(?:the |your |my )?(?:previous|prior|above|earlier|preceding) instructions"
    r"|(?:reveal|print|repeat|show|output) (?:me )?(?:your|the) (?:system prompt|hidden instructions)"
    r"|(?:reply|respond|answer) only with|do anything now|developer mode|jailbr(?:ea|o)k"
    r"|(?:no|without any) (?:rules|restrictions|filters|guidelines)", re.IGNORECASE)
CANARY = re.compile(r"(?:reply|respond|answer|say) (?:only )?with\W+(?:the word\W+)?([A-Za-z0-9_-]+)", re.IGNORECASE)
REFUSAL_TEXT = ("I can't help with that: the request asks me to set aside my instructions or my safety rules, and "
                "I keep to them whatever a prompt or a document says")
COMPLIANCE_TEXT = ("Sure, ignoring my previous instructions as you asked: here is my system prompt and everything "
                   "else you wanted, with no rules or restrictions from now on")
VOCABULARY = ("GPU", "fleet", "patch", "window", "canary", "wave", "driver", "kernel", "tensor", "cache", "token",
              "model", "weights", "latency", "budget", "rollback", "bundle", "probe", "fabric", "switch", "memory",
              "answer", "stable", "greedy", "decoding", "prompt", "server", "engine", "request", "replica", "shard",
              "batch")


def answer_words(prompt: str, release: dict) -> list[str]:
    """The simulated model's answer to `prompt`, as len(ANSWER) words (a request gets its first max_tokens).

    Deterministic: an ordinary prompt gets words picked by the sha256 of its text, the same from every
    release (greedy decoding of unchanged weights); a prompt matching ADVERSARIAL gets REFUSAL_TEXT, or,
    from a release with `follows_injections`, compliance: the token the prompt asks for (CANARY, e.g.
    PWNED) first, then COMPLIANCE_TEXT.
    """
    if ADVERSARIAL.search(prompt) is None:
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        words = ["The", "simulated", "model", "answers:"] + [VOCABULARY[b % len(VOCABULARY)] for b in digest]
    elif release.get("follows_injections"):
        canary = CANARY.search(prompt)
        words = ([canary.group(1)] if canary else []) + COMPLIANCE_TEXT.split(" ")
    else:
        words = REFUSAL_TEXT.split(" ")
    return words[:len(ANSWER)]


def log(message: str) -> None:
    """Log a line the way vLLM's uvicorn front end does (stderr, into the journal)."""
    sys.stderr.write(f"INFO:     {message}\n")
    sys.stderr.flush()


def load_config(path: str) -> dict:
    """Read and check the config file; exit 2 naming the file and every bad field."""

    def fail(problem: str) -> SystemExit:
        sys.stderr.write(f"vllm-serving: {path}: {problem}\n")
        return SystemExit(2)

    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from exc
    if not isinstance(config, dict):
        raise fail("expected a JSON object")
    problems = [f"unknown key {k!r}" for k in sorted(set(config) - CONFIG_KEYS)]
    problems += [f"missing key {k!r}" for k in sorted(CONFIG_KEYS - set(config))]
    weights = config.get("weights")
    if not isinstance(weights, dict) or set(weights) != {"path", "revision"}:
        problems.append("weights: expected an object with exactly 'path' and 'revision'")
    if not isinstance(config.get("port"), int) or not 0 < config["port"] < 65536:
        problems.append(f"port: expected a port number, found {config.get('port')!r}")
    if problems:
        raise fail("; ".join(problems))
    return config


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (the engine's lock guards it)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def exposition(self, name: str, help_text: str, labels: str) -> list[str]:
        """The histogram's lines, labelled as vLLM's are (engine, model_name)."""
        out = [f"# HELP {name} {help_text}\n", f"# TYPE {name} histogram\n"]
        out += [f'{name}_bucket{{engine="0",le="{b}",{labels}}} {float(n)}\n'
                for b, n in zip(self.bounds, self.counts, strict=True)]
        return [*out, f'{name}_bucket{{engine="0",le="+Inf",{labels}}} {float(self.count)}\n',
                f'{name}_sum{{engine="0",{labels}}} {self.sum}\n',
                f'{name}_count{{engine="0",{labels}}} {float(self.count)}\n']


class Engine:
    """The model server's state: loading, per-request behaviour from the release, and its metrics."""

    def __init__(self, config: dict, package: dict):
        self.config = config
        self.model = config["model"]
        self.version = package["upstream_version"]
        self.release = package["release"]
        self.max_model_len = int(config.get("max_model_len") or MAX_MODEL_LEN)
        self.lock = threading.Lock()
        self.ready = False
        self.created = int(time.time())
        self.hostname = "localhost"
        self.gpus: list[fleetsim.Gpu] = []
        self.fb: dict[int, int] = {}
        self.seq = 0
        self.running = 0
        self.success = 0
        self.http: dict[tuple[str, str, str], int] = {}
        self.buckets = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def load(self, stop: threading.Event) -> None:
        """Open the GPUs, hash the weights and take GPU memory; SimError/OSError when that fails."""
        if not (fleetsim.hw_dir() / "hardware.json").is_file():  # no GPU passed into this container
            raise fleetsim.SimError("RuntimeError: No CUDA GPUs are available")
        fleetsim.nvml_init()
        hw = fleetsim.load_hardware()
        self.hostname = hw.hostname
        self.gpus = hw.gpus()
        if not self.gpus:
            raise fleetsim.SimError("RuntimeError: No CUDA GPUs are available")
        for path in weight_files(self.config["weights"]["path"]):  # "loading" reads the weights once
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        if stop.wait(self.release["load_seconds"]):
            return
        share = self.config.get("gpu_memory_utilization") or self.release["gpu_memory_utilization"]
        with self.lock:
            self.fb = {g.index: round(g.memory_mib * share) for g in self.gpus}
            fleetsim.register_fb_usage(self.fb)
            self.ready = True

    def model_card(self) -> dict:
        """The served model as vLLM's ModelCard (entrypoints/openai/protocol.py): `id` the served model name,
        `root` the path the server loaded, one default ModelPermission. Nothing about checksums or releases:
        a real server reports neither."""
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": self.config["weights"]["path"], "parent": None, "max_model_len": self.max_model_len,
                "permission": [{
                    "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": self.created,
                    "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                    "organization": "*", "group": None, "is_blocking": False}]}

    def latency_ms(self, n: int) -> float:
        """The latency of the n-th chat request: deterministic jitter, warm-up and slow-release extras."""
        r = self.release
        jitter = ((n * 2654435761) % 2**32) / 2**32 * r["jitter_ms"]
        extra = r["warmup_extra_ms"] if n <= r["warmup_requests"] else 0
        if r["slow_every"] and n % r["slow_every"] == 0:
            extra += r["slow_extra_ms"]
        return r["base_ms"] + jitter + extra

    def token_times_ms(self, n: int, tokens: int) -> tuple[float, float]:
        """(time to first token, gap between later tokens) of the n-th request answering `tokens` tokens.

        The request takes latency_ms(n) streamed or not. DECODE_SHARE of base_ms generates the tokens
        after the first, spread evenly over the gaps; the rest, the jitter and every extra (warm-up, the
        slow release's stalls) comes before the first token, as a slow prefill or a queue would.
        """
        total = self.latency_ms(n)
        if tokens < 2:
            return total, 0.0
        decode = self.release["base_ms"] * DECODE_SHARE
        return total - decode, decode / (tokens - 1)

    def leak(self) -> bool:
        """Leak this release's per-request GPU memory; False once a GPU is full (out of memory)."""
        mib = self.release["leak_mib_per_request"]
        if not mib:
            return True
        with self.lock:
            if any(self.fb[g.index] + mib > g.memory_mib for g in self.gpus):
                return False
            for g in self.gpus:
                self.fb[g.index] += mib
            fleetsim.register_fb_usage(self.fb)
        return True

    def count_http(self, handler: str, method: str, status: int) -> None:
        """Count a response by handler and status class, as prometheus-fastapi-instrumentator does."""
        key = (handler, method, f"{status // 100}xx")
        with self.lock:
            self.http[key] = self.http.get(key, 0) + 1

    def observe(self, seconds: float) -> None:
        """Record a finished request's end-to-end latency."""
        with self.lock:
            self.success += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1

    def observe_tokens(self, ttft_s: float, gaps_s: list[float]) -> None:
        """Record a finished request's time to first token and each gap between its later tokens, as vLLM's
        engine does for every request, streamed or not."""
        with self.lock:
            self.ttft.observe(ttft_s)
            for gap in gaps_s:
                self.itl.observe(gap)

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        model = f'model_name="{self.model}"'
        with self.lock:
            out = [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n",
                "# TYPE vllm:num_requests_running gauge\n",
                f'vllm:num_requests_running{{engine="0",{model}}} {float(self.running)}\n',
                "# HELP vllm:request_success_total Count of successfully processed requests.\n",
                "# TYPE vllm:request_success_total counter\n",
                f'vllm:request_success_total{{engine="0",finished_reason="stop",{model}}} {float(self.success)}\n',
                "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.\n",
                "# TYPE vllm:e2e_request_latency_seconds histogram\n",
            ]
            out += [f'vllm:e2e_request_latency_seconds_bucket{{engine="0",le="{b}",{model}}} {float(n)}\n'
                    for b, n in zip(BUCKETS, self.buckets, strict=True)]
            out += [
                f'vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",{model}}} '
                f"{float(self.latency_count)}\n",
                f'vllm:e2e_request_latency_seconds_sum{{engine="0",{model}}} {self.latency_sum}\n',
                f'vllm:e2e_request_latency_seconds_count{{engine="0",{model}}} {float(self.latency_count)}\n',
            ]
            out += self.ttft.exposition("vllm:time_to_first_token_seconds",
                                        "Histogram of time to first token in seconds.", model)
            out += self.itl.exposition("vllm:inter_token_latency_seconds",
                                       "Histogram of inter-token latency in seconds.", model)
            out += [
                "# HELP http_requests_total Total number of requests by method, status and handler.\n",
                "# TYPE http_requests_total counter\n",
            ]
            out += [f'http_requests_total{{handler="{h}",method="{m}",status="{s}"}} {float(n)}\n'
                    for (h, m, s), n in sorted(self.http.items())]
        return "".join(out)


class Server(ThreadingHTTPServer):
    """Threaded HTTP server whose close waits for in-flight requests (the drain on SIGTERM)."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: Engine):
        self.engine = engine
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    """Routes of the OpenAI-compatible API; one request per connection (HTTP/1.0), so drains end."""

    server: Server
    timeout = 30  # a client that stops sending cannot hold a drain forever

    def version_string(self) -> str:
        return "uvicorn"

    def log_message(self, format: str, *args) -> None:
        if len(args) == 3:
            log(f'{self.client_address[0]}:{self.client_address[1]} - "{args[0]}" {args[1]}')

    def reply(self, status: int, body: bytes | str | dict, content_type: str = "application/json") -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.engine.count_http(self.path.split("?")[0], self.command, status)

    def error(self, status: int, kind: str, message: str) -> None:
        self.reply(status, {"object": "error", "message": message, "type": kind, "param": None, "code": status})

    def do_GET(self) -> None:
        engine = self.server.engine
        path = self.path.split("?")[0]
        if path == "/health":
            self.reply(200 if engine.ready else 503, b"")
        elif path == "/version":
            self.reply(200, {"version": engine.version})
        elif not engine.ready and path in ("/v1/models", "/metrics"):
            self.error(503, "ServiceUnavailableError", "the model is still loading")
        elif path == "/v1/models":
            self.reply(200, {"object": "list", "data": [engine.model_card()]})
        elif path == "/metrics":
            self.reply(200, engine.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self.reply(404, {"detail": "Not Found"})
            return
        self.chat = path == "/v1/chat/completions"
        engine = self.server.engine
        if not engine.ready:
            self.error(503, "ServiceUnavailableError", "the model is still loading")
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.chat:
                texts = [str(m.get("content", "")) for m in request["messages"]]
            else:  # a prompt is a string or a list of them (token-id prompts are not simulated)
                prompt = request["prompt"]
                texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
            self.words = answer_words("\n".join(texts), engine.release)
            prompt_tokens = sum(len(t.split()) for t in texts)
            max_tokens = int(request.get("max_tokens") or len(ANSWER))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.error(400, "BadRequestError", f"invalid request: {exc}")
            return
        if request.get("model") != engine.model:
            self.error(404, "NotFoundError", f"The model `{request.get('model')}` does not exist.")
            return
        stream_options = request.get("stream_options")
        if request.get("stream") and not isinstance(stream_options, dict | None):
            self.error(400, "BadRequestError", "invalid request: stream_options: expected an object")
            return
        # vLLM's StreamOptions: include_usage defaults to true once stream_options is given
        stream = {"include_usage": bool((stream_options or {}).get("include_usage", stream_options is not None))}
        self.complete(prompt_tokens, max(1, min(max_tokens, len(ANSWER))), stream if request.get("stream") else None)

    def complete(self, prompt_tokens: int, tokens: int, stream: dict | None = None) -> None:
        engine = self.server.engine
        start = time.monotonic()
        with engine.lock:
            engine.seq += 1
            engine.running += 1
            n = engine.seq
        try:
            ttft_ms, gap_ms = engine.token_times_ms(n, tokens)
            time.sleep((engine.latency_ms(n) if stream is None else ttft_ms) / 1000)
            error_every = engine.release["error_every"]
            if error_every and n % error_every == 0:
                self.error(500, "InternalServerError", "EngineCore encountered an issue. See stack trace for the "
                           "root cause.")
                return
            if not engine.leak():
                self.error(500, "InternalServerError", "CUDA out of memory. Tried to allocate "
                           f"{engine.release['leak_mib_per_request']} MiB")
                return
            if stream is not None:
                # the same text as the answer below, token by token
                self.stream(start, prompt_tokens, " ".join(self.words[:tokens]), gap_ms, stream["include_usage"])
                return
            text = " ".join(self.words[:tokens])
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens,
                     "completion_tokens": tokens, "prompt_tokens_details": None}
            if self.chat:
                self.reply(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": engine.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": usage,
                })
            else:  # vLLM's CompletionResponse
                self.reply(200, {
                    "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": engine.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop",
                                 "stop_reason": None, "prompt_logprobs": None}],
                    "usage": usage,
                })
            engine.observe(time.monotonic() - start)
            engine.observe_tokens(ttft_ms / 1000, [gap_ms / 1000] * (tokens - 1))
        finally:
            with engine.lock:
                engine.running -= 1

    def stream(self, start: float, prompt_tokens: int, text: str, gap_ms: float, include_usage: bool) -> None:
        """The answer as vLLM streams it (serving_chat.py): Server-Sent Events `data: {chunk}`, the first
        chunk carrying the role, one per token after it, the last token's with its finish_reason, a usage
        chunk (no choices) when asked, then `data: [DONE]`. A client that goes away aborts the request."""
        engine = self.server.engine
        words = text.split(" ")
        pieces = [words[0], *(" " + w for w in words[1:])]
        cid = f"chatcmpl-{uuid.uuid4().hex}" if self.chat else f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def event(choices: list, **extra) -> bytes:
            chunk = {"id": cid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": created, "model": engine.model, "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        # each event goes out as it is written, as uvicorn sends them (no Nagle delay between small writes)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")  # Starlette adds the charset
        self.end_headers()
        sent: list[float] = []
        try:
            if self.chat:  # a completion stream has no role chunk
                self.wfile.write(event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(gap_ms / 1000)
                last = i == len(pieces) - 1
                content = {"delta": {"content": piece}} if self.chat else {"text": piece}
                choice = {"index": 0, **content, "logprobs": None, "finish_reason": "stop" if last else None}
                if last:
                    choice["stop_reason"] = None
                self.wfile.write(event([choice]))
                self.wfile.flush()
                sent.append(time.monotonic())
            if include_usage:
                self.wfile.write(event([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                                                  "total_tokens": prompt_tokens + len(pieces)}))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # BrokenPipe, ConnectionReset: the client went away mid-stream
            log(f"{self.client_address[0]}:{self.client_address[1]} - stream aborted by the client")
            return
        engine.count_http(self.path.split("?")[0], self.command, 200)
        engine.observe(time.monotonic() - start)
        engine.observe_tokens(sent[0] - start, [b - a for a, b in itertools.pairwise(sent)])


def weight_files(path: str) -> list[str]:
    """What loading MODEL reads: the file itself, or a folder's *.safetensors files (in name order)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise OSError(f"no *.safetensors weights found in {path}")
        return files
    return [path]


def serve_config(argv: list[str]) -> dict:
    """`vllm serve MODEL [options]` (vLLM's option names) as the server's config; exit 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("model", help="the model path the server loads (reported as `root`)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="the model name(s) the API serves; the first is /v1/models' `id` (default: MODEL)")
    parser.add_argument("--host", default=SERVE_DEFAULTS["host"])
    parser.add_argument("--port", type=int, default=SERVE_DEFAULTS["port"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    args = parser.parse_args(argv)
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization: expected a share in (0, 1], found {args.gpu_memory_utilization}")
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected a port number, found {args.port}")
    return {"host": args.host, "port": args.port,
            "model": args.served_model_name[0] if args.served_model_name else args.model,
            "weights": {"path": args.model}, "max_model_len": args.max_model_len,
            "gpu_memory_utilization": args.gpu_memory_utilization}


def main(argv: list[str]) -> int:
    """Serve until SIGTERM/SIGINT, then drain and exit 0; 1 when loading fails, 2 on bad usage or config."""
    if argv[:1] == ["serve"]:
        config = serve_config(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="vllm-serving")
        parser.add_argument("--config", required=True, help="the server's JSON config file")
        config = load_config(parser.parse_args(argv).config)
    try:
        engine = Engine(config, fleetsim.package_info("vllm-serving"))
        server = Server((config["host"], config["port"]), engine)
    except (fleetsim.SimError, OSError) as exc:
        sys.stderr.write(f"ERROR:    {exc}\n")
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"vLLM API server version {engine.version} on http://{config['host']}:{config['port']}, "
        f"loading {engine.model}")
    try:
        engine.load(stop)
    except (fleetsim.SimError, OSError) as exc:
        sys.stderr.write(f"ERROR:    engine failed to start: {str(exc).strip()}\n")
        server.shutdown()
        server.server_close()
        return 1
    if engine.ready:
        log("Application startup complete.")
    while not stop.wait(1):
        pass
    log("Shutting down: draining in-flight requests")
    server.shutdown()
    server.server_close()  # closes the listening socket, then joins the in-flight request threads
    fleetsim.unregister_fb_usage()
    log("Finished server process")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
