"""OpenAI CLIP tokenizer benchmark: clipline's (BPE in Rust through `tokenizers`, batched) vs OpenAI's own
(pure Python, as shipped in the open-clip-torch wheel), on the same captions.

Captions: real translated sentences from Debian's gettext catalogues (52 languages,
unicode of every script) mixed with the synthetic web's captions. Both sides must
give identical ids (checked on every caption); the figure is captions per second on
one core, sides alternated A B B A, medians of the repeats. The reference's BPE
cache is cleared before each of its runs, so both start cold.

    python bench/tokenizer.py --quick     # ~5,000 captions
    python bench/tokenizer.py             # ~20,000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, realish_captions  # noqa: E402


def reference():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("open-clip-torch is not installed: pip install --no-deps open-clip-torch==3.3.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_reference_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="ABBA rounds")
    args = parser.parse_args()
    import torch

    from training.tokenizer import Tokenizer

    torch.set_num_threads(1)
    texts = realish_captions(50 if args.quick else 200)
    ours = Tokenizer.openai()
    Reference = reference()

    def run_ours():
        return ours(texts)

    def run_reference():
        return Reference()(texts)  # a fresh instance: an empty BPE cache, as ours starts with

    same = bool(torch.equal(run_ours(), run_reference()))
    times: dict[str, list[float]] = {"clipline": [], "openai-reference": []}
    sides = {"clipline": run_ours, "openai-reference": run_reference}
    for _ in range(args.repeats):
        for name in ("clipline", "openai-reference", "openai-reference", "clipline"):
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    rate = {k: len(texts) / statistics.median(v) for k, v in times.items()}
    report = {
        "captions": len(texts),
        "identical_ids": same,
        "captions_per_s": {k: round(v) for k, v in rate.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio": round(rate["clipline"] / rate["openai-reference"], 2),
        "machine": machine(),
    }
    out = REPO / "bench" / "results" / "tokenizer.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("captions", "identical_ids", "captions_per_s", "ratio")}))


if __name__ == "__main__":
    main()
