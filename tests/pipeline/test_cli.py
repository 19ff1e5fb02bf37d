"""The `clipline` command as users run it: real subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from pipeline.cli import DATA_STAGES, LATER, main
from tests.conftest import REPO


def clipline(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_command_of_the_design():
    result = clipline("--help")
    assert result.returncode == 0
    for command in ("demo", "run", *DATA_STAGES, "train", "eval", "submit", "web"):
        assert f"    {command}" in result.stdout


@pytest.mark.parametrize("command", ["demo", "run", "crawl", "web"])
def test_each_command_has_help(command):
    result = clipline(command, "--help")
    assert result.returncode == 0 and result.stdout.startswith(f"usage: clipline {command}")


@pytest.mark.parametrize("command", sorted(LATER))
def test_commands_not_built_yet_say_so_in_one_line(command):
    result = clipline(command)
    assert result.returncode == 3
    assert result.stderr == f"clipline: error: clipline {command} is not implemented yet (issue {LATER[command]})\n"


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime:\n  retries: 3\n")
    result = clipline("run", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"clipline: error: {bad}: unknown config key 'runtime.retries' "
        "(known here: address, executor, max_retries, num_cpus, progress)"
    ]
    result = clipline("run", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    result = clipline("run", "--set", "runtime.max_retries=lots")
    assert result.returncode == 2
    assert result.stderr == "clipline: error: runtime.max_retries: expected an integer, got 'lots'\n"


def test_print_config_applies_flags_and_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: slice\nruntime:\n  num_cpus: 2\n")
    result = clipline(
        "run",
        "--config",
        str(cfg),
        "--print-config",
        "--out",
        "s3://b/x",
        "--address",
        "ray://head:10001",
        "--set",
        "runtime.max_retries=4",
    )
    assert result.returncode == 0, result.stderr
    assert "name: slice\nout: s3://b/x\n" in result.stdout
    assert "address: ray://head:10001\n" in result.stdout and "max_retries: 4\n" in result.stdout
    assert "num_cpus: 2\n" in result.stdout


def test_unbuilt_command_is_named_with_its_issue():
    result = clipline("jobs", "list")
    assert result.returncode == 3
    assert (
        result.stderr == "clipline: error: clipline jobs is not implemented yet (issue #9 running on a Ray cluster)\n"
    )
    result = clipline("run", "--stage", "nonsense")
    assert result.returncode == 2 and "unknown stage 'nonsense'" in result.stderr


def test_demo_tiny_serves_the_web_and_says_what_it_did(tmp_path, capsys):
    assert main(["-q", "demo", "--size", "tiny", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"clipline demo (tiny): outputs in {tmp_path / 'out'}\n")
    assert "synthetic web: 407 URLs on 4 loopback sites" in printed
    assert "  crawl: 353 of 411 URLs fetched" in printed
    # The reasons' split can move by one between runs: uids include the web's (random) port, and the
    # lowest-uid tie-break then picks another keeper among equal copies. The totals do not move.
    assert "  dedup: 53 duplicates in 45 clusters (exact_bytes " in printed
    assert (tmp_path / "out" / "web" / "urls.parquet").exists()
    assert (tmp_path / "out" / "web" / "heldout" / "labels.parquet").exists()
    spec = json.loads((tmp_path / "out" / "web" / "spec.json").read_text())
    assert spec["images"] == 300
    # A second run reuses the generated web.
    mtime = (tmp_path / "out" / "web" / "catalog.parquet").stat().st_mtime_ns
    assert main(["-q", "demo", "--size", "tiny", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "web" / "catalog.parquet").stat().st_mtime_ns == mtime
