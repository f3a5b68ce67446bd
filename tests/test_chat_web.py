"""
Tests for scripts/chat_web.py: the real server (the CLI, in a subprocess, serving the tiny pipeline's
trained d2 model) talked to by the official `openai` client and by raw HTTP; every limit; malformed
input; 16 concurrent streaming clients; and, on an in-process server whose workers run a test-only
echo engine, cancellation, queueing and failure handling.
"""

import os
import sys
import json
import time
import socket
import asyncio
import statistics
import threading
import subprocess

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import given, settings, strategies as st

from nanochat.common import UserError
from nanochat.engine import Engine, TextStream, render_prompt
from scripts import chat_web
from scripts.chat_web import Worker, WorkerPool, Sampling, create_app

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_WORKERS = 2


# -----------------------------------------------------------------------------
# Helpers (also used by tests/test_web_ui.py)

class EchoEngine:
    """TEST-ONLY stand-in for nanochat.engine.Engine (same generate() signature), so tests can choose
    what the "model" says: it replies with the last user message's own tokens. A message starting
    with "slow" is repeated at `delay` seconds per token until max_tokens (a reply long enough to
    cancel); the message "boom" fails after one token."""

    def __init__(self, tokenizer, delay=0.02):
        self.tokenizer, self.delay = tokenizer, delay
        self.user_start = tokenizer.encode_special("<|user_start|>")
        self.user_end = tokenizer.encode_special("<|user_end|>")
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        start = len(tokens) - 1 - tokens[::-1].index(self.user_start)
        echo = tokens[start + 1:tokens.index(self.user_end, start)]
        text = self.tokenizer.decode(echo)
        slow = text.startswith("slow")
        n = 0
        while True:
            for t in echo:
                if max_tokens is not None and n >= max_tokens:
                    return
                if slow:
                    time.sleep(self.delay)
                yield [t], [1]
                n += 1
                if text == "boom":
                    raise RuntimeError("the test engine exploded")
            if not slow:
                break
        yield [self.assistant_end], [1]


class ThreadServer:
    """uvicorn serving an app on a free port in a background thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


def echo_pool(tokenizer, num_workers=1, delay=0.02):
    workers = [Worker(i, EchoEngine(tokenizer, delay), tokenizer, context_len=100_000) for i in range(num_workers)]
    return WorkerPool(workers, "echo-test", Sampling())


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sse_events(lines):
    """Parsed JSON of each `data:` line of a server-sent-event stream (the [DONE] marker as a str)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def user(text):
    return [{"role": "user", "content": text}]


# -----------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def real_server(tiny_run, tmp_path_factory):
    """`python -m scripts.chat_web` (the real CLI) serving the tiny d2 base model with 2 workers, run
    from an unrelated working directory (the page must come from the package, not the CWD)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_run), "NANOCHAT_DTYPE": "float32",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log_path = cwd / "server.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--source", "base", "--port", str(port),
                                 "--num-workers", str(NUM_WORKERS), "--max-tokens", "64"],
                                cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chat_web exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"chat_web did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The served model loaded in this process, as the server does (fp32, its worker thread count)."""
    from nanochat.checkpoint import load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(tiny_run))
        model, tok, meta = load_model("base", torch.device("cpu"), phase="eval")
    return model, tok, meta


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(real_server):
    return httpx.get(real_server + "/v1/models").json()["data"][0]["id"]


@pytest.fixture
def echo_server(tokenizer):
    pool = echo_pool(tokenizer, num_workers=1)
    server = ThreadServer(create_app(pool))
    yield server.url, pool
    server.close()
    pool.close()


# -----------------------------------------------------------------------------
# Pure functions

def test_text_stream_never_splits_characters(tokenizer):
    text = "naïve café — 日本語のテキスト 😀🎉 Ωμέγα"
    ids = tokenizer.encode(text)
    # the test means something only if some token is not valid UTF-8 on its own
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    stream = TextStream(tokenizer)  # what the server streams through
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_text_stream_concatenates_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)  # what the server streams through
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_ui_html_is_self_contained_and_text_only():
    html = (chat_web.PACKAGE_DIR / "ui.html").read_text()
    for banned in ("http://", "https://", "<script src", 'rel="stylesheet"', "@import"):
        assert banned not in html, f"ui.html must not load external resources ({banned})"
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert banned not in html, f"ui.html must render text with textContent, found {banned}"
    assert html.count("<script>") == 1 and html.count("<style>") == 1  # what the CSP hashes cover


def test_cli_rejects_bad_flags_and_missing_model(base_dir, capsys):
    with pytest.raises(SystemExit):
        chat_web.parse_args(["--temperature", "3"])
    assert "--temperature 3.0 is out of range" in capsys.readouterr().err
    with pytest.raises(UserError) as e:  # run_cli prints it as one line and exits 1
        chat_web.main(["--source", "base", "--device-type", "cpu"])
    assert "cannot load a model to serve" in str(e.value) and "train one first" in str(e.value)


# -----------------------------------------------------------------------------
# The real server: page, health, models

def test_page_health_models(real_server, model_id):
    r = httpx.get(real_server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == (chat_web.PACKAGE_DIR / "ui.html").read_text()
    assert "script-src 'sha256-" in r.headers["content-security-policy"]
    assert httpx.get(real_server + "/logo.svg").headers["content-type"] == "image/svg+xml"
    h = httpx.get(real_server + "/health").json()
    assert h["status"] == "ok" and h["ready"] and h["workers"] == NUM_WORKERS and h["context_length"] == 128
    assert h["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 64}
    assert model_id.startswith("nanochat-base-d2-step")
    missing = httpx.get(real_server + "/nope")
    assert missing.status_code == 404 and "error" in missing.json()


def test_openai_client_non_streaming_matches_engine(client, model_id, reference, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    assert abs(r.created - time.time()) < 300
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    prompt = render_prompt(tokenizer, messages)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the same greedy reply, straight from the engine in this process (the server's worker thread count)
    model, tok, _ = reference
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // NUM_WORKERS))
    try:
        out = []
        for column, _ in Engine(model, tok).generate(prompt, max_tokens=12, temperature=0):
            if column[0] in (tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()):
                break
            out.append(column[0])
    finally:
        torch.set_num_threads(threads)
    assert choice.message.content == tok.decode(out)
    assert r.usage.completion_tokens == len(out)
    assert choice.finish_reason == ("length" if len(out) == 12 else "stop")


def test_openai_client_streaming_matches_non_streaming(client, model_id):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
    full = client.chat.completions.create(model=model_id, messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.model == model_id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_seed_reproduces_samples(client, model_id):
    kw = dict(model=model_id, messages=user("Once upon a time"), max_tokens=16, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b


def test_page_sse_endpoint(real_server, client, model_id):
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "How are you?"}], "temperature": 0, "max_tokens": 10}
    with httpx.stream("POST", real_server + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    tokens = [e["token"] for e in events if "token" in e]
    done = events[-1]
    assert done["done"] is True and done["finish_reason"] in ("stop", "length") and done["worker"] in range(NUM_WORKERS)
    assert len(tokens) >= 1 and all("token" in e for e in events[:-1])
    same = client.chat.completions.create(model=model_id, messages=body["messages"], max_tokens=10, temperature=0)
    assert "".join(tokens) == same.choices[0].message.content
    assert done["completion_tokens"] == same.usage.completion_tokens


def test_max_tokens_capped_by_context(client, model_id, real_server):
    r = client.chat.completions.create(model=model_id, messages=user("Hi"), max_tokens=4096, temperature=0)
    room = 128 - r.usage.prompt_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == room
    else:
        assert r.usage.completion_tokens < room
    # a conversation longer than the context is refused up front, saying so
    long = httpx.post(real_server + "/v1/chat/completions", json={"messages": user("hello world " * 100)})
    assert long.status_code == 400
    err = long.json()["error"]
    assert err["code"] == "context_length_exceeded" and "context is 128 tokens" in err["message"]


def test_openai_client_sees_validation_errors(client, model_id):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=user("Hi"), temperature=5)
    assert e.value.status_code == 400 and "temperature=5" in str(e.value)


def test_serves_an_hf_export_folder(tiny_run, tmp_path, monkeypatch):
    from nanochat.checkpoint import load_model
    from nanochat.hf_export import export_model
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_run))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    model, tok, _ = load_model("base", "cpu")
    export_model(model, tok, str(tmp_path / "d2export"))
    workers, model_id = chat_web.build_workers(str(tmp_path / "d2export"), num_workers=1, device_type="cpu")
    assert model_id == "nanochat-d2export" and workers[0].context_len == 128
    pool = WorkerPool(workers, model_id, Sampling())
    server = ThreadServer(create_app(pool))
    try:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": user("Hi"), "max_tokens": 8, "temperature": 0}).json()
    finally:
        server.close()
        pool.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # the worker's thread count
    try:
        seqs, _ = Engine(model, tok).generate_batch(render_prompt(tok, user("Hi")), max_tokens=8, temperature=0)
    finally:
        torch.set_num_threads(threads)
    assert r["model"] == model_id
    assert r["choices"][0]["message"]["content"] == tok.decode(seqs[0][len(render_prompt(tok, user("Hi"))):])


# -----------------------------------------------------------------------------
# Limits and malformed input

def _alternating(n, chars=2):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * chars} for i in range(n)]


LIMIT_CASES = [
    # (name, request fields, substrings the message must contain, param)
    ("too many messages", {"messages": _alternating(501)}, ["501", "500"], "messages"),
    ("message too long", {"messages": user("y" * 8001)}, ["8001", "8000"], "messages[0].content"),
    ("conversation too long", {"messages": _alternating(5, 7000)}, ["35000", "32000"], "messages"),
    ("no messages", {"messages": []}, ["empty"], "messages"),
    ("empty user message", {"messages": user("")}, ["empty"], "messages[0].content"),
    ("ends with assistant", {"messages": _alternating(2)}, ["last message"], "messages"),
    ("temperature high", {"temperature": 2.5}, ["temperature=2.5", "[0.0, 2.0]"], "temperature"),
    ("temperature low", {"temperature": -0.1}, ["temperature=-0.1", "[0.0, 2.0]"], "temperature"),
    ("top_k high", {"top_k": 201}, ["top_k=201", "[0, 200]"], "top_k"),
    ("top_k low", {"top_k": -1}, ["top_k=-1", "[0, 200]"], "top_k"),
    ("max_tokens zero", {"max_tokens": 0}, ["max_tokens=0", "[1, 4096]"], "max_tokens"),
    ("max_tokens high", {"max_tokens": 4097}, ["max_tokens=4097", "[1, 4096]"], "max_tokens"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, ["tool"], "messages[0].role"),
    ("roles do not alternate", {"messages": user("a") + user("b")}, ["alternate"], "messages"),
]

OPENAI_ONLY_CASES = [
    ("n", {"n": 2}, ["n=2", "n=1"], "n"),
    ("top_p zero", {"top_p": 0}, ["top_p=0", "(0.0, 1.0]"], "top_p"),
    ("top_p high", {"top_p": 1.5}, ["top_p=1.5"], "top_p"),
    ("max_completion_tokens", {"max_completion_tokens": 5000}, ["max_completion_tokens=5000", "4096"],
     "max_completion_tokens"),
    ("stop", {"stop": ["\n"]}, ["stop"], "stop"),
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name,fields,needles,param", LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_limits(real_server, path, name, fields, needles, param):
    body = {"messages": user("Hi"), **fields}
    r = httpx.post(real_server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in err["message"], err
    assert err["param"] == param


@pytest.mark.parametrize("name,fields,needles,param", OPENAI_ONLY_CASES, ids=[c[0] for c in OPENAI_ONLY_CASES])
def test_openai_only_limits(real_server, name, fields, needles, param):
    r = httpx.post(real_server + "/v1/chat/completions", json={"messages": user("Hi"), **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert all(n in err["message"] for n in needles), err
    assert err["param"] == param


def test_system_role_only_on_v1(real_server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    page = httpx.post(real_server + "/chat/completions", json={"messages": msgs})
    assert page.status_code == 400 and page.json()["error"]["param"] == "messages[0].role"
    assert "system" in page.json()["error"]["message"]
    v1 = httpx.post(real_server + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}, timeout=30)
    assert v1.status_code == 200


MALFORMED = [
    b"{not json",
    b"",
    b"\xff\xfe\x00\x01garbage",
    b"[" * 100_000,
    b"[]",
    b'"just a string"',
    b'{"messages": "hi"}',
    b'{"messages": [["user", "hi"]]}',
    b'{"messages": [{"role": "user"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}',
    b'{"messages": [{"role": 7, "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": true}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 2.0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_k": "5"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_malformed_requests_are_4xx(real_server, path):
    with httpx.Client(base_url=real_server, timeout=30) as c:
        for raw in MALFORMED:
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code in (400, 422), (raw[:60], r.status_code, r.text)
            assert r.json()["error"]["message"], raw[:60]
        v1_only = [b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
                   b'{"messages": [{"role": "user", "content": "hi"}], "n": "1"}',
                   b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
                   b'{"messages": [{"role": "user", "content": "hi"}], "seed": 0.5}']
        for raw in v1_only if path.startswith("/v1") else []:
            r = c.post(path, content=raw)
            assert r.status_code == 400, (raw, r.text)
        big = c.post(path, content=b'{"messages": [], "pad": "' + b"x" * (2 << 20) + b'"}')
        assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
        assert c.get("/health").json()["status"] == "ok"


def test_openai_content_parts_are_accepted(real_server):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
            "max_tokens": 2}
    assert httpx.post(real_server + "/v1/chat/completions", json=body, timeout=30).status_code == 200


# -----------------------------------------------------------------------------
# Load: 16 concurrent streaming clients

def test_sixteen_concurrent_streaming_clients(real_server, model_id):
    before = httpx.get(real_server + "/stats").json()
    n_clients, max_tokens = 16, 32

    async def one(client, i):
        t0 = time.perf_counter()
        ttft, usage = None, None
        stream = await client.chat.completions.create(
            model=model_id, messages=user(f"Write a short poem about the number {i}."), max_tokens=max_tokens,
            temperature=0.8, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if ttft is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                ttft = time.perf_counter() - t0
            if chunk.usage:
                usage = chunk.usage
        return ttft, usage.completion_tokens

    async def run_all():
        async with openai.AsyncOpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(c, i) for i in range(n_clients)))
            return results, time.perf_counter() - t0

    results, wall = asyncio.run(run_all())
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    assert len(results) == n_clients and all(t is not None for t in ttfts)
    assert all(1 <= r[1] <= max_tokens for r in results)
    print(f"\n{n_clients} concurrent streaming clients on {NUM_WORKERS} CPU workers (d2): "
          f"TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms, max {ttfts[-1] * 1000:.0f} ms; "
          f"{tokens} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s aggregate")
    after = httpx.get(real_server + "/stats").json()
    assert after["requests_served"] - before["requests_served"] == n_clients
    assert after["tokens_generated"] - before["tokens_generated"] == tokens
    assert after["busy_workers"] == 0 and after["queue_length"] == 0 and after["workers"] == NUM_WORKERS
    assert sum(w["requests"] for w in after["per_worker"]) == after["requests_served"]
    assert all(w["requests"] > 0 for w in after["per_worker"])  # both workers took a share


# -----------------------------------------------------------------------------
# Cancellation, queueing, failures (echo engine)

def _stats(url):
    return httpx.get(url + "/stats", timeout=10).json()


def _first_token(response):
    """Read up to the first generated text; returns the line iterator, which the caller must keep:
    dropping an unfinished httpx line iterator closes the connection (a disconnect)."""
    lines = response.iter_lines()
    for event in sse_events(lines):
        if isinstance(event, dict) and ("token" in event or event.get("choices") and event["choices"][0]["delta"].get("content")):
            return lines
    raise AssertionError("stream ended without a token")


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_disconnect_frees_worker(echo_server, path):
    url, _ = echo_server
    body = {"messages": user("slow and steady "), "max_tokens": 4096, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + path, json=body) as r:
            lines = _first_token(r)
            assert _stats(url)["busy_workers"] == 1
            del lines
    t0 = time.time()
    wait_for(lambda: _stats(url)["busy_workers"] == 0, what="the worker to be released after the disconnect")
    freed_after = time.time() - t0
    s = _stats(url)
    assert s["requests_served"] == 1 and s["tokens_generated"] < 1000  # stopped long before 4096 tokens
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("next")}, timeout=30)
    assert r.json()["choices"][0]["message"]["content"] == "next"
    print(f"\nworker freed {freed_after * 1000:.0f} ms after the client left ({s['tokens_generated']} tokens made)")


def test_disconnect_while_queued(echo_server):
    url, _ = echo_server
    slow = {"messages": user("slow slow slow "), "max_tokens": 4096}
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", url + "/chat/completions", json=slow) as ra:
            lines = _first_token(ra)
            with b.stream("POST", url + "/chat/completions", json=slow) as rb:
                assert rb.status_code == 200
                wait_for(lambda: _stats(url)["queue_length"] == 1, what="the second request to queue")
            wait_for(lambda: _stats(url)["queue_length"] == 0, what="the queued request to leave the queue")
            assert _stats(url)["busy_workers"] == 1
            del lines
    wait_for(lambda: _stats(url)["busy_workers"] == 0, what="the worker to be released")
    assert _stats(url)["requests_served"] == 1  # the queued request never took the worker
    assert httpx.post(url + "/v1/chat/completions", json={"messages": user("ok")}, timeout=30).status_code == 200


def test_non_streaming_disconnect_frees_worker(echo_server):
    url, _ = echo_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={"messages": user("slow poke "), "max_tokens": 4096}, timeout=0.5)
    wait_for(lambda: _stats(url)["busy_workers"] == 0, what="the worker to be released")
    assert _stats(url)["tokens_generated"] < 1000


def test_event_loop_not_blocked_by_generation(echo_server):
    url, _ = echo_server
    with httpx.Client(timeout=30) as c, c.stream("POST", url + "/chat/completions",
                                                 json={"messages": user("slow "), "max_tokens": 4096}) as r:
        lines = _first_token(r)
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 2.0  # milliseconds normally; a blocked loop would take 80 s
        assert _stats(url)["busy_workers"] == 1 and next(lines) is not None  # still generating meanwhile


def test_workers_generate_in_parallel(tokenizer):
    pool = echo_pool(tokenizer, num_workers=2, delay=0.1)
    server = ThreadServer(create_app(pool))
    try:
        body = {"messages": user("slow"), "max_tokens": 10}  # 10 tokens at 0.1 s each: 1 s alone

        def post():
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=post) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        both = time.perf_counter() - t0
        assert both < 1.8, f"two requests on two workers took {both:.2f}s: they ran one after the other"
        assert [w["requests"] for w in _stats(server.url)["per_worker"]] == [1, 1]
    finally:
        server.close()
        pool.close()


def test_generation_failure_is_reported_not_fatal(echo_server):
    url, _ = echo_server
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("boom")}, timeout=30)
    assert r.status_code == 500
    assert "the test engine exploded" in r.json()["error"]["message"] and r.json()["error"]["type"] == "server_error"
    with httpx.stream("POST", url + "/chat/completions", json={"messages": user("boom")}, timeout=30) as s:
        events = list(sse_events(s.iter_lines()))
    assert "error" in events[-1] and "exploded" in events[-1]["error"]["message"]
    wait_for(lambda: _stats(url)["busy_workers"] == 0, what="the worker to be released")
    r = httpx.post(url + "/v1/chat/completions", json={"messages": user("fine")}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
