"""
The chat web server: the ChatGPT-like page (nanochat/ui.html) and an OpenAI-compatible API, both
streaming replies from a pool of model workers.

    python -m scripts.chat_web                                 # sft model at http://127.0.0.1:8000
    python -m scripts.chat_web --source base --num-workers 2   # any stage; two CPU replicas

Endpoints
    GET  /                     the page (read from the nanochat package directory, not the CWD)
    GET  /logo.svg             its icon
    POST /chat/completions     the page's stream: {messages, temperature?, top_k?, max_tokens?} ->
                               server-sent events {"token": text} ... then {"done": true, ...}
    POST /v1/chat/completions  OpenAI Chat Completions, streaming (SSE chunks, then [DONE]) or not
    GET  /v1/models            the one model served
    GET  /health, GET /stats   liveness; workers, busy, queue length, requests served, tokens generated

Every error is JSON in OpenAI's shape {"error": {"message", "type", "param", "code"}} and names the
offending value and the limit it broke; bad input is a 4xx, never a 500. On /v1 the request's `model`
is not checked (one model answers everything and responses name it); `top_k` is accepted as an
extension; `n` must be 1; `stop`, tools and logprobs are refused rather than silently ignored.

Workers: each owns a model replica and its Engine (one per GPU by default; --num-workers replicas on
CPU/MPS) and generates on its own thread, so the event loop keeps serving other clients. Tokens come
back to the request through an asyncio.Queue. Requests wait FIFO for a free worker. A client that
disconnects (the page's stop button aborts its fetch) sets a flag the worker checks every token; the
worker rejoins the pool as soon as its thread has stopped.
"""

import os
import re
import json
import math
import time
import uuid
import base64
import random
import asyncio
import hashlib
import argparse
import pathlib
import threading
import traceback
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.common import autodetect_device_type, autodetect_dtype
from nanochat.engine import Engine, render_prompt, prepare_for_inference

PACKAGE_DIR = pathlib.Path(nanochat.__file__).resolve().parent  # ui.html ships inside the package

# Abuse limits (upstream's values). Each one is checked before any work is queued.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)          # 0 = no top-k filtering
TOP_P_RANGE = (0.0, 1.0)        # exclusive of 0: top_p=0 would keep no token
MAX_TOKENS_RANGE = (1, 4096)    # and never more than the model's context leaves after the prompt
MAX_BODY_BYTES = 1 << 20        # 32k characters of chat fit many times over; anything bigger is junk


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} [chat_web] {msg}", flush=True)


# -----------------------------------------------------------------------------
# Errors

class ApiError(Exception):
    """A client-facing error, rendered as OpenAI's {"error": {...}} with an HTTP status."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(err):
    return JSONResponse(err.body(), status_code=err.status)


# -----------------------------------------------------------------------------
# Request parsing and limits

@dataclass
class Sampling:
    """Server-wide defaults for fields a request leaves out (set from the command line)."""
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass
class GenRequest:
    messages: list      # [{"role", "content": str}], validated
    temperature: float
    top_k: int          # 0 = off
    top_p: float        # 1.0 = off
    max_tokens: int     # as asked (before the context cap)
    seed: int


async def read_json(request):
    """The request body as parsed JSON, refusing oversized bodies and malformed JSON with a 4xx."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {MAX_BODY_BYTES} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "request body is empty: send a JSON object with a 'messages' list", code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors; deep nesting recurses
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _number(body, name, default, lo, hi, integer=False, open_low=False):
    """body[name] as a number in [lo, hi] (or (lo, hi] with open_low), default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"{name} must be {kind}, got {json.dumps(v)[:100]}", param=name, code="invalid_type")
    if not math.isfinite(v):
        raise ApiError(400, f"{name} must be a finite number, got {v}", param=name, code="invalid_value")
    if v < lo or v > hi or (open_low and v == lo):
        bracket = "(" if open_low else "["
        raise ApiError(400, f"{name}={v} is out of range: it must be in {bracket}{lo}, {hi}]", param=name,
                       code=f"{name}_out_of_range")
    return v


def _content_text(content, i):
    """OpenAI allows content as a list of parts; we take text parts only."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': str}}: "
                                    f"this model reads text only", param=f"messages[{i}].content", code="invalid_content")
            texts.append(part["text"])
        return "".join(texts)
    return content


def parse_messages(raw, allow_system):
    """Validate the messages list against the limits; returns [{"role", "content"}] with str content."""
    roles = ("system", "user", "assistant") if allow_system else ("user", "assistant")
    if not isinstance(raw, list):
        raise ApiError(400, "messages must be a list of {role, content} objects", param="messages", code="invalid_type")
    if not raw:
        raise ApiError(400, "messages is empty: send at least one user message", param="messages", code="empty_messages")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(400, f"too many messages: {len(raw)}; the limit is {MAX_MESSAGES}", param="messages",
                       code="too_many_messages")
    out, total = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]",
                           code="invalid_type")
        role = m.get("role")
        if role == "developer" and allow_system:
            role = "system"  # OpenAI's newer name for the system message
        if role not in roles:
            raise ApiError(400, f"messages[{i}].role is {json.dumps(role)[:50]}: it must be one of {', '.join(roles)}",
                           param=f"messages[{i}].role", code="invalid_role")
        content = _content_text(m.get("content"), i) if allow_system else m.get("content")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string, got {type(content).__name__}",
                           param=f"messages[{i}].content", code="invalid_type")
        if role == "user" and not content.strip():
            raise ApiError(400, f"messages[{i}] (user) is empty", param=f"messages[{i}].content", code="empty_message")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"messages[{i}] is {len(content)} characters long; the limit is {MAX_MESSAGE_CHARS} "
                                f"characters per message", param=f"messages[{i}].content", code="message_too_long")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(400, f"the conversation is {total} characters long in total; the limit is {MAX_TOTAL_CHARS} "
                            f"characters", param="messages", code="conversation_too_long")
    if out[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be the user's (it is {out[-1]['role']!r}): the model writes "
                            f"the next assistant reply", param="messages", code="invalid_last_role")
    return out


def parse_request(body, defaults, openai):
    """A validated GenRequest from a request body. openai=True is /v1 (system role, top_p, n, seed...)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    messages = parse_messages(body.get("messages"), allow_system=openai)
    temperature = _number(body, "temperature", defaults.temperature, *TEMPERATURE_RANGE)
    top_k = _number(body, "top_k", defaults.top_k, *TOP_K_RANGE, integer=True)
    top_p, seed = 1.0, random.randint(0, 2 ** 31 - 1)
    max_tokens = _number(body, "max_tokens", defaults.max_tokens, *MAX_TOKENS_RANGE, integer=True)
    if openai:
        top_p = _number(body, "top_p", 1.0, *TOP_P_RANGE, open_low=True)
        if body.get("max_completion_tokens") is not None:  # the newer name wins
            max_tokens = _number(body, "max_completion_tokens", None, *MAX_TOKENS_RANGE, integer=True)
        n = _number(body, "n", 1, 1, 2 ** 31, integer=True)
        if n != 1:
            raise ApiError(400, f"n={n} is not supported: this server returns exactly one choice (n=1)", param="n",
                           code="unsupported_value")
        seed = _number(body, "seed", seed, -2 ** 63, 2 ** 64 - 1, integer=True) % 2 ** 63
        for name in ("stop", "tools", "functions", "response_format"):
            if body.get(name) not in (None, [], {}):
                raise ApiError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
        if body.get("logprobs") not in (None, False):
            raise ApiError(400, "logprobs is not supported by this server", param="logprobs", code="unsupported_parameter")
        for name in ("stream", "model"):
            want = bool if name == "stream" else str
            if body.get(name) is not None and not isinstance(body[name], want):
                raise ApiError(400, f"{name} must be a {want.__name__}, got {json.dumps(body[name])[:100]}", param=name,
                               code="invalid_type")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options", code="invalid_type")
    return GenRequest(messages, float(temperature), int(top_k), float(top_p), int(max_tokens), int(seed))


# -----------------------------------------------------------------------------
# Streaming decode

class StreamDecoder:
    """Token ids -> text pieces that never split a UTF-8 character (upstream bug #24).

    A character can span several byte-level tokens; decoding token by token would emit U+FFFD halves.
    Ids since the last emitted piece are decoded together and held back while that text ends in
    U+FFFD; once it ends in a complete character it is emitted, so pieces concatenate to exactly
    decode(all ids). Only ever decoding the ids since the last piece keeps this O(n)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token_id):
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# -----------------------------------------------------------------------------
# Workers

class Worker:
    """One model replica + its Engine, generating on a dedicated thread."""

    def __init__(self, wid, engine, tokenizer, context_len, device="cpu", num_threads=None):
        self.id, self.engine, self.tokenizer, self.context_len = wid, engine, tokenizer, context_len
        self.device = torch.device(device)
        self.stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.busy = False
        self.requests = 0
        self.tokens = 0

        def init_thread():  # torch's device and thread count are per-thread settings
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if num_threads:
                torch.set_num_threads(num_threads)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"nanochat-worker{wid}", initializer=init_thread)

    def run(self, prompt, req, max_tokens, cancel, emit):
        """On the worker thread: emit ("token", id) per generated token, then exactly one ("finish",
        "stop"|"length"|"cancelled") or ("error", message). Returns the number of tokens generated."""
        n = 0
        try:
            with torch.inference_mode():
                gen = self.engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=req.temperature,
                                           top_k=req.top_k or None, top_p=req.top_p if req.top_p < 1.0 else None,
                                           seed=req.seed)
                try:
                    for token_column, _mask_column in gen:
                        if cancel.is_set():
                            emit(("finish", "cancelled"))
                            return n
                        token = int(token_column[0])
                        if token in self.stop_ids:
                            emit(("finish", "stop"))
                            return n
                        n += 1
                        emit(("token", token))
                finally:
                    gen.close()
            emit(("finish", "length" if n >= max_tokens else "stop"))
        except Exception as e:
            log(f"worker {self.id}: generation failed:\n{traceback.format_exc()}")
            emit(("error", f"generation failed: {type(e).__name__}: {e}"))
        return n


class WorkerPool:
    """Free workers in a FIFO queue; counters for /stats. Used from the event loop only."""

    def __init__(self, workers, model_id, defaults):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers, self.model_id, self.defaults = workers, model_id, defaults
        self.tokenizer = workers[0].tokenizer
        self.context_len = min(w.context_len for w in workers)
        self.free = asyncio.Queue()
        for w in workers:
            self.free.put_nowait(w)
        self.waiting = 0
        self.served = 0
        self.tokens = 0
        self.created = int(time.time())

    async def acquire(self):
        self.waiting += 1
        try:
            w = await self.free.get()
        finally:
            self.waiting -= 1
        w.busy = True
        return w

    def release(self, worker, n_tokens):
        worker.busy = False
        worker.requests += 1
        worker.tokens += n_tokens
        self.served += 1
        self.tokens += n_tokens
        self.free.put_nowait(worker)

    def close(self):
        """Stop the worker threads once they finish what they are doing."""
        for w in self.workers:
            w.executor.shutdown(wait=False, cancel_futures=True)

    def stats(self):
        busy = sum(w.busy for w in self.workers)
        return {"model": self.model_id, "workers": len(self.workers), "busy_workers": busy,
                "available_workers": len(self.workers) - busy, "queue_length": self.waiting,
                "requests_served": self.served, "tokens_generated": self.tokens,
                "per_worker": [{"id": w.id, "device": str(w.device), "busy": w.busy, "requests": w.requests,
                                "tokens": w.tokens} for w in self.workers]}

    def prepare(self, req):
        """Prompt ids and the token budget for a request; a 400 if the prompt leaves no room."""
        try:
            prompt = render_prompt(self.tokenizer, req.messages)
        except ValueError as e:  # e.g. roles that do not alternate
            raise ApiError(400, f"invalid conversation: {e}", param="messages", code="invalid_conversation") from None
        room = self.context_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens; the model's context is {self.context_len} "
                                f"tokens, which leaves no room for a reply: start a new chat or shorten it",
                           param="messages", code="context_length_exceeded")
        return prompt, min(req.max_tokens, room)

    async def generate(self, prompt, req, max_tokens, info):
        """Async generator of text pieces for one reply. Waits for a free worker, streams from its thread,
        and on exit (finished, client gone, or cancelled) stops the thread and frees the worker.
        Fills info with worker, finish_reason, completion_tokens, ttft; raises ApiError on failure."""
        t0 = time.perf_counter()
        worker = await self.acquire()
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item):  # called on the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                cancel.set()

        def finished(fut):  # on the event loop, once the thread is done
            self.release(worker, 0 if fut.cancelled() or fut.exception() else fut.result())

        # Free the worker only once its thread has really stopped: a replica must never run two generations.
        loop.run_in_executor(worker.executor, worker.run, prompt, req, max_tokens, cancel, emit).add_done_callback(finished)
        info.update(worker=worker.id, finish_reason="cancelled", completion_tokens=0, ttft=None)
        decoder = StreamDecoder(self.tokenizer)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "token":
                    info["completion_tokens"] += 1
                    if info["ttft"] is None:
                        info["ttft"] = time.perf_counter() - t0
                    piece = decoder.push(value)
                    if piece:
                        yield piece
                elif kind == "finish":
                    tail = decoder.flush()
                    if tail:
                        yield tail
                    info["finish_reason"] = value
                    return
                else:
                    info["finish_reason"] = "error"
                    raise ApiError(500, value, code="generation_failed", kind="server_error")
        finally:
            cancel.set()  # no-op if the thread already finished; stops it at the next token otherwise


# -----------------------------------------------------------------------------
# Loading

def build_workers(source, model_tag=None, step=None, num_workers=None, device_type=None):
    """Load one model replica per worker (all from the same checkpoint step). Returns (workers, model id)."""
    from nanochat.checkpoint import load_model, resolve_checkpoint
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device-type cuda was asked for but torch sees no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--device-type mps was asked for but MPS is not available")
    if device_type not in ("cuda", "mps", "cpu"):
        raise SystemExit(f"--device-type {device_type!r} is not one of cuda, mps, cpu")
    n_gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    num_workers = num_workers or (n_gpus if device_type == "cuda" else 1)
    if num_workers < 1:
        raise SystemExit(f"--num-workers {num_workers} must be >= 1")
    ckpt_dir, step = resolve_checkpoint(source, model_tag, step)  # pin the step so every replica matches
    tag = os.path.basename(ckpt_dir)
    dtype, reason = autodetect_dtype(device_type)
    # CPU replicas share the cores: split them so the threads do not oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // num_workers) if device_type == "cpu" else None
    workers = []
    for i in range(num_workers):
        device = torch.device("cuda", i % n_gpus) if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, meta = load_model(source, device, phase="eval", model_tag=tag, step=step, compute_dtype=dtype)
        prepare_for_inference(model)  # serving only: weights cast once to the compute dtype
        context = meta["model_config"]["sequence_len"]
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, context, device, threads))
    log(f"{num_workers} worker(s) on {device_type} ({dtype}: {reason}), model {source}/{tag} step {step}")
    return workers, f"nanochat-{source}-{tag}-step{step}"


# -----------------------------------------------------------------------------
# The app

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def page_headers(html):
    """Content-Security-Policy allowing exactly the page's own inline script and style (by hash) and
    requests to this origin: even if model output were ever inserted as HTML, nothing would run."""
    def hashes(tag):
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL))
    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src 'self'; "
           f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def create_app(pool):
    """The FastAPI app serving a WorkerPool."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    html = (PACKAGE_DIR / "ui.html").read_text(encoding="utf-8")
    html_headers = page_headers(html)
    logo_path = PACKAGE_DIR / "logo.svg"
    counter = iter(range(1, 1 << 62))

    @app.exception_handler(ApiError)
    async def _api_error(request, err):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # 404/405 in the same shape as everything else
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log(f"internal error on {request.url.path}:\n{traceback.format_exc()}")
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}", kind="server_error"))

    @app.get("/")
    async def index():
        return Response(html, media_type="text/html; charset=utf-8", headers=html_headers)

    @app.get("/logo.svg")
    async def logo():
        return Response(logo_path.read_bytes(), media_type="image/svg+xml")

    @app.get("/health")
    async def health():
        s = pool.stats()
        return {"status": "ok", "ready": True, "model": pool.model_id, "workers": s["workers"],
                "available_workers": s["available_workers"], "context_length": pool.context_len,
                "defaults": {"temperature": pool.defaults.temperature, "top_k": pool.defaults.top_k,
                             "max_tokens": pool.defaults.max_tokens}}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": pool.model_id, "object": "model", "created": pool.created,
                                            "owned_by": "nanochat"}]}

    def summary(rid, path, prompt, info, t0):
        ttft = f"{info['ttft']:.2f}s" if info.get("ttft") is not None else "-"
        log(f"#{rid} {path} worker {info.get('worker')}: prompt {len(prompt)} tok -> {info.get('completion_tokens', 0)} "
            f"tok, {info.get('finish_reason')}, ttft {ttft}, total {time.perf_counter() - t0:.2f}s")

    @app.post("/chat/completions")
    async def chat_page(request: Request):
        """The page's endpoint: SSE events {"token"}, then {"done"} or {"error"}."""
        t0, rid = time.perf_counter(), next(counter)
        req = parse_request(await read_json(request), pool.defaults, openai=False)
        prompt, max_tokens = pool.prepare(req)
        info = {}

        async def events():
            try:
                async for piece in pool.generate(prompt, req, max_tokens, info):
                    yield sse({"token": piece})
                yield sse({"done": True, "finish_reason": info["finish_reason"], "worker": info["worker"],
                           "prompt_tokens": len(prompt), "completion_tokens": info["completion_tokens"]})
            except ApiError as e:
                yield sse(e.body())
            finally:
                summary(rid, "/chat/completions", prompt, info, t0)
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/chat/completions")
    async def chat_openai(request: Request):
        t0, rid = time.perf_counter(), next(counter)
        body = await read_json(request)
        req = parse_request(body, pool.defaults, openai=True)
        prompt, max_tokens = pool.prepare(req)
        cid, created, info = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), {}

        def usage():
            n = info.get("completion_tokens", 0)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def finish_reason():  # "cancelled" only happens when nobody is listening any more
            return "length" if info.get("finish_reason") == "length" else "stop"

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def chunk(delta, finish=None):
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": pool.model_id,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for piece in pool.generate(prompt, req, max_tokens, info):
                        yield chunk({"content": piece})
                    yield chunk({}, finish_reason())
                    if include_usage:
                        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                   "model": pool.model_id, "choices": [], "usage": usage()})
                except ApiError as e:
                    yield sse(e.body())
                finally:
                    summary(rid, "/v1/chat/completions (stream)", prompt, info, t0)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

        async def collect():
            return "".join([piece async for piece in pool.generate(prompt, req, max_tokens, info)])

        # Nothing is sent until the reply is complete, so watch for the client leaving meanwhile.
        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()  # stops the worker thread at its next token
                    await asyncio.wait({task})
                    summary(rid, "/v1/chat/completions (client left)", prompt, info, t0)
                    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            task.cancel()  # no-op when done; stops generation if this handler itself is cancelled
        summary(rid, "/v1/chat/completions", prompt, info, t0)
        text = task.result()  # re-raises an ApiError from generation
        return {"id": cid, "object": "chat.completion", "created": created, "model": pool.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason()}],
                "usage": usage()}

    return app


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Serve a nanochat model: a ChatGPT-like web page and an "
                                            "OpenAI-compatible API (/v1/chat/completions).")
    p.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help="which training stage's checkpoint to serve (default: sft)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the only one there is)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="model replicas serving requests in parallel (default: one per GPU on cuda, 1 elsewhere)")
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"],
                   help="device to run on (default: autodetect)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network, without auth)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help=f"default sampling temperature when a request has none, in {list(TEMPERATURE_RANGE)} (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50,
                   help=f"default top-k when a request has none, in {list(TOP_K_RANGE)} (0 = off)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help=f"default reply length limit in tokens when a request has none, in {list(MAX_TOKENS_RANGE)}")
    args = p.parse_args(argv)
    checks = [("--temperature", args.temperature, TEMPERATURE_RANGE), ("--top-k", args.top_k, TOP_K_RANGE),
              ("--max-tokens", args.max_tokens, MAX_TOKENS_RANGE), ("--port", args.port, (0, 65535))]
    for flag, v, (lo, hi) in checks:
        if not lo <= v <= hi:
            p.error(f"{flag} {v} is out of range: it must be in [{lo}, {hi}]")
    return args


def main(argv=None):
    import uvicorn
    from nanochat.checkpoint import CheckpointError
    args = parse_args(argv)
    try:
        workers, model_id = build_workers(args.source, args.model_tag, args.step, args.num_workers, args.device_type)
    except CheckpointError as e:
        raise SystemExit(f"cannot load a model to serve: {e}")
    pool = WorkerPool(workers, model_id, Sampling(args.temperature, args.top_k, args.max_tokens))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"WARNING: listening on {args.host}: anyone who can reach this address can use the model (no auth)")
    log(f"serving {model_id} at http://{args.host}:{args.port}/ (OpenAI API at /v1)")
    uvicorn.run(create_app(pool), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
