"""
A real HTTP server on 127.0.0.1 for tests of anything that downloads (pretraining shards, the CORE
eval bundle, task data): it serves the files of a directory, honours HTTP Range requests, logs every
request, and can misbehave on purpose per path so retry/resume/verification code meets the failures
it exists for.

    from tests.httpserver import LocalHTTPServer, Fault
    with LocalHTTPServer(root) as srv:
        srv.faults["/data/a.bin"] = Fault(fail_first=2)           # HTTP 500 twice, then the file
        srv.faults["/data/b.bin"] = Fault(cut_after=1000)         # first response dies after 1000 bytes
        srv.faults["/data/c.bin"] = Fault(size_delta=7)           # body 7 bytes longer than the real file
        srv.faults["/data/d.bin"] = Fault(status=404)             # always 404
        srv.routes["/api/list?page=2"] = Route(b"[...]", headers={"Link": "..."})  # canned response
        download(srv.url + "/data/a.bin")
        assert [r.path for r in srv.requests] == [...]

For a ready server on an empty tmp_path / "www", import the `http_server` fixture into a test module
(`from tests.httpserver import http_server`), or build a LocalHTTPServer yourself.
"""

import os
import re
import pathlib
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Fault:
    """How to misbehave for one path. Counters are per path and count every GET of it."""
    status: int | None = None        # always answer with this status (e.g. 404, 403) and no file
    fail_first: int = 0              # answer the first N requests with `fail_status`, then behave
    fail_status: int = 500
    cut_after: int | None = None     # advertise the full length, send this many bytes, drop the socket...
    cut_times: int = 1               # ...on this many of the first requests
    size_delta: int = 0              # serve a body this much longer (>0, zero bytes appended) or shorter (<0)
    hits: int = field(default=0, compare=False)


@dataclass
class Route:
    """A canned response for an exact path (with its query string, if any): for fake JSON APIs."""
    body: bytes
    status: int = 200
    headers: dict = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class Request:
    method: str
    path: str                        # path and query string as sent
    headers: dict

    @property
    def range(self):
        return self.headers.get("Range")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"    # keep-alive like real servers; every response has Content-Length

    def log_message(self, fmt, *args):  # keep pytest output clean; the log is srv.requests
        pass

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _send(self, status, body=b"", headers=None, content_type="text/plain", send_body=True):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _serve(self, send_body):
        srv = self.server.owner
        with srv.lock:
            srv.requests.append(Request(self.command, self.path, dict(self.headers.items())))
            route = srv.routes.get(self.path) or srv.routes.get(self.path.split("?", 1)[0])
            path = urllib.parse.unquote(self.path.split("?", 1)[0])
            fault = srv.faults.get(path)
            hit = 0
            if fault is not None:
                fault.hits += 1
                hit = fault.hits
        if route is not None:
            return self._send(route.status, route.body, route.headers, route.content_type, send_body)
        if fault is not None and fault.status is not None:
            return self._send(fault.status, f"{fault.status} for {path}\n".encode(), send_body=send_body)
        if fault is not None and hit <= fault.fail_first:
            return self._send(fault.fail_status, f"injected failure {hit}\n".encode(), send_body=send_body)

        local = os.path.realpath(os.path.join(srv.root, path.lstrip("/")))
        if not local.startswith(os.path.realpath(srv.root) + os.sep) or not os.path.isfile(local):
            return self._send(404, f"no such file: {path}\n".encode(), send_body=send_body)
        with open(local, "rb") as f:
            data = f.read()
        if fault is not None and fault.size_delta:
            data = data + b"\0" * fault.size_delta if fault.size_delta > 0 else data[:fault.size_delta]

        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                return self._send(400, b"bad Range header\n", send_body=send_body)
            if m.group(1) == "":             # suffix range: the last N bytes
                start = max(0, len(data) - int(m.group(2)))
            else:
                start = int(m.group(1))
                if m.group(2):
                    end = min(end, int(m.group(2)))
            if start >= len(data) or start > end:
                return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"}, send_body=send_body)
            status = 206
        body = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        if fault is not None and fault.cut_after is not None and hit - fault.fail_first <= fault.cut_times:
            # A dropped connection mid-body: the client saw the full Content-Length but gets fewer bytes.
            self.wfile.write(body[:fault.cut_after])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(body)


class LocalHTTPServer:
    """Threaded HTTP server for the files under `root` on 127.0.0.1 at a free port; a context manager.
    `faults` and `routes` may be changed while it runs; `requests` logs every request in order."""

    def __init__(self, root):
        self.root = pathlib.Path(root)
        self.faults: dict[str, Fault] = {}
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._httpd = None
        self._thread = None

    @property
    def url(self):
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def requests_for(self, path):
        """The logged requests whose path (without query string) is `path`."""
        with self.lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def start(self):
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="LocalHTTPServer", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def http_server(tmp_path):
    """A LocalHTTPServer serving tmp_path / "www" (created empty; put files there)."""
    root = tmp_path / "www"
    root.mkdir()
    with LocalHTTPServer(root) as srv:
        yield srv
