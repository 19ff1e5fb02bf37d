"""#9 on real components: a token-auth Ray head on loopback, jobs submitted with `clipline submit` that crawl
into the S3 endpoint, and a multi-node cluster losing a node mid-crawl."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.config import dump_config
from pipeline.manifest import read_manifest, verify
from pipeline.storage import open_storage
from tests.conftest import BUCKET, REPO, free_port
from tests.pipeline.test_crawl import assert_statuses, run_config

VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3):
    """`ray start --head` on loopback with token authentication; yields (job API URL, client env).

    The head starts with the S3 endpoint's credentials in its environment: the cluster's own
    credentials (an instance role, a mounted secret), which jobs use since submit sends no secrets."""
    token = secrets.token_hex(16)
    port, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{VENV_BIN}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    temp = tmp_path_factory.mktemp("ray-head")
    proc = subprocess.Popen(
        [
            f"{VENV_BIN}/ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            # Its own agent ports: the session's local Ray already holds the defaults (52365, ...), and a head
            # whose job agent cannot bind answers every submission with "No available agent".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while True:
        check = subprocess.run([sys.executable, "-m", "pipeline", "jobs", "list", "--address", address], env=env,
                               capture_output=True, text=True)  # fmt: skip
        if check.returncode == 0:
            break
        assert proc.poll() is None and time.time() < deadline, f"the Ray head did not come up: {check.stderr}"
        time.sleep(1)
    try:
        yield address, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)  # any straggler of this head only


def clipline(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


@pytest.mark.slow
def test_a_submitted_job_crawls_and_shards_into_the_s3_bucket(ray_head, s3, web, tmp_path):
    address, env = ray_head
    prefix = f"s3://{BUCKET}/submitted-{secrets.token_hex(4)}"
    config = run_config(prefix, web.root, shard_size=120)
    (tmp_path / "job").mkdir()
    data = yaml.safe_load(dump_config(config))
    data["stages"] = ["ingest", "crawl", "dedup", "filter", "shard"]
    data["runtime"]["progress"] = False
    (tmp_path / "job" / "run.yaml").write_text(yaml.safe_dump(data))
    done = clipline("submit", "--address", address, "--working-dir", str(tmp_path / "job"), "--",
                    "run", "--config", "run.yaml", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stderr and "shard/_manifest:" in done.stdout  # the job's own log, streamed
    assert "testing" not in done.stderr  # no secret value is ever printed
    assert "not sent (secrets;" in done.stderr and "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in done.stderr
    job_id = done.stderr.split("submitted ", 1)[1].split(":", 1)[0]
    # what Ray keeps in the job's info (in a client process with the head's token: this one runs auth-free Ray)
    read = "import json, sys; from ray.job_submission import JobSubmissionClient as C; " \
           "print(json.dumps(C(sys.argv[1]).get_job_info(sys.argv[2]).runtime_env['env_vars']))"  # fmt: skip
    info = subprocess.run([sys.executable, "-c", read, address, job_id], env=env, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr[-2000:]
    sent = json.loads(info.stdout.strip().splitlines()[-1])
    assert sent["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]  # settings travel, secrets do not
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(sent)
    store = open_storage(prefix)
    manifest = read_manifest(f"{prefix}/dataset/manifest.json")
    assert verify(manifest) == [] and manifest.data["num_samples"] > 200
    crawl = pl.concat([pl.from_arrow(store.read_parquet(n)) for n in store.list("crawl", suffix=".parquet")])
    assert crawl.height == crawl["uid"].n_unique() == 411  # every ingested row exactly one status row
    assert_statuses(crawl.to_arrow(), web)


def test_only_non_secret_settings_travel_unless_credentials_are_shipped(monkeypatch, capsys):
    from pipeline.submit import masked, passed_env, runtime_env, shown

    for name in [k for k in os.environ if k.startswith(("AWS_", "CLIPLINE_"))]:
        monkeypatch.delenv(name)
    env = {
        "AWS_ENDPOINT_URL": "https://minio.internal:9000",
        "AWS_REGION": "eu-west-1",
        "CLIPLINE_S3_ADDRESSING": "virtual",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "tok",
        "CLIPLINE_DB_PASSWD": "pw1",
        "CLIPLINE_GCS_CREDENTIALS": "{json}",
        "CLIPLINE_AUTH_HEADER": "Bearer x",
        "CLIPLINE_MIRROR": "https://user:hunter2@mirror.example/path",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sent, held = passed_env()
    assert sent == {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "CLIPLINE_S3_ADDRESSING")}
    assert held == sorted(set(env) - set(sent))
    assert runtime_env(None, None)["env_vars"] == sent
    assert runtime_env(None, None, ship_credentials=True)["env_vars"] == dict(sorted(env.items()))
    printed = shown(dict(sorted(env.items())))
    for secret in ("AKIAEXAMPLE", "s3cr3t", "tok", "pw1", "{json}", "Bearer", "hunter2"):
        assert secret not in printed
    assert "CLIPLINE_MIRROR=https://user:***@mirror.example/path" in printed and "AWS_REGION=eu-west-1" in printed
    assert masked("AWS_ENDPOINT_URL", "http://a:b@host:9000") == "http://a:***@host:9000"


@pytest.mark.slow
def test_no_wait_then_jobs_list_logs_and_stop(ray_head):
    address, env = ray_head
    done = clipline("submit", "--address", address, "--no-wait", "--", "web", "--help", env=env)
    assert done.returncode == 0
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    listed = clipline("jobs", "list", "--address", address, env=env)
    assert job_id in listed.stdout
    logs = clipline("jobs", "logs", job_id, "--address", address, "--follow", env=env)
    assert logs.returncode == 0 and "usage: clipline web" in logs.stdout
    stop = clipline("jobs", "stop", job_id, "--address", address, env=env)
    assert stop.returncode == 0 and json.loads(stop.stdout)["job"] == job_id


@pytest.mark.slow
def test_wrong_token_or_no_cluster_is_one_clear_line(ray_head):
    address, env = ray_head
    done = clipline("jobs", "list", "--address", address, env=dict(env, RAY_AUTH_TOKEN="not-the-token"))
    assert done.returncode == 2
    assert done.stderr.startswith(f"clipline: error: cannot reach the Ray job API at {address}: ")
    assert len(done.stderr.strip().splitlines()) == 1 and "nvalid authentication token" in done.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    done = clipline("jobs", "list", "--address", nobody, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


NODE_LOSS = r"""
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from pipeline.config import RunConfig
from pipeline.runner import run_pipeline
from pipeline.storage import open_storage
from tests.pipeline.test_crawl import INGEST_STAGES, STAGE, run_config
from pathlib import Path

out, web_root = sys.argv[1], Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
store = open_storage(out)
run = run_config(out, web_root, shard_size=60)
run_pipeline(list(INGEST_STAGES), store, run, progress=False)
killed = []
def kill_one():
    while not store.list("crawl/_committed"):
        time.sleep(0.1)
    cluster.remove_node(workers[0], allow_graceful=False)  # a node lost mid-stage, its running shard with it
    killed.append(time.time())
threading.Thread(target=kill_one, daemon=True).start()
report, = run_pipeline([STAGE], store, run, progress=False)
print(json.dumps({"killed": bool(killed), "planned": report.planned, "ran": len(report.ran)}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_lost_mid_crawl_and_the_job_still_completes(web, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", NODE_LOSS, str(out), str(web.root)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # raylet log lines can land on stdout after ours: take the result line itself
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"killed"')))
    assert result["killed"] and result["planned"] == result["ran"] > 2
    store = open_storage(out)
    crawl = pl.concat([pl.from_arrow(store.read_parquet(n)) for n in store.list("crawl", suffix=".parquet")])
    assert crawl.height == crawl["uid"].n_unique() == 411  # every ingested row exactly one status row
    assert_statuses(crawl.to_arrow(), web)
    assert len(store.list("crawl/_committed")) == result["planned"]  # no shard twice, none missing


@pytest.mark.slow
def test_ray_train_never_waits_in_silence(ray_head, tmp_path):
    """A 2-CPU head: 2 Ray Train workers (and the trainer's own CPU) can never be placed: one line, at once;
    1 worker trains, checkpoints and says what it trained."""
    from tests.training.helpers import make_dataset

    address, env = ray_head
    manifest = make_dataset(tmp_path / "data", [16, 16])
    train = ["train", "--data", str(manifest), "--set", "vocab_size=300", "--set", "context_length=16",
             "--set", "loader.batch_size=4", "--set", "loader.num_workers=0", "--set", "loader.image_size=32",
             "--set", "max_steps=3", "--set", "save_every=2", "--set", "progress=off"]  # fmt: skip
    started = time.time()
    done = clipline("submit", "--address", address, "--", *train, "--out", str(tmp_path / "two"),
                    "--ray-workers", "2", env=env, timeout=120)  # fmt: skip
    assert done.returncode != 0 and time.time() - started < 90
    message = "train: --ray-workers needs 3 CPU (1 CPU for Ray Train's trainer), the cluster has 2 CPU"
    assert message in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    done = clipline("submit", "--address", address, "--", *train, "--out", str(tmp_path / "one"),
                    "--ray-workers", "1", env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train: {'workers': 1, 'step': 3," in done.stdout
    pointer = json.loads((tmp_path / "one" / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == 3 and (tmp_path / "one" / pointer["checkpoint"]).exists()
    assert (tmp_path / "one" / "ray-train").is_dir()  # Ray Train's storage is the run's, not a driver temp dir


def test_resource_check_names_what_is_asked_and_what_is_there():
    from pipeline.errors import ClipError
    from pipeline.launch import check_resources, ray_needs

    assert ray_needs(8, use_gpu=True) == {"CPU": 9, "GPU": 8}
    assert check_resources({"CPU": 3}, {"CPU": 4.0}, wait=False) is None
    with pytest.raises(ClipError, match=r"needs 9 CPU, 8 GPU .* the cluster has 16 CPU, 4 GPU"):
        check_resources({"CPU": 9, "GPU": 8}, {"CPU": 16.0, "GPU": 4.0}, wait=False)
    assert "the cluster has 2 CPU" in check_resources({"CPU": 3}, {"CPU": 2.0}, wait=True)
