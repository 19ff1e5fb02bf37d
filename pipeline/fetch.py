"""The crawl's network layer: one safe, polite HTTP GET, with what img2dataset leaves out.

- Only http/https. Each host is resolved once per request and *every* address
  is checked against the guard (loopback, private, link-local, CGNAT,
  reserved, multicast, IPv6 ULA/link-local, IPv4-mapped and 6to4/NAT64
  embeddings) unless an allow-list network admits it; the connection is then
  made to the checked address (no DNS rebinding between check and connect).
  Numeric host spellings (decimal, octal, hex, short forms) are canonicalised
  here with inet_aton, so they are checked like any address and never reach
  a resolver. Every redirect hop goes through the same checks.
- A total deadline per download (not only a per-read timeout, which a server
  trickling one byte at a time never trips) and a byte cap, enforced while
  reading, also on compressed bodies (no decompression bombs).
- X-Robots-Tag (noai, noimageai, noindex, noimageindex, none; also
  agent-scoped "clipline: noai") is honoured from the headers, before the body
  is read.
- robots.txt per RFC 9309 (longest match, allow wins ties, 4xx → allow all,
  5xx/unreachable → disallow all), fetched through the same guard and cached
  per host for the process.

Python's urllib.robotparser is not used: it applies the first matching rule
rather than the longest (RFC 9309 §2.2.2) and fetches through urllib, outside
the address guard.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urljoin, urlsplit

OPT_OUT_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex", "none"}
# X-Robots-Tag directives that themselves contain a colon and are not agent prefixes.
VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600
ROBOTS_UNREACHABLE_TTL_S = 60  # a host that did not answer is asked again after this
TRANSPORT_STATUSES = frozenset({"connection_error", "timeout", "dns_error", "truncated"})


class FetchError(Exception):
    """A download that ended in a crawl status other than success."""

    def __init__(self, status: str, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.http_status = http_status
        self.retry_after = retry_after


# --- addresses -------------------------------------------------------------------------------


def canonical_ip(host: str) -> str | None:
    """The IP a numeric host spelling stands for (any inet_aton form, or IPv6), else None."""
    h = host.strip("[]")
    try:
        return str(ipaddress.ip_address(h.split("%")[0]))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", h) and not h.endswith("."):
        try:
            return socket.inet_ntoa(socket.inet_aton(h))
        except OSError:
            return None
    return None


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d, deprecated (RFC 4291 2.5.5.1)
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (RFC 2765)
# Never global, whatever Python's tables say: local-use NAT64 (RFC 8215; where it puts the IPv4 depends
# on the operator's prefix length) and the deprecated site-local range (RFC 3879).
NOT_GLOBAL_V6 = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (mapped, 6to4, NAT64, compatible, translated), else None."""
    if addr.ipv4_mapped:
        return addr.ipv4_mapped
    if addr.sixtofour:
        return addr.sixtofour
    if addr in NAT64 or addr in IPV4_TRANSLATED or (addr in IPV4_COMPATIBLE and int(addr) > 1):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)  # (:: and ::1 are not IPv4-compatible forms)
    return None


@dataclass(frozen=True)
class AddressGuard:
    """Which resolved addresses may be contacted: public unicast, or an allow-listed network."""

    allow: tuple[str, ...] = ()

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allow]

    def permits(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        candidates = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and (inner := _embedded_ipv4(addr)) is not None:
            candidates.append(inner)
        allowed = self.networks()
        if any(c in n for c in candidates for n in allowed if c.version == n.version):
            return True
        if any(addr in n for n in NOT_GLOBAL_V6):
            return False
        return all(c.is_global and not c.is_multicast for c in candidates)


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of `host` from the system resolver, in its order, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass
class Network:
    """How names become addresses, and which addresses may be contacted."""

    guard: AddressGuard = field(default_factory=AddressGuard)
    hosts: dict[str, str] = field(default_factory=dict)  # static name → IP (like curl --resolve)
    dns: bool = True  # False: names not in `hosts` fail without any lookup (offline tests, demo)
    resolver: Resolver = system_resolver

    def addresses(self, host: str, port: int) -> list[str]:
        """Checked addresses for host:port; FetchError refused_address / dns_error otherwise."""
        ip = canonical_ip(host)
        if ip is None:
            name = host.lower().rstrip(".")
            if name in self.hosts:
                ips = [self.hosts[name]]
            elif not self.dns:
                raise FetchError(
                    "dns_error", f"{host}: name lookups are off (crawl.dns: false) and it is not in crawl.hosts"
                )
            else:
                try:
                    ips = self.resolver(host, port)
                except (socket.gaierror, UnicodeError, OSError) as e:
                    raise FetchError("dns_error", f"{host}: {e}") from e
                if not ips:
                    raise FetchError("dns_error", f"{host}: no addresses")
        else:
            ips = [ip]
        refused = [a for a in ips if not self.guard.permits(a)]
        if refused:
            raise FetchError("refused_address", f"{host} resolves to {refused[0]}, which is not a public address")
        return ips


# --- X-Robots-Tag ------------------------------------------------------------------------------


def x_robots_opt_out(values: list[str], agent: str) -> str | None:
    """The opt-out directive that applies to `agent` in X-Robots-Tag header values, else None."""
    token = agent.lower()
    for value in values:
        scoped = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*:\s*(.*)$", value)
        if scoped and scoped.group(1).lower() not in VALUED_DIRECTIVES:
            if scoped.group(1).lower() != token:
                continue
            value = scoped.group(2)
        directives = {d.strip().lower() for d in value.split(",")}
        hit = directives & OPT_OUT_DIRECTIVES
        if hit:
            return sorted(hit)[0]
    return None


# --- robots.txt (RFC 9309) ---------------------------------------------------------------------


ROBOTS_MAX_RULES = 10_000  # rules kept from one robots.txt (for our product token and *), the first ones
ROBOTS_MAX_PATTERN = 2_000  # characters of one pattern; a longer one is cut


@dataclass(frozen=True)
class RobotsPattern:
    """An RFC 9309 path pattern: '*' matches any run of characters, a final '$' anchors the end.

    Matched without a regex: a backtracking '.*' per star let a hostile robots.txt decide how long a
    match takes (`/*a*a*a*a*a*a*b` against a 100-character path took 27 s). Here the pieces between
    stars are found left to right, each at its leftmost place, which is enough for patterns whose only
    wildcard is '*': O(len(path) x pieces) whatever the pattern."""

    pieces: tuple[str, ...]  # the pattern split on '*' (runs of stars collapsed)
    anchored: bool

    @classmethod
    def parse(cls, pattern: str) -> "RobotsPattern":
        anchored = pattern.endswith("$")
        body = re.sub(r"\*+", "*", pattern[:-1] if anchored else pattern)
        return cls(tuple(body.split("*")), anchored)

    def match(self, path: str) -> bool:
        first, *rest = self.pieces
        if not rest:  # no star: a prefix, or the whole path when anchored
            return path == first if self.anchored else path.startswith(first)
        if not path.startswith(first):
            return False
        at = len(first)
        *middle, last = rest
        for piece in middle:
            found = path.find(piece, at)
            if found < 0:
                return False
            at = found + len(piece)
        if self.anchored:
            return path.endswith(last) and len(path) - len(last) >= at
        return path.find(last, at) >= 0


@dataclass
class RobotsRules:
    """The rules of one robots.txt for one product token."""

    rules: list[tuple[int, bool, RobotsPattern]]  # (pattern length, allow, pattern)
    allow_all: bool = False
    disallow_all: bool = False
    unreachable: FetchError | None = None  # the host could not be reached at all: report that instead

    @classmethod
    def parse(cls, text: str, agent: str) -> "RobotsRules":
        token = agent.lower()
        groups: list[tuple[set[str], list[tuple[bool, str]]]] = []
        agents: set[str] | None = None
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            key, value = (s.strip() for s in line.split(":", 1))
            key = key.lower()
            if key == "user-agent":
                if agents is None:  # a new group starts
                    agents = set()
                    groups.append((agents, []))
                agents.add(value.lower())
            elif key in ("allow", "disallow"):
                if groups:
                    groups[-1][1].append((key == "allow", value))
                agents = None  # the next user-agent line starts another group
        mine = [rules for names, rules in groups if token in names]
        if not mine:
            mine = [rules for names, rules in groups if "*" in names]
        patterns = [(allow, p[:ROBOTS_MAX_PATTERN]) for rules in mine for allow, p in rules if p][:ROBOTS_MAX_RULES]
        compiled = [(len(p), allow, RobotsPattern.parse(p)) for allow, p in patterns]
        return cls(compiled, allow_all=not compiled)

    def size(self) -> int:
        """Bytes this entry holds in a cache, roughly: its patterns plus a fixed cost per rule."""
        return 200 + sum(100 + length for length, _, _ in self.rules)

    def allowed(self, path: str) -> bool:
        if self.disallow_all:
            return False
        if self.allow_all or path == "/robots.txt":
            return True
        best: tuple[int, bool] | None = None
        for length, allow, pattern in self.rules:
            if pattern.match(path) and (best is None or length > best[0] or (length == best[0] and allow)):
                best = (length, allow)
        return True if best is None else best[1]


# --- HTTP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchPolicy:
    """Limits of one download."""

    user_agent: str = "clipline/0.1 (image-text dataset crawler; honours robots.txt and X-Robots-Tag noai)"
    agent_token: str = "clipline"  # the product token matched in robots.txt and X-Robots-Tag
    timeout_s: float = 10.0  # per connect / read
    deadline_s: float = 30.0  # whole download, redirects included
    max_bytes: int = 20 << 20
    max_redirects: int = 5
    robots_txt: bool = True
    x_robots_tag: bool = True


@dataclass
class FetchResult:
    body: bytes
    http_status: int
    final_url: str
    content_type: str | None


MAX_HEADER_BYTES = 64 << 10  # status line and headers of one response
MAX_TRAILER_LINES = 32  # after a chunked body


class _CountedReader:
    """A response's fp while its status line and headers are read: refuses more than MAX_HEADER_BYTES."""

    def __init__(self, fp):
        self._fp, self._read = fp, 0

    def readline(self, limit: int = -1) -> bytes:
        line = self._fp.readline(limit)
        self._read += len(line)
        if self._read > MAX_HEADER_BYTES:
            raise http.client.HTTPException(f"response headers over {MAX_HEADER_BYTES} bytes")
        return line

    def __getattr__(self, name):
        return getattr(self._fp, name)


class _CappedResponse(http.client.HTTPResponse):
    """http.client's response with a cap on header bytes and on trailer lines (it reads trailers until a
    blank line, however many come)."""

    def begin(self):
        fp, self.fp = self.fp, _CountedReader(self.fp)
        try:
            super().begin()
        finally:
            if self.fp is not None:  # begin() may close it
                self.fp = fp

    def _read_and_discard_trailer(self):
        for _ in range(MAX_TRAILER_LINES):
            line = self.fp.readline(http.client._MAXLINE + 1)
            if len(line) > http.client._MAXLINE:
                raise http.client.LineTooLong("trailer line")
            if not line or line in (b"\r\n", b"\n", b""):
                return
        raise http.client.HTTPException(f"more than {MAX_TRAILER_LINES} trailer lines")


class _PinnedHTTP(http.client.HTTPConnection):
    response_class = _CappedResponse

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    response_class = _CappedResponse

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RobotsCache:
    """Parsed robots.txt per (scheme, host, port, agent), least recently used first out past `max_bytes`.

    One per process, shared by its crawl threads. At 400M URLs a worker meets hosts by the million:
    an unbounded cache (and its per-host locks) would grow for the whole life of the worker."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.rules: OrderedDict[tuple, tuple[RobotsRules, float]] = OrderedDict()
        self.fetching: dict[tuple, threading.Lock] = {}  # one fetch per host at a time
        self.lock = threading.Lock()

    def get(self, key: tuple) -> tuple[RobotsRules, float] | None:
        with self.lock:
            entry = self.rules.get(key)
            if entry is not None:
                self.rules.move_to_end(key)
            return entry

    def put(self, key: tuple, rules: RobotsRules) -> None:
        with self.lock:
            old = self.rules.pop(key, None)
            if old is not None:
                self.bytes -= old[0].size()
            self.rules[key] = (rules, time.time())
            self.bytes += rules.size()
            while self.bytes > self.max_bytes and len(self.rules) > 1:
                gone, (evicted, _) = self.rules.popitem(last=False)
                self.bytes -= evicted.size()
                lock = self.fetching.get(gone)
                if lock is not None and not lock.locked():
                    del self.fetching[gone]


class DeadlineWatchdog:
    """Shuts down the socket of a download whose total deadline has passed, whatever it is blocked in.

    Socket timeouts bound each read only: a server trickling its status line, headers, trailers or an
    error body a byte at a time stays under any per-read timeout for as long as it likes. One thread
    per process keeps the deadlines in a heap; shutdown() wakes a blocked recv (close() would not)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, dict]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> dict:
        """Start watching `sock` until `release`; the returned entry says whether the deadline fired."""
        entry = {"sock": sock, "fired": False, "done": False}
        with self._cv:
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    def release(self, entry: dict) -> None:
        with self._cv:
            entry["done"] = True

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][2]["done"]:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, _, entry = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._heap)
                entry["fired"] = True
            try:
                entry["sock"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


_WATCHDOG = DeadlineWatchdog()


class Fetcher:
    """Safe GETs with a connection pool per (host, port, address) and a robots.txt cache."""

    def __init__(self, network: Network, policy: FetchPolicy, robots_cache: "RobotsCache | None" = None):
        self.network = network
        self.policy = policy
        self._pool: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._pool_lock = threading.Lock()
        self.robots_cache = robots_cache if robots_cache is not None else RobotsCache()

    # connections
    def _connection(self, scheme: str, host: str, port: int, ip: str, timeout: float, reuse: bool = True):
        """(pool key, connection, whether it was reused from the pool)."""
        key = (scheme, host, port, ip)
        if reuse:
            with self._pool_lock:
                idle = self._pool.get(key)
                if idle:
                    conn = idle.pop()
                    conn.timeout = timeout
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout)
                    return key, conn, True
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        return key, cls(host, port, ip, timeout), False

    def _release(self, key: tuple, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if not reusable:
            conn.close()
            return
        with self._pool_lock:
            idle = self._pool.setdefault(key, [])
            if len(idle) < 16:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._pool_lock:
            for conns in self._pool.values():
                for c in conns:
                    c.close()
            self._pool.clear()

    # robots.txt
    def robots(self, scheme: str, host: str, port: int, deadline: float) -> RobotsRules:
        key = (scheme, host.lower(), port, self.policy.agent_token)
        cache = self.robots_cache
        with cache.lock:
            lock = cache.fetching.setdefault(key, threading.Lock())
        with lock:  # one fetch per host; the others wait for it
            cached = cache.get(key)
            if cached and time.time() - cached[1] < (
                ROBOTS_UNREACHABLE_TTL_S if cached[0].unreachable else ROBOTS_TTL_S
            ):
                return cached[0]
            netloc = f"[{host}]" if ":" in host else host
            url = f"{scheme}://{netloc}:{port}/robots.txt"
            try:
                result = self._get(url, deadline, ROBOTS_MAX_BYTES, check_robots=False, robots_file=True)
                rules = RobotsRules.parse(result.body.decode("utf-8", "replace"), self.policy.agent_token)
            except FetchError as e:
                if e.http_status is not None and 400 <= e.http_status < 500 and e.http_status != 429:
                    rules = RobotsRules([], allow_all=True)  # "unavailable": no restrictions
                elif e.status in TRANSPORT_STATUSES:
                    # Nothing answered: the URLs of this host fail with the transport error (transient, so
                    # `crawl --retry-failed` tries again) rather than as a permanent robots refusal.
                    rules = RobotsRules([], disallow_all=True, unreachable=e)
                else:
                    rules = RobotsRules([], disallow_all=True)  # 5xx, 429: assume complete disallow
            cache.put(key, rules)
            return rules

    def get(self, url: str) -> FetchResult:
        """Download `url` under the policy; raises FetchError with the crawl status otherwise."""
        return self._get(
            url, time.monotonic() + self.policy.deadline_s, self.policy.max_bytes, check_robots=self.policy.robots_txt
        )

    def _get(
        self, url: str, deadline: float, max_bytes: int, check_robots: bool, robots_file: bool = False
    ) -> FetchResult:
        seen: set[str] = set()
        for hop in range(self.policy.max_redirects + 1):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                if hop == 0:
                    raise FetchError("refused_scheme", f"scheme '{scheme}' is not http or https")
                raise FetchError("redirect_error", f"redirect to a non-http(s) URL: {url[:200]}")
            try:
                host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
            except ValueError as e:
                raise FetchError("invalid_url" if hop == 0 else "redirect_error", f"bad URL {url[:200]}: {e}") from e
            if not host:
                raise FetchError("invalid_url" if hop == 0 else "redirect_error", f"no host in {url[:200]}")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            ips = self.network.addresses(host, port)
            if check_robots:
                rules = self.robots(scheme, host, port, deadline)
                if rules.unreachable is not None:
                    raise FetchError(rules.unreachable.status, f"robots.txt unreachable: {rules.unreachable}")
                if not rules.allowed(path):
                    raise FetchError("robots_disallowed", f"robots.txt of {host} disallows {parts.path or '/'}")
            status, headers, body = self._request(
                scheme, host, port, ips[0], path, deadline, max_bytes, robots_file=robots_file
            )
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise FetchError("redirect_error", f"HTTP {status} without a Location", status)
                seen.add(url)
                url = urljoin(url, location.strip())
                if url in seen:
                    raise FetchError("redirect_error", f"redirect loop at {url[:200]}", status)
                continue
            return FetchResult(body, status, url, headers.get("content-type"))
        raise FetchError("redirect_error", f"more than {self.policy.max_redirects} redirects")

    def _request(self, scheme, host, port, ip, path, deadline, max_bytes, robots_file=False, reuse=True):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_passed(self.policy)
        key, conn, reused = self._connection(scheme, host, port, ip, min(self.policy.timeout_s, remaining), reuse)
        reusable, watched = False, None
        try:
            try:
                if conn.sock is None:
                    conn.connect()  # bounded by the connection's timeout, min(timeout_s, time left)
                watched = _WATCHDOG.watch(conn.sock, deadline)  # the status line, headers, body, trailers
                conn.request(
                    "GET",
                    path,
                    headers={
                        "User-Agent": self.policy.user_agent,
                        "Accept": "text/plain,*/*" if robots_file else "image/*,*/*;q=0.5",
                        "Accept-Encoding": "identity",
                    },
                )
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused or (watched and watched["fired"]):
                    raise
                # The server closed the idle keep-alive connection: not this URL's fault.
                _WATCHDOG.release(watched)
                return self._request(scheme, host, port, ip, path, deadline, max_bytes, robots_file, reuse=False)
            status = resp.status
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if status != 200:
                if resp.length is not None and resp.length <= 64 << 10:
                    resp.read()  # drain a small body so the connection can serve the next request
                    reusable = not resp.will_close
                if status in (301, 302, 303, 307, 308):
                    return status, headers, b""
                raise _http_error(status, headers)
            if self.policy.x_robots_tag and not robots_file:
                directive = x_robots_opt_out(resp.msg.get_all("X-Robots-Tag") or [], self.policy.agent_token)
                if directive:
                    raise FetchError("opted_out", f"X-Robots-Tag: {directive}", status)
            if resp.length is not None and resp.length > max_bytes:
                raise FetchError("too_large", f"Content-Length {resp.length} is over the cap of {max_bytes}", status)
            body = _read_body(resp, conn, deadline, max_bytes, self.policy)
            resp.close()  # the body is complete; the socket stays with the connection for the next request
            reusable = not resp.will_close
            if watched and watched["fired"]:  # the deadline hit as the last bytes came: not a whole answer
                raise deadline_passed(self.policy, status)
            body = _decode(body, headers.get("content-encoding", ""), max_bytes)
            return status, headers, body
        except FetchError:
            if watched and watched["fired"]:
                reusable = False
            raise
        except Exception as e:
            reusable = False
            if (watched and watched["fired"]) or time.monotonic() >= deadline:
                raise deadline_passed(self.policy) from e
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise FetchError("timeout", f"no data for {self.policy.timeout_s:g}s (the per-read timeout)") from e
            if isinstance(e, http.client.IncompleteRead):
                raise FetchError(
                    "truncated", f"body cut short: {len(e.partial)} bytes read, {e.expected} more expected"
                ) from e
            if isinstance(e, (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError)):
                raise FetchError("connection_error", f"{type(e).__name__}: {e}") from e
            raise
        finally:
            if watched is not None:
                _WATCHDOG.release(watched)
            self._release(key, conn, reusable)


def deadline_passed(policy: FetchPolicy, http_status: int | None = None) -> FetchError:
    """The timeout of the total deadline (as opposed to the per-read timeout: the message says which fired)."""
    return FetchError("timeout", f"the {policy.deadline_s:g}s deadline of the whole download passed", http_status)


def _http_error(status: int, headers: dict) -> FetchError:
    if status in (404, 410):
        return FetchError("not_found", f"HTTP {status}", status)
    if status == 451:
        return FetchError("legal_unavailable", "HTTP 451", status)
    if status == 429:
        return FetchError("rate_limited", "HTTP 429", status, parse_retry_after(headers.get("retry-after")))
    if status >= 500:
        return FetchError("server_error", f"HTTP {status}", status, parse_retry_after(headers.get("retry-after")))
    return FetchError("http_client_error", f"HTTP {status}", status)


def _read_body(resp: http.client.HTTPResponse, conn, deadline: float, max_bytes: int, policy: FetchPolicy) -> bytes:
    """Read the body in blocks, stopping at the deadline or the byte cap."""
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_passed(policy, resp.status)
        if conn.sock is not None:
            conn.sock.settimeout(min(policy.timeout_s, remaining))
        # read1: at most one read from the socket. read(n) would loop until n bytes came, so a server
        # trickling a byte at a time would hold it far past the deadline (FAULTS N2).
        block = resp.read1(65536)
        if not block:
            break
        chunks.append(block)
        size += len(block)
        if size > max_bytes:
            raise FetchError("too_large", f"body is over the cap of {max_bytes} bytes", resp.status)
    body = b"".join(chunks)
    if resp.length not in (None, 0) and not resp.chunked:
        raise http.client.IncompleteRead(body, resp.length)
    return body


def _decode(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo a Content-Encoding we did not ask for, never expanding past the byte cap."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise FetchError("not_an_image", f"unsupported Content-Encoding: {encoding}")
    inflater = zlib.decompressobj(31 if "gzip" in encoding else 15)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as e:
        raise FetchError("truncated", f"bad {encoding} body: {e}") from e
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise FetchError("too_large", f"{encoding} body expands past the cap of {max_bytes} bytes")
    return out
