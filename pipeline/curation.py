"""CLIP's own curation, as MetaCLIP published it: metadata matching, global counts, balanced sampling.

CLIP's 400M pairs are the pairs whose text contains one of 500,000 queries,
kept up to about 20,000 per query. MetaCLIP ("Demystifying CLIP Data", Xu et
al. 2023) wrote the algorithm down:

1. **match**: for each caption, the ids of the metadata entries it contains.
   Matching is MetaCLIP's substring matching on token boundaries: the caption
   is padded with a space on each side, the punctuation ``, . ; : ? ! ` `` is
   wrapped in spaces and tabs and newlines become spaces; an entry matches when
   `" " + entry + " "` occurs in it. Case-sensitive, as MetaCLIP's
   (``metadata_ignore_case`` lower-cases both sides). An entry occurs there
   exactly when it is a run of the spaced caption's tokens, so every entry is
   found, overlapping ones and prefixes of others included, by walking the
   entries' token prefixes with hash joins (`match`).
2. **count**: how many pool rows match each entry, over every shard (a
   partitioned map-reduce: no task holds more than its share of the entries).
3. **balance**: a row is kept with probability ``min(1, t / count(entry))``
   for each entry it matches, independently, and kept if any entry keeps it.
   The draw is a hash of (uid, entry id), so a rerun or a resume keeps the
   same rows. Drop reasons ``no_metadata_match`` and ``balanced_out``.

Metadata files hold one entry per line, UTF-8 (MetaCLIP's published
``metadata.json`` converted to lines works as is). `build_metadata` makes a
CLIP-style list offline from WordNet and a text corpus.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.errors import ConfigError

PUNCTUATION = ",.;:?!`"
POOL = -1  # the entry id under which a count file carries the number of rows in the pool


@functools.lru_cache(maxsize=4)
def load_metadata(location: str) -> tuple[str, ...]:
    """The entries of a metadata file (local or s3://), one a line, first occurrence kept, blanks skipped."""
    from pipeline.storage import StorageError, split_location

    store, rel = split_location(location)
    try:
        raw = store.read_bytes(rel)
    except StorageError as e:
        raise ConfigError(f"filter.metadata: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"filter.metadata: {location} is not UTF-8 (byte {e.start})") from None
    entries = tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not entries:
        raise ConfigError(f"filter.metadata: {location} holds no entries")
    return entries


def spaced(text: pl.Expr, ignore_case: bool = False) -> pl.Expr:
    """MetaCLIP's spacing of a caption: ' ' + text + ' ', punctuation wrapped in spaces, tabs and newlines as spaces."""
    text = text.fill_null("").str.replace_all(f"([{re.escape(PUNCTUATION)}])", " $1 ").str.replace_all(r"[\t\n\r]", " ")
    text = pl.concat_str([pl.lit(" "), text, pl.lit(" ")])
    return text.str.to_lowercase() if ignore_case else text


@functools.lru_cache(maxsize=4)
def _index(entries: tuple[str, ...], ignore_case: bool) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(entry -> id, every proper token prefix of a multi-token entry, the longest entry in tokens), built once per
    process and list: the lookups every shard's matching joins against."""
    keys = [e.lower() if ignore_case else e for e in entries]
    lut = pl.DataFrame({"gram": keys, "id": pl.int_range(len(keys), eager=True, dtype=pl.Int32)})
    lut = lut.unique("gram", keep="first", maintain_order=True)  # equal after lower-casing: the first one's id
    tokens = lut["gram"].str.split(" ")
    longest = int(tokens.list.len().max() or 1)
    prefixes = [tokens.list.slice(0, n).list.join(" ").filter(tokens.list.len() > n) for n in range(1, longest)]
    prefix = pl.concat(prefixes).unique().to_frame("gram") if prefixes else pl.DataFrame(schema={"gram": pl.Utf8})
    return lut, prefix, longest


def match(captions: pl.Series, entries: tuple[str, ...], ignore_case: bool = False) -> pl.Series:
    """Per caption, the sorted ids of the entries it contains: list[int32] (empty when none).

    `" " + entry + " "` occurs in the spaced caption exactly when the entry is a run of the caption's
    space-separated tokens joined by single spaces, so matching walks down the entries' token
    prefixes: every token of every caption is looked up, then extended by the next token while the
    run is still the prefix of some entry. Each step is one hash join against tables built once per
    list and process; an automaton (polars' extract_many) is rebuilt on every call: 1.5 s a shard
    at 500,000 entries.
    """
    lut, prefix, longest = _index(entries, ignore_case)
    text = pl.DataFrame({"caption": captions.cast(pl.Utf8)}).select(
        spaced(pl.col("caption"), ignore_case).alias("caption")
    )
    split = text["caption"].str.split(" ")
    lengths = split.list.len().to_numpy()
    token = split.explode()  # every caption's tokens, one flat column
    row = np.repeat(np.arange(len(captions), dtype=np.int64), lengths)  # each token's caption
    alive = pl.DataFrame({"at": np.arange(len(token), dtype=np.int64), "gram": token})  # runs ending at token `at`
    found_rows, found_ids = [], []
    for n in range(1, longest + 1):
        if n > 1:  # extend each run by the next token of its own caption
            nxt = alive["at"].to_numpy() + 1
            same = nxt < len(row)
            same[same] = row[nxt[same]] == row[nxt[same] - 1]
            nxt = nxt[same]
            alive = pl.DataFrame({"at": nxt, "gram": alive["gram"].filter(same) + " " + token.gather(nxt)})
        hits = alive.join(lut, on="gram", how="inner")
        found_rows.append(row[hits["at"].to_numpy()])
        found_ids.append(hits["id"].to_numpy())
        if n < longest:
            alive = alive.join(prefix, on="gram", how="semi")
        if alive.height == 0:
            break
    # (row, id) pairs, unique and sorted, as one list per caption
    pairs = np.sort(np.concatenate(found_rows) << 32 | np.concatenate(found_ids).astype(np.int64))
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if len(pairs) else pairs  # np.unique: 50x slower
    offsets = np.searchsorted(pairs >> 32, np.arange(len(captions) + 1))
    ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array((pairs & 0xFFFFFFFF).astype(np.int32)))
    return pl.Series("metadata_ids", ids)


def entry_counts(ids: pl.Series) -> pl.DataFrame:
    """(entry, count) over the rows of `ids` (each row counts once per entry), plus the POOL row: the row count."""
    counts = (
        pl.DataFrame({"entry": ids}).explode("entry").drop_nulls().group_by("entry").len(name="count")
        .with_columns(pl.col("entry").cast(pl.Int32), pl.col("count").cast(pl.Int64))
    )  # fmt: skip
    pool = pl.DataFrame({"entry": [POOL], "count": [len(ids)]}, schema={"entry": pl.Int32, "count": pl.Int64})
    return pl.concat([pool, counts]).sort("entry")


def threshold(balance: float, pool: int) -> float:
    """t: an absolute count (>= 1), or a fraction of the pool (0 < balance < 1)."""
    return balance if balance >= 1 else max(1.0, balance * pool)


def uid_keys(uids: pl.Series) -> np.ndarray:
    """60 bits of each uid (32 hex digits, themselves a hash) as uint64: the seed of its draws."""
    return uids.str.slice(0, 15).str.to_integer(base=16).cast(pl.UInt64).to_numpy()


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit moves every output bit (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def draws(uids: pl.Series, entries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per (row, entry) pair, from the row's uid and the entry id alone."""
    keys = uid_keys(uids)[rows]
    with np.errstate(over="ignore"):
        mixed = _mix(keys ^ _mix(entries.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def balanced(uids: pl.Series, ids: pl.Series, counts: np.ndarray, t: float) -> np.ndarray:
    """Per row: kept by at least one of its entries, each keeping it with probability min(1, t / count)."""
    lengths = ids.list.len().fill_null(0).to_numpy()
    rows = np.repeat(np.arange(len(ids)), lengths)
    if rows.size == 0:
        return np.zeros(len(ids), dtype=bool)
    entries = ids.explode().drop_nulls().to_numpy().astype(np.int64)
    probability = np.minimum(1.0, t / np.maximum(counts[entries], 1))
    hit = draws(uids, entries, rows) < probability
    keep = np.zeros(len(ids), dtype=bool)
    np.logical_or.at(keep, rows[hit], True)
    return keep


# --- building a CLIP-style list offline ------------------------------------------------------------

WORDNET_INDEXES = ("index.noun", "index.verb", "index.adj", "index.adv")
WORD = re.compile(r"[^\W\d_][\w'-]*")


def wordnet_lemmas(root: str | Path) -> list[str]:
    """Every lemma of WordNet's index files (Debian's wordnet-base: /usr/share/wordnet), '_' read as a space."""
    root = Path(root)
    found = [root / n for n in WORDNET_INDEXES if (root / n).exists()]
    if not found:
        raise ConfigError(f"metadata: no WordNet index files ({', '.join(WORDNET_INDEXES)}) in {root}")
    lemmas = []
    for path in found:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line and not line.startswith(" "):  # the licence header lines start with two spaces
                lemmas.append(line.split(" ", 1)[0].replace("_", " "))
    return lemmas


def corpus_terms(lines, min_count: int = 100, bigram_min_count: int = 30, min_pmi: float = 3.0):
    """(frequent words, high-PMI bigrams) of a text corpus, as CLIP's queries: words seen at least `min_count`
    times, and bigrams seen `bigram_min_count` times whose pointwise mutual information is at least `min_pmi`."""
    words, pairs, total = Counter(), Counter(), 0
    for line in lines:
        tokens = WORD.findall(line.lower())
        words.update(tokens)
        pairs.update(zip(tokens, tokens[1:], strict=False))
        total += len(tokens)
    frequent = sorted(w for w, n in words.items() if n >= min_count)
    bigrams = []
    for (a, b), n in pairs.items():
        if n >= bigram_min_count:
            pmi = math.log(n * total / (words[a] * words[b]))
            if pmi >= min_pmi:
                bigrams.append(f"{a} {b}")
    return frequent, sorted(bigrams)


def build_metadata(wordnet: str | None, corpora: list[str], min_count: int, bigram_min_count: int,
                   min_pmi: float) -> list[str]:  # fmt: skip
    """A CLIP-style metadata list: WordNet lemmas plus a corpus's frequent words and high-PMI bigrams."""
    entries = wordnet_lemmas(wordnet) if wordnet else []
    if corpora:

        def lines():
            for path in corpora:
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield from f

        frequent, bigrams = corpus_terms(lines(), min_count, bigram_min_count, min_pmi)
        entries += frequent + bigrams
    if not entries:
        raise ConfigError("metadata: give --wordnet DIR and/or --corpus FILE")
    return list(dict.fromkeys(e for e in entries if e.strip()))
