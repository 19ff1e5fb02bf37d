"""`clipline submit` and `clipline jobs`: any clipline command as a Ray job on a cluster, through the job API.

The job runs ``python -m pipeline <command...>`` on the cluster. The non-secret
object-store settings of this shell (``AWS_*`` and ``CLIPLINE_*``: endpoint,
region, addressing, retries) travel in the job's runtime env, so the job reads
and writes the same S3 endpoint. Secrets (keys, session tokens, passwords,
a URL with a password in it) do not: Ray keeps a job's runtime env in its job
info, shown by the dashboard and written to logs, so by default the cluster uses
its own credentials (instance roles, a mounted secret). ``--ship-credentials``
sends them anyway and says so. Nothing printed shows a secret value. Ray token
authentication works as for the ray CLI: with
``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``, the client sends it with every request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import yaml

from pipeline.errors import ClipError

PASSED_ENV_PREFIXES = ("AWS_", "CLIPLINE_")
SECRET_MARKERS = ("PASS", "SECRET", "TOKEN", "CRED", "AUTH", "KEY")  # in a variable's name: a secret
URL_PASSWORD = re.compile(r"(?P<user>[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^@/\s]*@", re.IGNORECASE)
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


class SubmitError(ClipError):
    """The cluster cannot be reached or refused the job."""


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection refused, 401, DNS: all one line for the user
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "401" in message or "nauthorized" in message:
            message += " (token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or run `ray get-auth-token`)"
        raise SubmitError(f"cannot reach the Ray job API at {address}: {message[:300]}") from e


def is_secret(name: str, value: str) -> bool:
    """A credential by its name (PASS, SECRET, TOKEN, CRED, AUTH, KEY in it) or a URL value with a password."""
    return any(m in name.upper() for m in SECRET_MARKERS) or bool(URL_PASSWORD.search(value))


def masked(name: str, value: str) -> str:
    """How a variable may be printed: a secret name's value hidden, passwords inside URLs hidden."""
    if any(m in name.upper() for m in SECRET_MARKERS):
        return "***"
    return URL_PASSWORD.sub(r"\g<user>***@", value)


def passed_env(ship_credentials: bool = False) -> tuple[dict[str, str], list[str]]:
    """The AWS_* and CLIPLINE_* variables of this shell to send with the job, and the names held back as secrets."""
    found = {k: v for k, v in sorted(os.environ.items()) if k.startswith(PASSED_ENV_PREFIXES)}
    held = [k for k, v in found.items() if is_secret(k, v) and not ship_credentials]
    return {k: v for k, v in found.items() if k not in held}, held


def shown(env: dict[str, str]) -> str:
    return ", ".join(f"{k}={masked(k, v)}" for k, v in env.items())


def runtime_env(working_dir: str | None, runtime_env_file: str | None, ship_credentials: bool = False) -> dict:
    env: dict = {}
    if runtime_env_file:
        try:
            env = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ClipError(f"{runtime_env_file}: cannot read the runtime env ({e.__class__.__name__})") from e
        if not isinstance(env, dict):
            raise ClipError(f"{runtime_env_file}: expected a mapping")
    if working_dir:
        if not Path(working_dir).is_dir():
            raise ClipError(f"--working-dir {working_dir}: not a directory")
        env["working_dir"] = working_dir
    env["env_vars"] = {**passed_env(ship_credentials)[0], **env.get("env_vars", {})}
    return env


def submit(address: str, command: list[str], working_dir=None, runtime_env_file=None, wait: bool = True,
           entrypoint_num_cpus: float = 1, ship_credentials: bool = False) -> int:  # fmt: skip
    """Submit `clipline <command>`; with `wait`, stream its logs and return its exit status."""
    if not command:
        raise ClipError("submit: give the clipline command after --, e.g. -- run --config run.yaml")
    jobs = client(address)
    env = runtime_env(working_dir, runtime_env_file, ship_credentials)
    held = passed_env(ship_credentials)[1]
    secrets = [k for k, v in env["env_vars"].items() if is_secret(k, v)]
    entrypoint = "python -m pipeline " + shlex.join(command)
    job_id = _submit_with_retry(jobs, entrypoint, env, entrypoint_num_cpus)
    print(f"submitted {job_id}: {entrypoint}", file=sys.stderr)
    if env["env_vars"]:
        print(f"  env: {shown(env['env_vars'])}", file=sys.stderr)
    if held:
        print(f"  not sent (secrets; the cluster uses its own credentials, --ship-credentials sends them): "
              f"{', '.join(held)}", file=sys.stderr)  # fmt: skip
    if secrets:
        print(f"  sent secrets: {', '.join(secrets)}: Ray keeps them in the job's info, shown by its dashboard",
              file=sys.stderr)  # fmt: skip
    if not wait:
        print(job_id)
        return 0
    return follow(jobs, job_id)


def _submit_with_retry(jobs, entrypoint: str, env: dict, cpus: float, wait_s: float = 90.0) -> str:
    """submit_job, retried while a freshly started head has no job agent yet (Ray answers 500 then)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return jobs.submit_job(entrypoint=entrypoint, runtime_env=env, entrypoint_num_cpus=cpus)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise SubmitError(f"the cluster refused the job: {str(e).strip().splitlines()[0][:300]}") from e
            time.sleep(2)


def follow(jobs, job_id: str) -> int:
    """Stream a job's logs until it ends; its exit status (0 succeeded, 1 failed, 130 stopped)."""

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the log stream can drop; the status below still decides
        pass
    status = str(jobs.get_job_status(job_id))
    while status not in EXIT:
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    print(f"job {job_id}: {status}", file=sys.stderr)
    return EXIT[status]


def jobs_command(address: str, action: str, job_id: str | None, follow_logs: bool = False) -> int:
    jobs = client(address)
    if action == "list":
        for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((job.start_time or 0) / 1000))
            print(f"{job.submission_id or job.job_id}  {str(job.status):10} {started}  {job.entrypoint}")
        return 0
    if not job_id:
        raise ClipError(f"jobs {action}: give a job id (see `clipline jobs list`)")
    if action == "logs":
        if follow_logs:
            return follow(jobs, job_id)
        sys.stdout.write(jobs.get_job_logs(job_id))
        return 0
    if action == "stop":
        stopped = jobs.stop_job(job_id)
        print(json.dumps({"job": job_id, "stop_requested": bool(stopped)}))
        return 0
    raise ClipError(f"jobs: unknown action '{action}' (list, logs, stop)")
