"""Shared fixtures: real local components only.

- `web`: the synthetic web (tiny corpus) served on loopback addresses 127.0.1.x;
- `s3`: moto's S3 server started as a real HTTP server in a subprocess on
  127.0.0.1, with a bucket, and the standard AWS env pointing at it;
- `ray_local`: one local Ray instance with 2 CPUs for the session (started
  after `s3` so its workers inherit the S3 env);
- `s3_store` / `local_store`: a fresh, empty location per test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "clipline-test"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def start_moto(env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 server as a subprocess on a free loopback port; returns (process, endpoint URL)."""
    port = free_port()
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_for_port("127.0.0.1", port, proc)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def web_root(tmp_path_factory) -> Path:
    from pipeline.web import SIZES, generate

    return generate(tmp_path_factory.mktemp("web"), SIZES["tiny"])


@pytest.fixture(scope="session")
def web(web_root):
    from pipeline.web import SyntheticWeb

    with SyntheticWeb(web_root) as served:
        yield served


@pytest.fixture(scope="session")
def s3():
    """A real S3 HTTP endpoint on loopback with bucket `clipline-test`; sets the AWS env for the session."""
    proc, endpoint = start_moto()
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3):
    import ray

    if ray.is_initialized():
        # Started earlier in this process (an in-process CLI test) before the S3 env existed:
        # its workers would not see the endpoint and keys. Start one that does.
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_store(s3, request):
    from pipeline.storage import open_storage

    return open_storage(f"s3://{BUCKET}/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def local_store(tmp_path):
    from pipeline.storage import open_storage

    return open_storage(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def store(request):
    """Each storage test runs against a local directory and the S3 endpoint."""
    return request.getfixturevalue(f"{request.param}_store")


class S3FaultProxy:
    """An HTTP proxy on loopback in front of the S3 endpoint that answers 503 SlowDown to the
    first `throttle` requests of each method, then forwards; counts what it saw."""

    SLOWDOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream: str, throttle: int):
        import http.server
        import threading
        from collections import Counter

        self.upstream = upstream.removeprefix("http://")
        self.throttle = throttle
        self.seen: Counter = Counter()
        self.throttled: Counter = Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                import http.client

                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen[self.command] += 1
                if proxy.throttled[self.command] < proxy.throttle:
                    proxy.throttled[self.command] += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(proxy.SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def crawled_web(tmp_path_factory, ray_local):
    """The tiny web crawled once on Ray into 4 shards (duplicates planted on other sites, so other shards).

    (store, truth): truth has url, image_id, dup_kind, language, label per URL. Tests copy the store.
    """
    import polars as pl

    from pipeline.storage import open_storage
    from pipeline.web import SIZES, SyntheticWeb, generate
    from tests.pipeline.test_crawl import crawl_all, run_config

    base = tmp_path_factory.mktemp("crawled-web")
    with SyntheticWeb(generate(base / "web", SIZES["tiny"])) as web:
        store = open_storage(base / "crawled")
        crawl_all(store, run_config(store.uri, web.root, shard_size=120))
        truth = pl.from_arrow(web.truth()).select(["url", "image_id", "dup_kind", "language", "label", "caption"])
    return store, truth
