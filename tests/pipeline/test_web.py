"""The synthetic web: what it generates, and that each fault is on the wire what it claims to be.

Only loopback is contacted: 127.0.1.x (the sites) and nothing else.
"""

import gzip
import hashlib
import http.client
import io
import socket
import struct
import time
import zlib
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.web import FAULT_BEHAVIOURS, SIZES, SyntheticWeb, WebSpec, generate
from pipeline.web.corpus import COLOURS, SHAPES


def entry(web, behaviour):
    rows = [r for r in web.truth().to_pylist() if r["behaviour"] == behaviour]
    assert rows, behaviour
    return rows[0]


def get(web, site, path, timeout=5.0):
    """One raw request; returns (status, headers list, body) or raises the transport error."""
    conn = http.client.HTTPConnection(f"127.0.1.{site + 1}", web.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "clipline-tests/1"})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def fetch(web, behaviour, timeout=5.0):
    e = entry(web, behaviour)
    return get(web, e["site"], e["path"], timeout)


def headers_named(headers, name):
    return [v for k, v in headers if k.lower() == name.lower()]


# --- corpus -------------------------------------------------------------------------------


def test_generation_is_deterministic_and_reused(tmp_path):
    spec = WebSpec(images=40, heldout=10)
    a, b = generate(tmp_path / "a", spec), generate(tmp_path / "b", spec)
    files_a = {p.name: p.read_bytes() for p in sorted((a / "files").iterdir())}
    files_b = {p.name: p.read_bytes() for p in sorted((b / "files").iterdir())}
    assert files_a == files_b
    assert pq.read_table(a / "catalog.parquet").equals(pq.read_table(b / "catalog.parquet"))
    mtime = (a / "catalog.parquet").stat().st_mtime_ns
    generate(a, spec)  # same spec: reused, not rewritten
    assert (a / "catalog.parquet").stat().st_mtime_ns == mtime
    other = generate(tmp_path / "c", replace(spec, seed=1))
    assert pq.read_table(other / "catalog.parquet")["caption"] != pq.read_table(a / "catalog.parquet")["caption"]


def test_captions_describe_the_image_they_belong_to(web_root):
    catalog = pq.read_table(web_root / "catalog.parquet").to_pylist()
    images = [r for r in catalog if r["behaviour"] == "image" and r["dup_kind"] is None]
    langs = Counter(r["language"] for r in images)
    assert set(langs) == {"en", "de", "fr", "es", None}
    english = [r for r in images if r["language"] == "en"]
    assert all(r["colour"] in r["caption"] and r["shape"] in r["caption"] for r in english)
    junk = [r for r in images if r["language"] is None]
    assert junk and all(r["colour"] not in r["caption"] for r in junk)
    # The colour is really in the pixels: the hue of the most saturated pixels is the class hue.
    for r in english[:20]:
        hsv = np.asarray(Image.open(web_root / "files" / r["file"]).convert("RGB").convert("HSV")).reshape(-1, 3)
        top = hsv[np.argsort(hsv[:, 1])[-50:]]
        hue = float(np.median(top[:, 0]))
        nearest = min(COLOURS, key=lambda c: hue_distance(hue, class_hue(c)))
        assert nearest == r["colour"], (r["file"], hue)


def class_hue(colour: str) -> float:
    """Hue of a class colour on PIL's 0-255 scale."""
    return float(np.asarray(Image.new("RGB", (1, 1), COLOURS[colour]).convert("HSV"))[0, 0, 0])


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 256
    return min(d, 256 - d)


def test_planted_duplicates_span_sites(web_root):
    catalog = pq.read_table(web_root / "catalog.parquet").to_pylist()
    originals = {
        r["image_id"]: r for r in catalog if r["behaviour"] in ("image", "robots_disallowed") and r["dup_kind"] is None
    }
    exact = [r for r in catalog if r["dup_kind"] == "exact"]
    near = [r for r in catalog if r["dup_kind"] == "near"]
    assert len(exact) >= 5 and len(near) >= 5
    for r in exact:
        o = originals[r["image_id"]]
        assert r["file"] == o["file"] and r["site"] != o["site"]
    for r in near:
        o = originals[r["image_id"]]
        assert r["file"] != o["file"] and r["site"] != o["site"]
        a = (web_root / "files" / r["file"]).read_bytes()
        assert a != (web_root / "files" / o["file"]).read_bytes()


def test_heldout_split_is_balanced_image_folder(web_root):
    labels = pq.read_table(web_root / "heldout" / "labels.parquet").to_pylist()
    assert len(labels) == SIZES["tiny"].heldout
    counts = Counter(r["label"] for r in labels)
    assert len(counts) == len(COLOURS) * len(SHAPES) and max(counts.values()) - min(counts.values()) <= 1
    for r in labels[:10]:
        assert r["file"].split("/")[0] == r["label"].replace(" ", "_")
        assert Image.open(web_root / "heldout" / r["file"]).format == "JPEG"


def test_url_list_has_laion_columns_and_metadata_faults(web):
    urls = pq.read_table(web.url_list)
    assert urls.column_names == ["url", "caption"]
    truth = web.truth()
    assert urls.num_rows == truth.num_rows + 6
    assert urls["url"].null_count == 1
    captions = urls["caption"].to_pylist()
    assert "" in captions and any(len(c or "") == 1 << 20 for c in captions)
    assert any("\x00" in (c or "") for c in captions)
    every = set(truth["url"].to_pylist())
    assert all(e["expected_status"] in ("success",) or e["behaviour"] != "image" for e in truth.to_pylist())
    assert len(every) == truth.num_rows  # one truth row per distinct URL
    assert set(truth["expected_status"].to_pylist()) >= set(FAULT_BEHAVIOURS.values())


# --- serving ---------------------------------------------------------------------------------


def test_images_are_served_per_site_with_their_bytes(web, web_root):
    images = [r for r in web.truth().to_pylist() if r["behaviour"] == "image"][:15]
    for r in images:
        status, headers, body = get(web, r["site"], r["path"])
        assert status == 200 and body == (web_root / "files" / r["file"]).read_bytes()
        assert headers_named(headers, "Content-Type") == [r["content_type"]]
        other = (r["site"] + 1) % 3
        assert get(web, other, r["path"])[0] == 404  # each site serves only its own paths


def test_robots_txt_per_site(web):
    status, _, body = get(web, 0, "/robots.txt")
    assert status == 200 and b"Disallow: /private/" in body
    assert get(web, 1, "/robots.txt")[0] == 404
    assert get(web, 2, "/robots.txt")[0] == 200
    assert get(web, web.robots_5xx_site, "/robots.txt")[0] == 503
    assert entry(web, "robots_5xx")["site"] == web.robots_5xx_site
    assert entry(web, "robots_disallowed")["path"].startswith("/private/")


@pytest.mark.parametrize("code", [404, 410, 451, 500, 503, 429])
def test_status_faults(web, code):
    assert fetch(web, f"status_{code}")[0] == code


@pytest.mark.parametrize("behaviour", ["flaky_429", "flaky_503"])
def test_flaky_faults_fail_once_then_serve(tmp_path, behaviour):
    root = generate(tmp_path / "w", WebSpec(images=6, heldout=0))
    with SyntheticWeb(root) as w:
        status, headers, _ = fetch(w, behaviour)
        assert status == int(behaviour[-3:])
        if behaviour == "flaky_429":
            assert headers_named(headers, "Retry-After") == ["1"]
        status, _, body = fetch(w, behaviour)
        assert status == 200 and Image.open(io.BytesIO(body)).size == (160, 120)


def test_connection_reset_mid_body(web):
    with pytest.raises(ConnectionResetError):
        fetch(web, "reset")


def test_refused_port_refuses(web):
    e = entry(web, "refused")
    host, port = e["url"].split("/")[2].split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2)


def test_short_body_and_cut_chunked_body(web):
    with pytest.raises(http.client.IncompleteRead):
        fetch(web, "short_body")
    with pytest.raises(http.client.IncompleteRead):
        fetch(web, "chunked_cut")


def test_slow_body_trickles_under_any_per_read_timeout(web):
    """N2: bytes keep coming, a few per second, so only a total deadline stops the download."""
    e = entry(web, "slow")
    with socket.create_connection((f"127.0.1.{e['site'] + 1}", web.port), timeout=1.0) as sock:
        sock.sendall(f"GET {e['path']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received, deadline = b"", time.time() + 2.0
        while time.time() < deadline:
            received += sock.recv(65536)  # never times out: a byte arrives every 0.25 s
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    assert 2 <= len(body) <= 12 and length > 1000


def test_endless_body_has_no_length_and_keeps_coming(web):
    e = entry(web, "endless")
    conn = http.client.HTTPConnection(f"127.0.1.{e['site'] + 1}", web.port, timeout=5)
    conn.request("GET", e["path"])
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") is None
    assert len(resp.read(8 << 20)) == 8 << 20
    conn.close()


def test_gzip_bomb_expands_far_beyond_its_size(web):
    status, headers, body = fetch(web, "gzip_bomb")
    assert status == 200 and headers_named(headers, "Content-Encoding") == ["gzip"]
    assert len(body) < 1 << 20
    expanded = zlib.decompressobj(31).decompress(body, 64 << 20)
    assert len(expanded) == 64 << 20  # and more where that came from
    assert gzip.decompress(body)[:4] == b"\x00\x00\x00\x00"


def test_redirects(web):
    status, headers, _ = fetch(web, "redirect_ok")
    assert status == 301 and headers_named(headers, "Location")[0].endswith("/fault/xrobots_other_agent.jpg")
    loc = headers_named(fetch(web, "redirect_loop")[1], "Location")[0]
    assert loc.endswith("/r/loop/0")
    assert headers_named(get(web, 0, "/r/loop/0")[1], "Location")[0].endswith("/r/loop/1")
    assert headers_named(get(web, 0, "/r/loop/1")[1], "Location")[0].endswith("/r/loop/0")
    assert headers_named(get(web, 0, "/r/many/7")[1], "Location")[0].endswith("/r/many/8")
    assert headers_named(fetch(web, "redirect_scheme")[1], "Location") == ["file:///etc/passwd"]
    assert headers_named(fetch(web, "redirect_private")[1], "Location") == [
        f"http://127.0.0.2:{web.port}/img/stand-in.jpg"
    ]
    assert headers_named(fetch(web, "redirect_ipv6")[1], "Location") == [f"http://[::1]:{web.port}/img/stand-in.jpg"]


@pytest.mark.parametrize(
    "behaviour, values",
    [
        ("xrobots_noai", ["noai"]),
        ("xrobots_noimageai", ["noimageai"]),
        ("xrobots_noindex", ["noindex"]),
        ("xrobots_noimageindex", ["noimageindex"]),
        ("xrobots_combined", ["nofollow, NoAI, noarchive"]),
        ("xrobots_repeated", ["nofollow", "noimageai"]),
        ("xrobots_agent", ["otherbot: noindex", "clipline: noai"]),
        ("xrobots_other_agent", ["otherbot: noai, noimageai"]),
    ],
)
def test_x_robots_tag_headers(web, behaviour, values):
    status, headers, body = fetch(web, behaviour)
    assert status == 200 and headers_named(headers, "X-Robots-Tag") == values and len(body) > 0


def test_bad_and_awkward_image_files(web):
    def body(behaviour):
        return fetch(web, behaviour)[2]

    assert body("zero_bytes") == b""
    assert body("html_as_jpeg").startswith(b"<!DOCTYPE html>")
    assert body("svg_as_jpeg").startswith(b"<?xml")
    bomb = body("png_bomb")
    assert bomb[12:16] == b"IHDR" and struct.unpack(">II", bomb[16:24]) == (60000, 60000) and len(bomb) < 2000
    with pytest.raises(Image.DecompressionBombError):  # Pillow's own guard agrees
        Image.open(io.BytesIO(body("jpeg_bomb")))
    assert Image.open(io.BytesIO(body("tiff"))).format == "TIFF"
    assert body("psd").startswith(b"8BPS") and body("eps").startswith(b"%!PS-Adobe")
    assert body("bmp").startswith(b"BM")
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body("truncated_jpeg"))).load()
    assert Image.open(io.BytesIO(body("tiny_image"))).size == (8, 8)
    assert Image.open(io.BytesIO(body("extreme_aspect"))).size == (2400, 40)
    assert Image.open(io.BytesIO(body("cmyk_jpeg"))).mode == "CMYK"
    assert Image.open(io.BytesIO(body("png_16bit"))).mode.startswith("I")
    pal = Image.open(io.BytesIO(body("palette_alpha")))
    assert pal.mode == "P" and "transparency" in pal.info
    assert Image.open(io.BytesIO(body("animated_gif"))).n_frames == 3
    assert Image.open(io.BytesIO(body("animated_webp"))).n_frames == 3
    rotated = Image.open(io.BytesIO(body("exif_rotated")))
    assert rotated.getexif()[0x0112] == 6 and rotated.size == (120, 160)


def test_request_log_tracks_paths_agents_and_concurrency(tmp_path):
    root = generate(tmp_path / "w", WebSpec(images=6, heldout=0, faults=False))
    with SyntheticWeb(root) as w:
        assert w.robots_5xx_site == -1 and w.sites == 3
        image = [r for r in w.truth().to_pylist() if r["behaviour"] == "image"][0]
        get(w, image["site"], image["path"])
        get(w, image["site"], image["path"])
        assert w.log.hits[(image["site"], image["path"])] == 2
        assert w.log.paths(image["site"]) == [image["path"]] * 2
        assert w.log.requests[0][2] == "clipline-tests/1"
        # One after another, requests never overlap: the server counts each one out before its
        # response can reach the client (counted out after the write, 500 in a row raced to 2 in each of 3 runs).
        for _ in range(500):
            get(w, image["site"], image["path"])
        assert w.log.hits[(image["site"], image["path"])] == 502
        assert w.log.max_inflight[image["site"]] == 1


def test_blocklists_name_real_hashes(web, web_root):
    truth = web.truth()
    images = truth.filter(pc.equal(truth["behaviour"], "image")).to_pylist()
    url_hash = (web_root / "blocklist_url_sha256.txt").read_text().split()
    assert url_hash == [hashlib.sha256(images[1]["url"].encode()).hexdigest()]
    byte_hash = (web_root / "blocklist_image_sha256.txt").read_text().split()
    assert byte_hash == [hashlib.sha256((web_root / "files" / images[2]["file"]).read_bytes()).hexdigest()]
