"""The crawl's network layer. The address guard is tested on resolved addresses with a stub
resolver, never by connecting; the only live connections go to the loopback web, and the
loopback stand-ins (127.0.0.2, [::1]) listen so that any connection reaching them is seen."""

import email.utils
import random
import re
import socket
import threading
import time

import pytest

from pipeline.fetch import (
    ROBOTS_MAX_PATTERN,
    ROBOTS_MAX_RULES,
    AddressGuard,
    Fetcher,
    FetchError,
    FetchPolicy,
    Network,
    RobotsCache,
    RobotsPattern,
    RobotsRules,
    canonical_ip,
    parse_retry_after,
    x_robots_opt_out,
)

WEB_NET = ("127.0.1.0/24",)


@pytest.mark.parametrize(
    "host, ip",
    [
        ("2130706434", "127.0.0.2"),  # decimal
        ("0177.0.0.2", "127.0.0.2"),  # octal
        ("0x7f.0.0.2", "127.0.0.2"),  # hex
        ("127.2", "127.0.0.2"),  # short form
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.2", "::ffff:7f00:2"),
        ("10.0.0.1", "10.0.0.1"),
        ("example.com", None),
        ("1.2.3.4.5", None),
        ("127.0.0.1.example.com", None),
    ],
)
def test_numeric_host_spellings_are_canonicalised_without_a_resolver(host, ip):
    assert canonical_ip(host) == ip


REFUSED = [
    "127.0.0.1",
    "127.0.0.2",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fd00::1",
    "fe80::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:a00:1::1",  # 6to4 around 10.0.0.1
    "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    "::127.0.0.1",  # IPv4-compatible (deprecated) forms, judged by the IPv4 they carry
    "::a9fe:a9fe",  # 169.254.169.254
    "::10.0.0.1",
    "::ffff:0:127.0.0.1",  # IPv4-translated (RFC 2765)
    "::ffff:0:a9fe:a9fe",
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215), whatever it carries
    "64:ff9b:1::808:808",
    "fec0::1",  # deprecated site-local
    "fec0:1234::5",
]


@pytest.mark.parametrize("ip", REFUSED)
def test_guard_refuses_private_loopback_link_local_and_embedded_forms(ip):
    assert not AddressGuard().permits(ip)


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "::8.8.8.8", "::ffff:0:8.8.8.8"]
)
def test_guard_permits_public_unicast(ip):
    assert AddressGuard().permits(ip)  # a check only: nothing connects


def test_allow_list_admits_exactly_its_networks():
    guard = AddressGuard(WEB_NET)
    assert guard.permits("127.0.1.3") and guard.permits("::ffff:127.0.1.3")
    assert not guard.permits("127.0.0.2") and not guard.permits("::1") and not guard.permits("10.0.0.1")


def stub(answers: dict[str, list[str]], calls: list):
    def resolve(host, port):
        calls.append((host, port))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


def test_every_resolved_address_is_checked():
    calls = []
    net = Network(
        resolver=stub({"evil.example": ["93.184.216.34", "169.254.169.254"], "ok.example": ["93.184.216.34"]}, calls)
    )
    with pytest.raises(FetchError) as e:
        net.addresses("evil.example", 80)
    assert e.value.status == "refused_address" and "169.254.169.254" in str(e.value)
    assert net.addresses("ok.example", 443) == ["93.184.216.34"]
    assert calls == [("evil.example", 80), ("ok.example", 443)]


def test_dns_failures_and_offline_mode_never_call_the_resolver():
    calls = []
    net = Network(resolver=stub({}, calls))
    with pytest.raises(FetchError) as e:
        net.addresses("no-such-host.invalid", 80)
    assert e.value.status == "dns_error" and calls == [("no-such-host.invalid", 80)]
    offline = Network(
        dns=False, hosts={"images.example.test": "127.0.1.1"}, guard=AddressGuard(WEB_NET), resolver=stub({}, calls)
    )
    with pytest.raises(FetchError) as e:
        offline.addresses("anything.example", 80)
    assert e.value.status == "dns_error" and "lookups are off" in str(e.value)
    assert offline.addresses("Images.Example.Test", 80) == ["127.0.1.1"]
    with pytest.raises(FetchError) as e:
        offline.addresses("2130706434", 80)  # numeric: decoded here, no lookup, then refused
    assert e.value.status == "refused_address"
    assert len(calls) == 1


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["noindex, nofollow"], "noindex"),
        (["none"], "none"),
        (["nofollow", "noimageai"], "noimageai"),
        (["clipline: noai"], "noai"),
        (["CLIPLINE: noindex"], "noindex"),
        (["otherbot: noai", "clipline: nofollow"], None),
        (["otherbot: noai, noimageai"], None),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["max-image-preview: large, noai"], "noai"),
        (["nofollow, noarchive"], None),
        ([], None),
    ],
)
def test_x_robots_tag(values, expected):
    assert x_robots_opt_out(values, "clipline") == expected


ROBOTS = """
User-agent: otherbot
Disallow: /

User-agent: clipline
User-agent: somebot
Disallow: /private/
Allow: /private/public/
Disallow: /*.gif$
Allow: /tie
Disallow: /tie

User-agent: *
Disallow: /everything-for-others/
"""


@pytest.mark.parametrize(
    "path, allowed",
    [
        ("/img/a.jpg", True),
        ("/private/a.jpg", False),
        ("/private/public/a.jpg", True),  # longest match wins
        ("/pics/a.gif", False),
        ("/pics/a.gif?x=1", True),  # $ anchors the end
        ("/tie/a.jpg", True),  # equal length: allow wins
        ("/everything-for-others/a.jpg", True),  # the * group does not apply to clipline
        ("/robots.txt", True),
    ],
)
def test_robots_rfc9309_matching(path, allowed):
    assert RobotsRules.parse(ROBOTS, "clipline").allowed(path) is allowed


def regex_reference(pattern: str) -> re.Pattern:
    """RFC 9309 matching as a regex: right, but backtracking (fine for the short random cases here)."""
    anchored = pattern.endswith("$")
    body = re.escape(pattern[:-1] if anchored else pattern).replace(r"\*", ".*")
    return re.compile(body + ("$" if anchored else ""))


def test_robots_patterns_match_exactly_as_the_regex_reading():
    rng = random.Random(7)
    for _ in range(5000):
        pattern = "/" + "".join(rng.choice("ab/**.") for _ in range(rng.randint(0, 8))) + rng.choice(["", "$"])
        path = "/" + "".join(rng.choice("ab/.") for _ in range(rng.randint(0, 12)))
        assert RobotsPattern.parse(pattern).match(path) == bool(regex_reference(pattern).match(path)), (pattern, path)


@pytest.mark.timeout(10)  # the backtracking regex took 27 s and 7 s on the first two
@pytest.mark.parametrize(
    "pattern, path, matches",
    [
        ("/*a*a*a*a*a*a*b", "/" + "a" * 100, False),
        ("/**********~", "/" + "x" * 100, False),
        ("/" + "*a" * 500 + "*b$", "/" + "a" * 2000, False),
        ("/" + "*a" * 500 + "$", "/" + "a" * 2000, True),
    ],
)
def test_hostile_patterns_are_matched_in_linear_time(pattern, path, matches):
    rules = RobotsRules.parse(f"User-agent: *\nDisallow: {pattern}\n", "clipline")
    assert all(rules.allowed(path) is not matches for _ in range(200))


def test_rules_and_pattern_length_are_capped():
    text = "User-agent: *\n" + "".join(f"Disallow: /p{i}/\n" for i in range(ROBOTS_MAX_RULES + 500))
    text += "Disallow: /" + "x" * 10_000 + "\n"
    rules = RobotsRules.parse(text, "clipline")
    assert len(rules.rules) == ROBOTS_MAX_RULES and not rules.allowed(f"/p{ROBOTS_MAX_RULES - 1}/")
    assert rules.allowed(f"/p{ROBOTS_MAX_RULES}/")  # past the cap: not parsed
    long = RobotsRules.parse("User-agent: *\nDisallow: /" + "x" * 10_000 + "\n", "clipline")
    assert long.rules[0][0] == ROBOTS_MAX_PATTERN


def test_the_robots_cache_is_bounded_by_bytes_least_recently_used_out():
    rules = RobotsRules.parse("User-agent: *\nDisallow: /private/\n", "clipline")
    cache = RobotsCache(max_bytes=rules.size() * 10)
    for host in range(10):
        cache.put(("http", f"h{host}", 80, "clipline"), rules)
    assert cache.get(("http", "h0", 80, "clipline")) is not None  # h0 is now the most recently used
    for host in range(10, 15):
        cache.put(("http", f"h{host}", 80, "clipline"), rules)
    kept = {key[1] for key in cache.rules}
    assert kept == {"h0", *(f"h{h}" for h in range(6, 15))} and cache.bytes == rules.size() * 10


def test_robots_groups_fall_back_to_star_and_empty_means_allow():
    rules = RobotsRules.parse(ROBOTS, "unknownbot")
    assert not rules.allowed("/everything-for-others/x") and rules.allowed("/private/x")
    assert RobotsRules.parse("", "clipline").allowed("/anything")
    assert RobotsRules.parse("User-agent: *\nDisallow:\n", "clipline").allowed("/anything")
    assert not RobotsRules.parse("User-agent: CLIPLINE\nDisallow: /\n", "clipline").allowed("/x")


def test_retry_after_seconds_and_dates():
    assert parse_retry_after("7") == 7.0
    later = email.utils.format_datetime(email.utils.localtime(), usegmt=False)
    assert parse_retry_after(later) is not None and parse_retry_after(later) <= 1.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- live, against the loopback web -----------------------------------------------------------


@pytest.fixture
def stand_ins(web):
    """Listeners on the refused loopback stand-ins, at the web's port: they record any connection."""
    seen, socks = [], []
    for family, host in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, web.port))
        s.listen()
        s.settimeout(0.2)
        socks.append(s)
    stop = threading.Event()

    def accept(s):
        while not stop.is_set():
            try:
                conn, addr = s.accept()
                seen.append(addr)
                conn.close()
            except (TimeoutError, OSError):
                pass

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    yield seen
    stop.set()
    for t in threads:
        t.join()
    for s in socks:
        s.close()


def fetcher(**policy):
    network = Network(guard=AddressGuard(WEB_NET), dns=False, hosts={"images.example.test": "127.0.1.1"})
    return Fetcher(network, FetchPolicy(**{"timeout_s": 2.0, "deadline_s": 3.0, **policy}))


def fault_url(web, behaviour, host=None):
    rows = [r for r in web.truth().to_pylist() if r["behaviour"] == behaviour]
    url = rows[0]["url"]
    return url.replace("127.0.1.1", host) if host else url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:{port}/img/x.jpg",
        "http://[::1]:{port}/img/x.jpg",
        "http://2130706434:{port}/img/x.jpg",
        "http://0177.0.0.2:{port}/img/x.jpg",
        "http://127.2:{port}/img/x.jpg",
        "http://[::ffff:127.0.0.2]:{port}/img/x.jpg",
    ],
)
def test_refused_addresses_are_never_contacted(web, stand_ins, url):
    with pytest.raises(FetchError) as e:
        fetcher().get(url.format(port=web.port))
    assert e.value.status == "refused_address"
    assert stand_ins == []


@pytest.mark.parametrize("behaviour", ["redirect_private", "redirect_ipv6"])
def test_public_looking_url_redirecting_to_a_refused_address(web, stand_ins, behaviour):
    # images.example.test is pinned to the allowed web address (no DNS); its redirect is not.
    with pytest.raises(FetchError) as e:
        fetcher().get(fault_url(web, behaviour, host="images.example.test"))
    assert e.value.status == "refused_address"
    assert stand_ins == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.1.1/x.jpg", "gopher://127.0.1.1/1", "data:,x"])
def test_other_schemes_are_refused(url):
    with pytest.raises(FetchError) as e:
        fetcher().get(url)
    assert e.value.status == "refused_scheme"


def test_a_pinned_name_is_fetched_with_its_host_header(web):
    result = fetcher().get(fault_url(web, "xrobots_other_agent", host="images.example.test"))
    assert result.http_status == 200 and result.body[:3] == b"\xff\xd8\xff"


def test_total_deadline_stops_a_trickling_server(web):
    started = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetcher(deadline_s=1.5).get(fault_url(web, "slow"))
    assert e.value.status == "timeout"
    assert time.monotonic() - started < 4.0  # the server would trickle for 30 s


class SlowServer:
    """A raw HTTP server on a loopback address of the allow-listed net that answers every request in one
    slow or oversized way. Each answer stops after 20 s or when the client goes away (bounded)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.sock = socket.create_server(("127.0.1.9", 0))
        self.url = f"http://127.0.1.9:{self.sock.getsockname()[1]}/img.jpg"
        self.stop = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _trickle(self, conn, unit: bytes, head: bytes = b"", until: float = 20.0):
        conn.sendall(head)
        started = time.monotonic()
        while time.monotonic() - started < until and not self.stop.is_set():
            conn.sendall(unit)
            time.sleep(0.2)  # under the client's per-read timeout: only a total deadline stops it

    def _answer(self, conn):
        chunked = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n3\r\njpg\r\n0\r\n"
        try:
            conn.recv(65536)
            if self.mode == "status":
                self._trickle(conn, b"H")
            elif self.mode == "headers":
                self._trickle(conn, b"X-Pad: a\r\n", b"HTTP/1.1 200 OK\r\n")
            elif self.mode == "trailers":
                self._trickle(conn, b"X-Trailer: a\r\n", chunked)
            elif self.mode == "drain":
                self._trickle(conn, b"x", b"HTTP/1.1 404 Not Found\r\nContent-Length: 1000\r\n\r\n")
            elif self.mode == "silent":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
                self.stop.wait(20)
            elif self.mode == "many_trailers":
                conn.sendall(chunked + b"X-Trailer: a\r\n" * 1000 + b"\r\n")
            elif self.mode == "big_headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + (b"X-Pad: " + b"a" * 2000 + b"\r\n") * 50)  # 100 KB, 50 lines
                conn.sendall(b"Content-Length: 3\r\n\r\njpg")
            self.stop.wait(20)
        except OSError:
            pass  # the client hung up
        finally:
            conn.close()


@pytest.mark.timeout(15)  # each of these ran ~20 s (the server's own bound) under a 1.5 s deadline before
@pytest.mark.parametrize("mode", ["status", "headers", "trailers", "drain"])
def test_the_deadline_holds_for_the_whole_exchange(mode):
    with SlowServer(mode) as server:
        with pytest.raises(FetchError) as e:
            fetcher(timeout_s=0.5, deadline_s=1.5, robots_txt=False).get(server.url)
    assert e.value.status == "timeout" and str(e.value) == "the 1.5s deadline of the whole download passed"


@pytest.mark.timeout(15)
def test_the_timeout_message_says_which_limit_fired():
    with SlowServer("silent") as server:
        with pytest.raises(FetchError) as e:
            fetcher(timeout_s=0.5, deadline_s=5, robots_txt=False).get(server.url)
    assert e.value.status == "timeout" and str(e.value) == "no data for 0.5s (the per-read timeout)"


@pytest.mark.timeout(15)
@pytest.mark.parametrize("mode, message", [("many_trailers", "trailer lines"), ("big_headers", "headers over")])
def test_trailer_lines_and_header_bytes_are_capped(mode, message):
    with SlowServer(mode) as server:
        with pytest.raises(FetchError) as e:
            fetcher(timeout_s=2, deadline_s=5, robots_txt=False).get(server.url)
    assert e.value.status == "connection_error" and message in str(e.value)


def test_byte_caps_on_plain_and_compressed_bodies(web):
    for behaviour in ("endless", "gzip_bomb"):
        with pytest.raises(FetchError) as e:
            fetcher(max_bytes=1 << 20).get(fault_url(web, behaviour))
        assert e.value.status == "too_large", behaviour


def test_opt_out_is_decided_before_the_body(web):
    with pytest.raises(FetchError) as e:
        fetcher().get(fault_url(web, "xrobots_agent"))
    assert e.value.status == "opted_out" and str(e.value) == "X-Robots-Tag: noai"
    assert fetcher(x_robots_tag=False).get(fault_url(web, "xrobots_agent")).http_status == 200


def test_robots_txt_is_fetched_once_per_host_and_honoured(tmp_path):
    from pipeline.web import SyntheticWeb, WebSpec, generate

    with SyntheticWeb(generate(tmp_path / "w", WebSpec(images=30, heldout=0))) as w:
        f = fetcher()
        with pytest.raises(FetchError) as e:
            f.get(fault_url(w, "robots_disallowed"))
        assert e.value.status == "robots_disallowed"
        with pytest.raises(FetchError) as e:
            f.get(fault_url(w, "robots_5xx"))  # 5xx robots.txt: complete disallow
        assert e.value.status == "robots_disallowed"
        for row in [r for r in w.truth().to_pylist() if r["behaviour"] == "image"][:10]:
            f.get(row["url"])  # site 1 answers robots.txt with 404: everything allowed
        assert w.log.hits[(0, "/robots.txt")] == 1 and w.log.hits[(1, "/robots.txt")] == 1
        assert not any(p.startswith("/private/") for p in w.log.paths(0))
        with pytest.raises(FetchError) as e:
            f.get(fault_url(w, "refused"))  # robots.txt unreachable: the transport error, retryable
        assert e.value.status == "connection_error" and "robots.txt unreachable" in str(e.value)


def test_connections_are_reused_and_stale_ones_retried(web):
    f = fetcher()
    url = [r for r in web.truth().to_pylist() if r["behaviour"] == "image" and r["site"] == 2][0]["url"]
    assert f.get(url).http_status == 200
    pooled = sum(len(v) for v in f._pool.values())
    assert pooled >= 1
    for conns in f._pool.values():  # the server side goes away while idle
        for c in conns:
            c.sock.shutdown(socket.SHUT_RDWR)
    assert f.get(url).http_status == 200
