"""
The chat web server: the ChatGPT-like page (nanochat/ui.html) and an OpenAI-compatible API, both
streaming replies from a pool of model workers.

    python -m scripts.chat_web                                 # sft model at http://127.0.0.1:8000
    python -m scripts.chat_web --source base --num-workers 2   # any stage; two CPU replicas
    python -m scripts.chat_web --source path/to/hf_export      # or an HF export folder

Endpoints
    GET  /                     the page (read from the nanochat package directory, not the CWD)
    GET  /logo.svg             its icon
    POST /chat/completions     the page's stream: {messages, temperature?, top_k?, max_tokens?} ->
                               server-sent events {"token": text} ... then {"done": true, ...}
    POST /v1/chat/completions  OpenAI Chat Completions, streaming (SSE chunks, then [DONE]) or not
    GET  /v1/models            the one model served
    GET  /health, GET /stats   liveness; workers, busy, queue length, requests served, tokens generated

Errors are JSON in OpenAI's shape {"error": {"message", "type", "param", "code"}}, naming the value and the
limit it broke; bad input is a 4xx, never a 500. On /v1 `model` is not checked (one model answers all);
`top_k` is an extension; `n` must be 1; `stop`, tools and logprobs are refused.

Workers: each owns a model replica and its Engine (one per GPU by default; --num-workers replicas on CPU/MPS)
and generates on its own thread, tokens coming back through an asyncio.Queue. Requests wait FIFO for a free
worker. A client that disconnects (the page's stop button) sets a flag the worker checks every token; the
worker rejoins the pool once its thread has stopped.
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
from contextlib import closing
from dataclasses import dataclass, asdict
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.common import UserError, autodetect_device_type, autodetect_dtype, run_cli
from nanochat.engine import Engine, TextStream, render_prompt, prepare_for_inference

PACKAGE_DIR = pathlib.Path(nanochat.__file__).resolve().parent  # ui.html ships inside the package

# Abuse limits (the values of the original nanochat server). Each is checked before any work is queued.
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
# Errors, request parsing and limits

class ApiError(Exception):
    """A client-facing error, rendered as OpenAI's {"error": {...}} with an HTTP status (400 unless said)."""

    def __init__(self, message, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    too_big = ApiError(f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="body_too_large", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big  # refused before reading it
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_big
    if not raw.strip():
        raise ApiError("request body is empty: send a JSON object with a 'messages' list", code="invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors; deep nesting recurses
        raise ApiError(f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None


def _number(body, name, default, lo, hi, integer=False, open_low=False):
    """body[name] as a number in [lo, hi] (or (lo, hi] with open_low), default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise ApiError(f"{name} must be {kind}, got {json.dumps(v)[:100]}", name, "invalid_type")
    if not math.isfinite(v):
        raise ApiError(f"{name} must be a finite number, got {v}", name, "invalid_value")
    if v < lo or v > hi or (open_low and v == lo):
        bracket = "(" if open_low else "["
        raise ApiError(f"{name}={v} is out of range: it must be in {bracket}{lo}, {hi}]", name, f"{name}_out_of_range")
    return v


def parse_messages(raw, allow_system):
    """Validate the messages list against the limits; returns [{"role", "content"}] with str content."""
    roles = ("system", "user", "assistant") if allow_system else ("user", "assistant")
    if not isinstance(raw, list):
        raise ApiError("messages must be a list of {role, content} objects", "messages", "invalid_type")
    if not raw:
        raise ApiError("messages is empty: send at least one user message", "messages", "empty_messages")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(f"too many messages: {len(raw)}; the limit is {MAX_MESSAGES}", "messages", "too_many_messages")
    out, total = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be a {{role, content}} object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer" and allow_system:
            role = "system"  # OpenAI's newer name for the system message
        if role not in roles:
            raise ApiError(f"messages[{i}].role is {json.dumps(role)[:50]}: it must be one of {', '.join(roles)}",
                           f"messages[{i}].role", "invalid_role")
        where, content = f"messages[{i}].content", m.get("content")
        if allow_system and isinstance(content, list):  # OpenAI's list of content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"{where} must be a string or a list of text parts {{'type': 'text', 'text': str}}: "
                               f"this model reads text only", where, "invalid_content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"{where} must be a string, got {type(content).__name__}", where, "invalid_type")
        if role == "user" and not content.strip():
            raise ApiError(f"messages[{i}] (user) is empty", where, "empty_message")
        if len(content) > MAX_MESSAGE_CHARS:
            raise ApiError(f"messages[{i}] is {len(content)} characters long; the limit is {MAX_MESSAGE_CHARS} "
                           f"characters per message", where, "message_too_long")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise ApiError(f"the conversation is {total} characters long in total; the limit is {MAX_TOTAL_CHARS} "
                       f"characters", "messages", "conversation_too_long")
    if out[-1]["role"] != "user":
        raise ApiError(f"the last message must be the user's (it is {out[-1]['role']!r}): the model writes the next "
                       f"assistant reply", "messages", "invalid_last_role")
    return out


def parse_request(body, defaults, openai):
    """A validated GenRequest from a request body. openai=True is /v1 (system role, top_p, n, seed...)."""
    if not isinstance(body, dict):
        raise ApiError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_type")
    messages = parse_messages(body.get("messages"), allow_system=openai)
    temperature = _number(body, "temperature", defaults.temperature, *TEMPERATURE_RANGE)
    top_k = _number(body, "top_k", defaults.top_k, *TOP_K_RANGE, integer=True)
    top_p, seed = 1.0, random.randint(0, 2 ** 31 - 1)
    max_tokens = _number(body, "max_tokens", defaults.max_tokens, *MAX_TOKENS_RANGE, integer=True)
    if openai:
        top_p = _number(body, "top_p", 1.0, *TOP_P_RANGE, open_low=True)
        max_tokens = _number(body, "max_completion_tokens", max_tokens, *MAX_TOKENS_RANGE, integer=True)  # the newer name
        if _number(body, "n", 1, 1, 2 ** 31, integer=True) != 1:
            raise ApiError(f"n={body['n']} is not supported: this server returns exactly one choice (n=1)", "n",
                           "unsupported_value")
        seed = _number(body, "seed", seed, -2 ** 63, 2 ** 64 - 1, integer=True) % 2 ** 63
        for name in ("stop", "tools", "functions", "response_format", "logprobs"):
            if body.get(name) not in ((None, False) if name == "logprobs" else (None, [], {})):
                raise ApiError(f"{name} is not supported by this server", name, "unsupported_parameter")
        for name, want, kind in (("stream", bool, "a bool"), ("model", str, "a str"),
                                 ("stream_options", dict, "an object")):
            if body.get(name) is not None and not isinstance(body[name], want):
                raise ApiError(f"{name} must be {kind}, got {json.dumps(body[name])[:100]}", name, "invalid_type")
    return GenRequest(messages, float(temperature), int(top_k), float(top_p), int(max_tokens), int(seed))


# -----------------------------------------------------------------------------
# Workers

class Worker:
    """One model replica + its Engine, generating on a dedicated thread."""

    def __init__(self, wid, engine, tokenizer, context_len, device="cpu", num_threads=None):
        self.id, self.engine, self.tokenizer, self.context_len = wid, engine, tokenizer, context_len
        self.device = torch.device(device)
        self.stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.busy, self.requests, self.tokens = False, 0, 0

        def init_thread():  # torch's device and thread count are per-thread settings
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if num_threads:
                torch.set_num_threads(num_threads)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"nanochat-worker{wid}", initializer=init_thread)

    def run(self, prompt, req, max_tokens, cancel, emit):
        """On the worker thread: emit ("token", id) per generated token, then exactly one ("finish", "stop"|"length"|
        "cancelled") or ("error", message). Returns the number of tokens generated."""
        n = 0
        try:
            gen = self.engine.generate(prompt, max_tokens=max_tokens, temperature=req.temperature, seed=req.seed,
                                       top_k=req.top_k or None, top_p=req.top_p if req.top_p < 1.0 else None)
            with torch.inference_mode(), closing(gen):
                for token_column, _mask_column in gen:
                    token = int(token_column[0])
                    finish = "cancelled" if cancel.is_set() else "stop" if token in self.stop_ids else None
                    if finish:
                        emit(("finish", finish))
                        return n
                    n += 1
                    emit(("token", token))
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
        self.tokenizer, self.context_len = workers[0].tokenizer, min(w.context_len for w in workers)
        self.free = asyncio.Queue()
        for w in workers:
            self.free.put_nowait(w)
        self.waiting, self.served, self.tokens, self.created = 0, 0, 0, int(time.time())

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
            raise ApiError(f"invalid conversation: {e}", "messages", "invalid_conversation") from None
        room = self.context_len - len(prompt)
        if room < 1:
            raise ApiError(f"the conversation is {len(prompt)} tokens; the model's context is {self.context_len} "
                           f"tokens, which leaves no room for a reply: start a new chat or shorten it",
                           "messages", "context_length_exceeded")
        return prompt, min(req.max_tokens, room)

    async def generate(self, prompt, req, max_tokens, info):
        """Async generator of text pieces for one reply. Waits for a free worker, streams from its thread, and on
        exit (finished, client gone, or cancelled) stops the thread and frees the worker. Fills info with worker,
        finish_reason, completion_tokens, ttft; raises ApiError on failure."""
        t0 = time.perf_counter()
        self.waiting += 1
        try:
            worker = await self.free.get()
        finally:
            self.waiting -= 1
        worker.busy = True
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def emit(item):  # called on the worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): stop generating
                cancel.set()

        def finished(fut):  # on the event loop, once the thread is done: count, and free the worker
            n = 0 if fut.cancelled() or fut.exception() else fut.result()
            worker.busy, worker.requests, worker.tokens = False, worker.requests + 1, worker.tokens + n
            self.served, self.tokens = self.served + 1, self.tokens + n
            self.free.put_nowait(worker)

        # Free the worker only once its thread has really stopped: a replica must never run two generations.
        run = loop.run_in_executor(worker.executor, worker.run, prompt, req, max_tokens, cancel, emit)
        run.add_done_callback(finished)
        info.update(worker=worker.id, finish_reason="cancelled", completion_tokens=0, ttft=None)
        text = TextStream(self.tokenizer)  # whole characters only
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    info["finish_reason"] = "error"
                    raise ApiError(value, code="generation_failed", status=500, kind="server_error")
                if kind == "token":
                    info["completion_tokens"] += 1
                    info["ttft"] = info["ttft"] or time.perf_counter() - t0
                piece = text.add(value) if kind == "token" else text.flush()
                if piece:
                    yield piece
                if kind == "finish":
                    info["finish_reason"] = value
                    return
        finally:
            cancel.set()  # no-op if the thread already finished; stops it at the next token otherwise


# -----------------------------------------------------------------------------
# Loading

def build_workers(source, model_tag=None, step=None, num_workers=None, device_type=None):
    """Load one model replica per worker, all of the same checkpoint step (or HF export folder): (workers, model id)."""
    from nanochat.checkpoint import STAGE_DIRS, resolve_checkpoint
    from nanochat.hf_convert import load_any
    device_type = device_type or autodetect_device_type()
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(device_type):
        raise UserError(f"--device-type {device_type!r} is not available here: torch sees "
                        f"{', '.join(d for d, ok in available.items() if ok)}")
    n_gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    num_workers = num_workers or (n_gpus if device_type == "cuda" else 1)
    if num_workers < 1:
        raise UserError(f"--num-workers {num_workers} must be >= 1")
    if source in STAGE_DIRS:
        ckpt_dir, step = resolve_checkpoint(source, model_tag, step)  # pin the step so every replica matches
        model_tag = os.path.basename(ckpt_dir)
        model_id = f"nanochat-{source}-{model_tag}-step{step}"
    else:
        model_id = f"nanochat-{os.path.basename(os.path.normpath(str(source)))}"
    dtype, reason = autodetect_dtype(device_type)
    # CPU replicas share the cores: split them so the threads do not oversubscribe.
    threads = max(1, (os.cpu_count() or 1) // num_workers) if device_type == "cpu" else None
    workers = []
    for i in range(num_workers):
        device = torch.device("cuda", i % n_gpus) if device_type == "cuda" else torch.device(device_type)
        model, tokenizer, _ = load_any(source, device, model_tag=model_tag, step=step, compute_dtype=dtype)
        prepare_for_inference(model)  # serving only: weights cast once to the compute dtype
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, model.config.sequence_len, device, threads))
    log(f"{num_workers} worker(s) on {device_type} ({dtype}: {reason}), model {model_id}")
    return workers, model_id


# -----------------------------------------------------------------------------
# The app

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def page_headers(html):
    """Content-Security-Policy allowing exactly the page's own inline script and style (by hash) and requests to
    this origin: even if model output were ever inserted as HTML, nothing would run."""
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
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # 404/405 in the same shape as everything else
        return ApiError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log(f"internal error on {request.url.path}:\n{traceback.format_exc()}")
        return ApiError(f"internal server error: {type(exc).__name__}", status=500, kind="server_error").response()

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
                "defaults": asdict(pool.defaults)}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": pool.model_id, "object": "model", "created": pool.created,
                                            "owned_by": "nanochat"}]}

    def summary(rid, path, prompt, info, t0):
        ttft = f"{info['ttft']:.2f}s" if info.get("ttft") is not None else "-"
        log(f"#{rid} {path} worker {info.get('worker')}: prompt {len(prompt)} tok -> {info.get('completion_tokens', 0)}"
            f" tok, {info.get('finish_reason')}, ttft {ttft}, total {time.perf_counter() - t0:.2f}s")

    @app.post("/chat/completions")
    async def chat_page(request: Request):  # SSE events {"token"}, then {"done"} or {"error"}
        t0, rid, info = time.perf_counter(), next(counter), {}
        req = parse_request(await read_json(request), pool.defaults, openai=False)
        prompt, max_tokens = pool.prepare(req)

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

            def chunk(delta, finish=None, **usage):  # with usage: the final chunk, which has no choices
                choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": pool.model_id,
                            "choices": choices, **usage})

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    async for piece in pool.generate(prompt, req, max_tokens, info):
                        yield chunk({"content": piece})
                    yield chunk({}, finish_reason())
                    if include_usage:
                        yield chunk(None, usage=usage())
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
    p.add_argument("--source", default="sft",
                   help="what to serve: a training stage's checkpoint (base, mid, sft, rl) or the path of an "
                        "HF export folder (default: sft)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag, e.g. d20 (default: the only one there is)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="model replicas serving requests in parallel (default: one per GPU on cuda, 1 elsewhere)")
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network, without auth)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help=f"for requests that give none, in {list(TEMPERATURE_RANGE)}; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help=f"for requests that give none, in {list(TOP_K_RANGE)}; "
                                                         f"0 = off (default 50)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help=f"reply length limit for requests that give none, in {list(MAX_TOKENS_RANGE)} (default 512)")
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
        raise UserError(f"cannot load a model to serve: {e}") from None
    pool = WorkerPool(workers, model_id, Sampling(args.temperature, args.top_k, args.max_tokens))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"WARNING: listening on {args.host}: anyone who can reach this address can use the model (no auth)")
    log(f"serving {model_id} at http://{args.host}:{args.port}/ (OpenAI API at /v1)")
    uvicorn.run(create_app(pool), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_cli(main)
