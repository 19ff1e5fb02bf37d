"""Serve a generated corpus over HTTP on loopback, one address per site, with its faults.

Each site is its own loopback address (127.0.1.1, 127.0.1.2, ...), all on one
port, so per-host politeness and per-domain statistics are real, and no host
name is ever resolved (a name lookup would leave the machine). The last site
answers robots.txt with 503 (FAULTS N9).

Every fault loop here is bounded in time and bytes and stops by itself.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.web.corpus import URL_LIST_FAULTS

log = logging.getLogger(__name__)

SITE_NET = "127.0.1"  # site k is served on 127.0.1.(k+1)
SLOW_SECONDS = 30.0  # a trickling response lasts at most this long
ENDLESS_BYTES = 256 << 20  # an endless response stops after this many bytes

ROBOTS_SITE0 = b"""# clipline synthetic web
User-agent: *
Disallow: /private/

User-agent: clipline
Disallow: /private/
Allow: /img/
"""


def site_address(site: int) -> str:
    return f"{SITE_NET}.{site + 1}"


@dataclass
class RequestLog:
    """What the server saw: for tests of politeness and of what was (never) fetched."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[int, str, str, float]] = field(default_factory=list)  # site, path, user-agent, time
    inflight: Counter = field(default_factory=Counter)
    max_inflight: Counter = field(default_factory=Counter)
    hits: Counter = field(default_factory=Counter)  # (site, path) -> count

    def enter(self, site: int, path: str, agent: str) -> int:
        with self.lock:
            self.requests.append((site, path, agent, time.time()))
            self.inflight[site] += 1
            self.max_inflight[site] = max(self.max_inflight[site], self.inflight[site])
            self.hits[(site, path)] += 1
            return self.hits[(site, path)]

    def leave(self, site: int) -> None:
        with self.lock:
            self.inflight[site] -= 1

    def paths(self, site: int | None = None) -> list[str]:
        with self.lock:
            return [p for s, p, _, _ in self.requests if site is None or s == site]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clipline-synthetic-web/1"
    web: "SyntheticWeb"  # set on the subclass made per server
    site: int

    def log_message(self, fmt, *args):  # quiet; the RequestLog keeps what tests need
        log.debug("site %d: " + fmt, self.site, *args)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        n = self.web.log.enter(self.site, path, self.headers.get("User-Agent", ""))
        self._in_flight = True
        try:
            self._route(path, n)
        except (OSError, ValueError):
            pass  # the client gave up (as the crawler is meant to on faults), or we reset the connection
        finally:
            self._answered()

    def _answered(self) -> None:
        """The request leaves the in-flight count once: before `_send` writes its response, or at
        the end of a fault route that writes its own (a cut, a drip, a reset).

        Counting a whole response out after writing it would race the client: it may read it and
        send its next request before this thread runs again, and two requests that never
        overlapped for the client would count as two in flight.
        """
        if self._in_flight:
            self._in_flight = False
            self.web.log.leave(self.site)

    # --- helpers
    def _send(self, status: int, body: bytes = b"", content_type: str = "text/plain", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self._answered()
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, status: int = 302):
        self._send(status, b"", headers=[("Location", location)])

    def _file(self, entry: dict) -> bytes:
        return self.web.file_bytes(entry["file"])

    def _route(self, path: str, hit: int):
        if path == "/robots.txt":
            return self._robots()
        if path.startswith("/r/"):  # redirect chains: /r/NAME/HOP
            return self._redirect_chain(path)
        entry = self.web.entries.get((self.site, path))
        if entry is None:
            return self._send(404, b"not found")
        behaviour = entry["behaviour"]
        handler = getattr(self, f"_fault_{behaviour}", None)
        if handler is not None:
            return handler(entry, hit)
        if self.web.delay_s:
            time.sleep(self.web.delay_s)
        return self._send(200, self._file(entry), entry["content_type"])

    def _robots(self):
        if self.site == self.web.robots_5xx_site:
            return self._send(503, b"robots unavailable", headers=[("Retry-After", "3600")])
        if self.site == 0:
            return self._send(200, ROBOTS_SITE0)
        if self.site == 1:
            return self._send(404, b"no robots.txt here")  # 4xx: everything allowed (RFC 9309)
        return self._send(200, b"User-agent: *\nAllow: /\n")

    def _redirect_chain(self, path: str):
        _, _, name, hop = path.split("/", 3)
        hop = int(hop)
        base = self.web.site_url(self.site)
        if name == "loop":
            return self._redirect(f"{base}/r/loop/{1 - hop}")
        if name == "many":
            return self._redirect(f"{base}/r/many/{hop + 1}")  # never ends: too many hops
        return self._send(404, b"no such chain")

    # --- faults (method name = behaviour)
    def _abort(self):
        """Close with a TCP RST (SO_LINGER 0) now, before socketserver's orderly FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _fault_reset(self, entry, hit):
        body = self._file(entry)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 3])
        self.wfile.flush()
        self._abort()

    def _fault_slow(self, entry, hit):
        body = self._file(entry)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        deadline = time.time() + SLOW_SECONDS
        for i in range(len(body)):
            if time.time() > deadline or self.web.stopping.is_set():
                break
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            time.sleep(0.25)
        self.close_connection = True

    def _fault_endless(self, entry, hit):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()  # no Content-Length: the body ends when we close
        block = self._file(entry)[:2] + b"\x00" * 65534
        sent, deadline = 0, time.time() + SLOW_SECONDS
        while sent < ENDLESS_BYTES and time.time() < deadline and not self.web.stopping.is_set():
            self.wfile.write(block)
            sent += len(block)
        self.close_connection = True

    def _fault_short_body(self, entry, hit):
        body = self._file(entry)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body) * 2))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _fault_chunked_cut(self, entry, hit):
        body = self._file(entry)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = body[: len(body) // 2]
        self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
        self.wfile.write(f"{len(body) - len(half):x}\r\n".encode() + body[len(half) : len(half) + 100])
        self.wfile.flush()
        self.close_connection = True  # orderly close mid-chunk, and no terminating zero-size chunk

    def _fault_gzip_bomb(self, entry, hit):
        self._send(200, self._file(entry), "image/jpeg", headers=[("Content-Encoding", "gzip")])

    def _status(self, code: int, headers=()):
        self._send(code, f"status {code}".encode(), headers=headers)

    def _fault_status_404(self, entry, hit):
        self._status(404)

    def _fault_status_410(self, entry, hit):
        self._status(410)

    def _fault_status_451(self, entry, hit):
        self._status(451)

    def _fault_status_500(self, entry, hit):
        self._status(500)

    def _fault_status_503(self, entry, hit):
        self._status(503)

    def _fault_status_429(self, entry, hit):
        self._status(429)  # no Retry-After: the client picks its own backoff

    def _fault_flaky_429(self, entry, hit):
        if hit == 1:
            return self._status(429, headers=[("Retry-After", "1")])
        self._send(200, self._file(entry), "image/jpeg")

    def _fault_flaky_503(self, entry, hit):
        if hit == 1:
            return self._status(503)
        self._send(200, self._file(entry), "image/jpeg")

    def _fault_redirect_ok(self, entry, hit):
        self._redirect(f"{self.web.site_url(self.site)}/fault/xrobots_other_agent.jpg", 301)

    def _fault_redirect_loop(self, entry, hit):
        self._redirect(f"{self.web.site_url(self.site)}/r/loop/0")

    def _fault_redirect_many(self, entry, hit):
        self._redirect(f"{self.web.site_url(self.site)}/r/many/0")

    def _fault_redirect_scheme(self, entry, hit):
        self._redirect("file:///etc/passwd")

    def _fault_redirect_private(self, entry, hit):
        self._redirect(f"http://127.0.0.2:{self.web.port}/img/stand-in.jpg")

    def _fault_redirect_ipv6(self, entry, hit):
        self._redirect(f"http://[::1]:{self.web.port}/img/stand-in.jpg")

    def _xrobots(self, entry, *values):
        self._send(200, self._file(entry), "image/jpeg", headers=[("X-Robots-Tag", v) for v in values])

    def _fault_xrobots_noai(self, entry, hit):
        self._xrobots(entry, "noai")

    def _fault_xrobots_noimageai(self, entry, hit):
        self._xrobots(entry, "noimageai")

    def _fault_xrobots_noindex(self, entry, hit):
        self._xrobots(entry, "noindex")

    def _fault_xrobots_noimageindex(self, entry, hit):
        self._xrobots(entry, "noimageindex")

    def _fault_xrobots_combined(self, entry, hit):
        self._xrobots(entry, "nofollow, NoAI, noarchive")

    def _fault_xrobots_repeated(self, entry, hit):
        self._xrobots(entry, "nofollow", "noimageai")

    def _fault_xrobots_agent(self, entry, hit):
        self._xrobots(entry, "otherbot: noindex", "clipline: noai")

    def _fault_xrobots_other_agent(self, entry, hit):
        self._xrobots(entry, "otherbot: noai, noimageai")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that reset or time out are the point of several faults: not worth a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class SyntheticWeb:
    """A generated corpus served on loopback; use as a context manager or start()/stop()."""

    def __init__(self, root: str | Path, port: int = 0, delay_s: float = 0.0):
        self.root = Path(root)
        self.delay_s = delay_s  # every plain image answer waits this long first (a slow host, for politeness tests)
        catalog = pq.read_table(self.root / "catalog.parquet")
        self.catalog = catalog
        self.entries = {(r["site"], r["path"]): r for r in catalog.to_pylist()}
        self.sites = int(pc.max(catalog["site"]).as_py()) + 1
        # With faults on, the last site is the extra one whose robots.txt answers 503.
        has_5xx = "robots_5xx" in set(catalog["behaviour"].to_pylist())
        self.robots_5xx_site = self.sites - 1 if has_5xx else -1
        self.requested_port = port
        self.port = 0
        self.log = RequestLog()
        self.stopping = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._file_cache: dict[str, bytes] = {}
        self._cache_lock = threading.Lock()
        self.refused_port = 0

    def file_bytes(self, name: str) -> bytes:
        with self._cache_lock:
            data = self._file_cache.get(name)
        if data is None:
            data = (self.root / "files" / name).read_bytes()
            with self._cache_lock:
                self._file_cache[name] = data
        return data

    def site_url(self, site: int) -> str:
        return f"http://{site_address(site)}:{self.port}"

    def _bind(self, site: int, port: int) -> ThreadingHTTPServer:
        handler = type(f"Site{site}Handler", (_Handler,), {"web": self, "site": site})
        server = _QuietServer((site_address(site), port), handler)
        server.daemon_threads = True
        return server

    def start(self) -> "SyntheticWeb":
        for attempt in range(20):
            servers = []
            try:
                first = self._bind(0, self.requested_port)
                servers.append(first)
                port = first.server_address[1]
                for site in range(1, self.sites):
                    servers.append(self._bind(site, port))
                break
            except OSError:
                for s in servers:
                    s.server_close()
                if self.requested_port or attempt == 19:
                    raise
        self._servers, self.port = servers, port
        # A port on site 0's address with nothing listening: "connection refused" (N1).
        probe = socket.socket()
        probe.bind((site_address(0), 0))
        self.refused_port = probe.getsockname()[1]
        probe.close()
        for server in self._servers:
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            t.start()
            self._threads.append(t)
        self._write_url_lists()
        log.info("synthetic web: %d sites on %s.1-%d, port %d", self.sites, SITE_NET, self.sites, self.port)
        return self

    def stop(self) -> None:
        self.stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> "SyntheticWeb":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- URL lists ----------------------------------------------------------------------
    def url_of(self, entry: dict) -> str:
        if entry["behaviour"] == "refused":
            return f"http://{site_address(entry['site'])}:{self.refused_port}{entry['path']}"
        return f"{self.site_url(entry['site'])}{entry['path']}"

    def truth(self) -> pa.Table:
        """The catalog with the URL of each row, plus the refused-before-fetch and metadata rows."""
        rows = []
        for entry in self.catalog.to_pylist():
            rows.append(dict(url=self.url_of(entry), **entry))
        for url, caption, expected in URL_LIST_FAULTS:
            rows.append(
                dict(
                    url=url.format(port=self.port),
                    site=None,
                    path=None,
                    behaviour="url_list",
                    file=None,
                    content_type=None,
                    caption=caption,
                    language=None,
                    colour=None,
                    shape=None,
                    label=None,
                    image_id=None,
                    dup_kind=None,
                    expected_status=expected,
                )
            )
        return pa.Table.from_pylist(rows)

    def _write_url_lists(self) -> None:
        truth = self.truth()
        pq.write_table(truth, self.root / "truth.parquet")
        # Seeded shuffle: a planted copy does not sit next to its original, so work shards split them.
        order = list(range(truth.num_rows))
        random.Random(truth.num_rows).shuffle(order)
        urls = truth.select(["url", "caption"]).take(order)
        # M1/M2 rows the ingest stage must cope with: a null URL, an empty caption, control
        # characters, a 1 MB caption, an exact repeat, and the same URL spelled differently.
        first = truth.filter(pc.equal(truth["behaviour"], "image")).slice(0, 1).to_pylist()[0]
        scheme_upper = first["url"].replace("http://", "HTTP://", 1)
        extra = [
            {"url": None, "caption": "a row without a url"},
            {"url": first["url"] + "?b=2&a=1", "caption": ""},
            {"url": first["url"] + "?a=1&b=2", "caption": "control\x00char\x07acters\x1b[31m"},
            {"url": first["url"] + "?huge=1", "caption": "x" * (1 << 20)},
            {"url": first["url"], "caption": first["caption"]},  # exact repeat of a row
            {"url": scheme_upper, "caption": first["caption"]},  # same after normalisation
        ]
        urls = pa.concat_tables([urls, pa.Table.from_pylist(extra, schema=urls.schema)])
        pq.write_table(urls, self.root / "urls.parquet")
        # Blocklists (FAULTS I6): the URL hash of one image and the byte hash of another.
        images = truth.filter(pc.equal(truth["behaviour"], "image")).to_pylist()
        if len(images) > 2:
            (self.root / "blocklist_url_sha256.txt").write_text(
                hashlib.sha256(images[1]["url"].encode()).hexdigest() + "\n"
            )
            (self.root / "blocklist_image_sha256.txt").write_text(
                hashlib.sha256(self.file_bytes(images[2]["file"])).hexdigest() + "\n"
            )

    @property
    def url_list(self) -> Path:
        return self.root / "urls.parquet"

    def allow_list(self) -> list[str]:
        """The networks the crawler must be told to admit to reach this web."""
        return [f"{SITE_NET}.0/24"]


def serve_forever(root: str | Path, port: int) -> None:
    """Serve until interrupted (the `clipline web` command)."""
    with SyntheticWeb(root, port) as web:
        print(f"serving {web.sites} sites on {SITE_NET}.1-{web.sites}:{web.port}; URL list: {web.url_list}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
