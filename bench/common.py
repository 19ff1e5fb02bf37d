"""What every benchmark shares: running one side in a subprocess with its peak RSS, and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_rss(pid: int, proportional: bool = False) -> int:
    """Resident memory of a process and all its descendants, in bytes.

    proportional: PSS instead of RSS, so pages shared between the processes (Ray's object
    store, forked workers) are counted once across the tree rather than once per process.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss if proportional else p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _sample_peaks(pid: int, stop, peaks) -> None:
    """Sample the tree under `pid` every 0.2 s until `stop` is set (in a process of its own): peak RSS,
    peak PSS (every 1 s), and the CPU seconds (user + system) of every process seen in it, each at its last
    sample (a process that exits between two samples loses at most 0.2 s; Ray workers come and go)."""
    import psutil

    peak, peak_pss, cpu, n = 0, 0, {}, 0
    while True:
        last, n = stop.is_set(), n + 1
        peak = max(peak, tree_rss(pid))
        if n % 5 == 1 or last:  # PSS reads every process's smaps: a second apart, not to take a core from the side
            peak_pss = max(peak_pss, tree_rss(pid, proportional=True))
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            try:
                times = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                cpu[key] = max(cpu.get(key, 0.0), times.user + times.system)
            except psutil.NoSuchProcess:
                pass
        if last:
            break
        stop.wait(0.2)
    peaks.put((peak, peak_pss, sum(cpu.values())))


def run_subprocess(script: str, args: list[str]) -> dict:
    """Run `python script args` (which prints one JSON line last); its report plus peak RSS of its tree.

    The sampler runs in a process of its own: reading every process's smaps for PSS holds the GIL for
    tens of milliseconds, and in the benchmark's own process it stalled what else runs there (the
    crawl benchmark's loopback web server: a third of clipline's crawl time at 1,500 images)."""
    import multiprocessing

    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    proc = subprocess.Popen(
        [sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    spawn = multiprocessing.get_context("spawn")
    stop, peaks = spawn.Event(), spawn.Queue()
    sampler = spawn.Process(target=_sample_peaks, args=(proc.pid, stop, peaks), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    peak, peak_pss, cpu = peaks.get(timeout=60)
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["peak_rss_mb"] = round(peak / 2**20, 1)
    report["peak_pss_mb"] = round(peak_pss / 2**20, 1)
    report["cpu_s"] = round(cpu, 2)  # the whole command's process tree, start-up included
    return report


def machine() -> dict:
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), None)
    return {
        "nproc": os.cpu_count(),
        "memory_mb": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def start_ray_warm(num_cpus: int = 2) -> None:
    """A local Ray instance whose workers have already imported the pipeline.

    A timed run then measures the work, not Ray's start and each worker's first imports
    (~0.5 s in all), just as the peers are timed after their own imports.
    """
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import pandas  # noqa: F401 - pyarrow imports it on first building arrays from numpy (0.2 s)

        import pipeline.dedup  # noqa: F401
        import pipeline.runner  # noqa: F401

        time.sleep(0.5)  # held, so that each task gets a worker of its own
        return os.getpid()

    pids = ray.get([warm.remote() for _ in range(num_cpus)])
    assert len(set(pids)) == num_cpus, pids


def realish_captions(per_language: int) -> list[str]:
    """Real translated sentences (Debian's gettext catalogues, 52 languages; up to `per_language` each) interleaved
    one for one with the synthetic web's captions in en/de/fr/es: the caption corpus of the text benchmarks."""
    import random

    from pipeline.web import gettext_corpus
    from pipeline.web.corpus import BACKGROUNDS, COLOURS, SHAPES, caption_for

    real = [text for text, _ in gettext_corpus.load(per_language=per_language)]
    rng = random.Random(0)
    languages, colours = ["en", "en", "de", "fr", "es"], list(COLOURS)
    web = [
        caption_for(
            rng, rng.choice(languages), rng.choice(colours), rng.choice(SHAPES), rng.choice(BACKGROUNDS), "centre"
        )  # fmt: skip
        for _ in range(len(real))
    ]
    return [c for pair in zip(real, web, strict=True) for c in pair]
