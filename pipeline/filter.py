"""Filter: decide keep / drop for every crawled sample, with the reason and every score kept.

One row per successfully crawled image in ``filter/{shard}.parquet``. Every
filter runs on every row and leaves its score or flag as a column, so a later
config can re-decide without recomputing; ``drop_reason`` names the *first*
filter in chain order that dropped the row:

    blocklists → duplicates (from dedup) → image rules → caption rules
    → language → text match → CLIP score

Rules come from a named preset (``basic``, ``laion``, ``datacomp-basic``,
``datacomp-text``, ``none``) with any setting overridden in the config. The
image rules read the crawl columns only (no re-decode). The CLIP score is a
second pass: it needs a trained clipline checkpoint (``clip_checkpoint``).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import langid, layout, schema
from pipeline.decontaminate import EVALSIG, plan_evalsig, run_evalsig
from pipeline.errors import ConfigError, SchemaError
from pipeline.formats import read_images
from pipeline.lineage import Reads
from pipeline.pdq import HashList
from pipeline.stage import IDENTITY, PlanContext, ShardContext, Stage, committed_shards
from pipeline.storage import read_hash_lists, split_location

log = logging.getLogger(__name__)

# --- rules and presets ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """The concrete thresholds a filter pass applies (a preset, with the config's overrides)."""

    languages: tuple[str, ...] = ()  # keep captions in these languages (langdetect codes); () = any
    min_language_score: float = 0.0
    min_caption_chars: int = 0
    max_caption_chars: int = 0  # 0 = no limit
    min_caption_words: int = 0
    max_caption_words: int = 0  # 0 = no limit
    caption_junk: bool = False  # file names, boilerplate, URL-only and repeated-character captions
    min_image_side: int = 0  # of the original image
    max_image_side: int = 0  # 0 = no limit
    max_aspect_ratio: float = 0.0  # long side / short side; 0 = no limit
    min_image_bytes: int = 0
    text_match: bool = False  # keep only captions that mention a term of text_terms
    min_clip_score: float = 0.0  # 0 = off
    clip_top_fraction: float = 0.0  # keep the best fraction by CLIP score per shard; 0 = off
    metadata_match: bool = False  # keep only captions that contain an entry of the metadata list (CLIP/MetaCLIP)
    balance_per_entry: float = 0.0  # t: keep min(1, t / count) of each entry's rows; < 1: a fraction of the pool


PRESETS: dict[str, Rules] = {
    "none": Rules(),
    # sensible defaults for any web crawl: no junk captions, no tiny images
    "basic": Rules(min_caption_chars=5, max_caption_chars=2000, min_caption_words=1, caption_junk=True,
                   min_image_side=32, max_aspect_ratio=6.0),
    # LAION-400M: English (CLD3 there), CLIP ViT-B/32 cosine >= 0.28, short/junk captions out
    "laion": Rules(languages=("en",), min_caption_chars=5, caption_junk=True, min_image_side=5,
                   min_clip_score=0.28),
    # DataComp "basic filtering": English, > 2 words and > 5 characters, smaller side > 200 px, aspect < 3
    "datacomp-basic": Rules(languages=("en",), min_caption_chars=6, min_caption_words=3, min_image_side=201,
                            max_aspect_ratio=3.0),
    # DataComp "text-based": English and the caption mentions a class name (ImageNet-21k there: text_terms)
    "datacomp-text": Rules(languages=("en",), text_match=True),
    # CLIP's WIT as MetaCLIP describes it: captions matching a metadata entry, balanced to t = 20,000 per entry
    # (CLIP's figure at 400M), with the basic caption and image rules
    "clip-wit": Rules(min_caption_chars=5, max_caption_chars=2000, min_caption_words=1, caption_junk=True,
                      min_image_side=32, max_aspect_ratio=6.0, metadata_match=True, balance_per_entry=20000),
}  # fmt: skip
# the model a preset's CLIP-score threshold was set with (its scores mean something else under any other model)
CALIBRATED_FOR = {"laion": "OpenAI ViT-B/32"}


@dataclass(frozen=True)
class FilterConfig:
    """A preset plus overrides; None means 'as the preset says'. Blocklists and terms are files (local/s3)."""

    # the rule set; every rule below overrides it when set
    preset: Literal["none", "basic", "laion", "datacomp-basic", "datacomp-text", "clip-wit"] = "basic"
    # fast: langdetect re-implemented, deterministic; langdetect; fasttext (bench extra)
    language_backend: Literal["fast", "langdetect", "fasttext"] = "fast"
    languages: tuple[str, ...] | None = None  # langdetect codes to keep, e.g. [en, de]; [] = any
    min_language_score: float | None = None  # probability of the detected language
    min_caption_chars: int | None = None  # caption_too_short below this
    max_caption_chars: int | None = None  # caption_too_long above this
    min_caption_words: int | None = None  # caption_too_few_words below this
    max_caption_words: int | None = None  # caption_too_many_words above this
    caption_junk: bool | None = None  # drop file names, boilerplate, URL-only and repeated-character captions
    min_image_side: int | None = None  # the crawl's original smaller side in pixels
    max_image_side: int | None = None  # the crawl's original larger side in pixels
    max_aspect_ratio: float | None = None  # longer side / shorter side of the original image
    min_image_bytes: int | None = None  # smaller downloads are dropped (image_too_few_bytes)
    text_match: bool | None = None  # keep only captions that name a term of text_terms (DataComp text filter)
    min_clip_score: float | None = None  # cosine of image and caption embeddings under clip_checkpoint
    clip_top_fraction: float | None = None  # keep the best fraction of each shard by CLIP score
    metadata_match: bool | None = None  # keep captions containing an entry of `metadata` (no_metadata_match)
    # balance to t rows per metadata entry (>= 1), or t as a fraction of the pool (< 1); 0 = off (balanced_out)
    balance_per_entry: float | None = None
    drop_duplicates: bool = True  # drop rows dedup marked (dup_of set); needs the dedup stage's outputs
    blocklist_url_sha256: tuple[str, ...] = ()  # files of sha256(normalised URL) hex lines
    blocklist_domains: tuple[str, ...] = ()  # files of domains, one a line; subdomains are blocked too
    blocklist_image_sha256: tuple[str, ...] = ()  # files of sha256(image bytes) hex lines
    blocklist_image_md5: tuple[str, ...] = ()  # files of md5(image bytes) hex lines
    blocklist_image_pdq: tuple[str, ...] = ()  # files of PDQ hashes (64 hex digits), each optionally with a distance
    text_terms: tuple[str, ...] = ()  # terms for text_match (case-insensitive, whole words)
    text_terms_files: tuple[str, ...] = ()  # files of terms, one a line
    # the CLIP-score model: a clipline run or .pt, an OpenAI/OpenCLIP file or directory (OpenAI's ViT-B-32.pt),
    # a Hugging Face CLIPModel directory; local or s3://
    clip_checkpoint: str | None = None
    metadata: str | None = None  # the metadata list (one entry a line, UTF-8; local or s3://): CLIP-style curation
    metadata_ignore_case: bool = False  # MetaCLIP matches case-sensitively; true lower-cases captions and entries
    metadata_partitions: int = 16  # reduce tasks of the global entry counts (each holds 1/N of the entries)
    # evaluation datasets whose images (exact, pixel-equal or near copies) are dropped as eval_overlap:
    # clip_benchmark:DIR, folders:DIR, karpathy:JSON:IMAGES (pipeline/evaldata.py)
    decontaminate: tuple[str, ...] = ()
    decontaminate_near_bits: int = 8  # max pHash Hamming distance of a near copy (-1: exact and pixel copies only)
    decontaminate_colour_tolerance: int = 1  # max colour-grid channel difference of a near copy
    # with a checkpoint (any clip_checkpoint kind), images whose embeddings are this close are copies too
    decontaminate_checkpoint: str | None = None
    decontaminate_semantic_threshold: float = 0.95  # cosine of unit image embeddings
    # keep only rows where this holds, over the crawl's and carried columns: `NSFW == "UNLIKELY" and similarity > 0.3`
    where: str | None = None
    clip_batch_size: int = field(default=256, metadata={IDENTITY: False})  # images per forward pass
    clip_device: str = field(default="auto", metadata={IDENTITY: False})  # auto = cuda when present

    def rules(self) -> Rules:
        """The preset's rules with this config's explicit settings applied; a one-line error if inconsistent."""
        overrides = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(Rules) if getattr(self, f.name) is not None
        }
        rules = dataclasses.replace(PRESETS[self.preset], **overrides)
        unknown = sorted(set(rules.languages) - set(langid.languages()))
        if unknown:
            raise ConfigError(f"filter.languages: unknown language code(s) {', '.join(unknown)} (langdetect codes)")
        if rules.text_match and not (self.text_terms or self.text_terms_files):
            raise ConfigError("filter: text_match needs filter.text_terms or filter.text_terms_files")
        if rules.metadata_match and not self.metadata:
            raise ConfigError(f"filter: preset '{self.preset}' matches metadata and needs filter.metadata (a file)")
        if rules.balance_per_entry and not rules.metadata_match:
            raise ConfigError("filter: balance_per_entry balances metadata entries and needs metadata_match: true")
        if rules.balance_per_entry < 0 or self.metadata_partitions < 1:
            raise ConfigError("filter: balance_per_entry must be >= 0 and metadata_partitions >= 1")
        if (rules.min_clip_score or rules.clip_top_fraction) and not self.clip_checkpoint:
            raise ConfigError(
                f"filter: preset '{self.preset}' scores with CLIP and needs filter.clip_checkpoint "
                f"(calibrated for {CALIBRATED_FOR.get(self.preset, 'a CLIP model')}); or set filter.min_clip_score: 0"
            )
        return rules


# --- the filters: each returns per-row values over a polars frame -----------------------------

FILENAME = re.compile(
    r"^\s*(?:(?:img|dsc[nf]?|dcim|pxl|mvimg|gopr|vid|screenshot|scan|image|photo|pic)[-_ ]?\d[\w\- ]*"
    r"|[\w\-. ()]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg))\s*$",
    re.IGNORECASE,
)
BOILERPLATE = re.compile(
    r"image may contain|click here|^\W*(?:untitled|image|photo|picture|img|pic|thumbnail|placeholder|default image"
    r"|no (?:image|photo|description)(?: available)?|image not found|click to enlarge)(?:[-_ ]?\d+)?\W*$",
    re.IGNORECASE,
)
URL_ONLY = re.compile(r"^\s*(?:https?://|www\.)\S+\s*$", re.IGNORECASE)
REPEATED = re.compile(r"(\S)\1{5,}")  # the same character 6+ times in a row ("!!!!!!", "aaaaaaa")


def caption_junk(caption: str | None) -> str | None:
    """Which junk kind a caption is ('caption_filename', '_boilerplate', '_url', '_repeated_chars') or None."""
    if not caption:
        return None
    if URL_ONLY.match(caption):
        return "caption_url"
    if FILENAME.match(caption):
        return "caption_filename"
    if BOILERPLATE.search(caption):
        return "caption_boilerplate"
    text = caption.replace(" ", "")
    if REPEATED.search(caption) or (len(text) >= 12 and len(set(text)) / len(text) < 0.15):
        return "caption_repeated_chars"
    return None


def domain_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return ""


def blocked_domain(host: str, domains: frozenset[str]) -> bool:
    """True when `host` or any parent domain of it is listed."""
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts)))


WORD = re.compile(r"\w+")


def load_terms(config: FilterConfig) -> tuple[frozenset[tuple[str, ...]], int]:
    """Terms as lower-case word tuples, and the longest term's word count."""
    lines = list(config.text_terms)
    for path in config.text_terms_files:
        store, name = split_location(path)
        lines.extend(store.read_bytes(name).decode("utf-8", "replace").splitlines())
    terms = {tuple(WORD.findall(t.lower())) for t in lines if t.strip() and not t.startswith("#")}
    terms.discard(())
    return frozenset(terms), max((len(t) for t in terms), default=0)


def text_matches(captions: list[str | None], terms: frozenset[tuple[str, ...]], longest: int) -> list[bool]:
    """Whether each caption contains a term as whole words (any term of up to `longest` words)."""
    out = []
    for caption in captions:
        words = WORD.findall((caption or "").lower())
        out.append(
            any(tuple(words[i : i + n]) in terms for n in range(1, longest + 1) for i in range(len(words) - n + 1))
        )
    return out


@dataclass(frozen=True)
class Blocklists:
    url_sha256: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    image_sha256: frozenset[str] = frozenset()
    image_md5: frozenset[str] = frozenset()
    image_pdq: HashList | None = None

    @classmethod
    def load(cls, config: FilterConfig) -> "Blocklists":
        domains = {d.strip().lstrip(".").lower() for d in read_hash_lists(config.blocklist_domains)}
        return cls(
            url_sha256=read_hash_lists(config.blocklist_url_sha256),
            domains=frozenset(domains),
            image_sha256=read_hash_lists(config.blocklist_image_sha256),
            image_md5=read_hash_lists(config.blocklist_image_md5),
            image_pdq=HashList.load(config.blocklist_image_pdq) if config.blocklist_image_pdq else None,
        )

    def reasons(self, frame: pl.DataFrame) -> pl.Series:
        """Per row: 'blocked_url' / 'blocked_domain' / 'blocked_image' or null.

        Built from boolean columns with polars expressions: a string column made from a numpy
        object array made polars infer Object from the first row and fail on a later hit."""
        import hashlib

        urls = frame["url"].to_list()
        hits = pl.DataFrame(
            {
                "url": [hashlib.sha256(u.encode()).hexdigest() in self.url_sha256 for u in urls]
                if self.url_sha256
                else [False] * frame.height,
                "domain": [blocked_domain(domain_of(u), self.domains) for u in urls]
                if self.domains
                else [False] * frame.height,
                "sha256": frame["sha256"].is_in(list(self.image_sha256)).fill_null(False)
                if self.image_sha256
                else [False] * frame.height,
                "md5": frame["md5"].is_in(list(self.image_md5)).fill_null(False)
                if self.image_md5
                else [False] * frame.height,
                "pdq": [
                    name is not None
                    for name in self.image_pdq.match(frame["pdq"].to_list(), frame["pdq_quality"].to_list())
                ]
                if self.image_pdq is not None
                else [False] * frame.height,
            },
            schema={
                "url": pl.Boolean,
                "domain": pl.Boolean,
                "sha256": pl.Boolean,
                "md5": pl.Boolean,
                "pdq": pl.Boolean,
            },
        )
        reason = (
            pl.when(pl.col("url"))
            .then(pl.lit("blocked_url"))
            .when(pl.col("domain"))
            .then(pl.lit("blocked_domain"))
            .when(pl.col("sha256") | pl.col("md5") | pl.col("pdq"))
            .then(pl.lit("blocked_image"))
            .otherwise(pl.lit(None, dtype=pl.Utf8))
        )
        return hits.select(blocked=reason)["blocked"]


def image_reason(rules: Rules) -> pl.Expr:
    """First image rule a row breaks, from the crawl's original size and byte count."""
    w, h = pl.col("original_width"), pl.col("original_height")
    short, long = pl.min_horizontal(w, h), pl.max_horizontal(w, h)
    checks = [
        (rules.min_image_side > 0, short < rules.min_image_side, "image_too_small"),
        (rules.max_image_side > 0, long > rules.max_image_side, "image_too_large"),
        (rules.max_aspect_ratio > 0, long > short * rules.max_aspect_ratio, "image_aspect_ratio"),
        (rules.min_image_bytes > 0, pl.col("bytes") < rules.min_image_bytes, "image_too_few_bytes"),
    ]
    return _first_reason(checks)


def caption_reason(rules: Rules) -> pl.Expr:
    chars, words = pl.col("caption_chars"), pl.col("caption_words")
    checks = [
        (True, pl.col("caption").is_null() | (chars == 0), "caption_missing"),
        (rules.min_caption_chars > 0, chars < rules.min_caption_chars, "caption_too_short"),
        (rules.max_caption_chars > 0, chars > rules.max_caption_chars, "caption_too_long"),
        (rules.min_caption_words > 0, words < rules.min_caption_words, "caption_too_few_words"),
        (rules.max_caption_words > 0, words > rules.max_caption_words, "caption_too_many_words"),
        (rules.caption_junk, pl.col("caption_junk").is_not_null(), pl.col("caption_junk")),
    ]
    return _first_reason(checks)


def _first_reason(checks: list[tuple[bool, pl.Expr, str | pl.Expr]]) -> pl.Expr:
    expr = pl.lit(None, pl.Utf8)
    for enabled, broken, reason in reversed(checks):
        if enabled:
            value = reason if isinstance(reason, pl.Expr) else pl.lit(reason)
            expr = pl.when(broken.fill_null(False)).then(value).otherwise(expr)
    return expr


# --- the stage ---------------------------------------------------------------------------------

CHAIN = ("blocked", "eval_overlap", "duplicate", "where", "image", "caption", "language", "text_match", "metadata",
         "clip_score")  # fmt: skip


def filter_table(
    crawl: pa.Table,
    dedup: pa.Table | None,
    config: FilterConfig,
    rules: Rules,
    images: dict[str, bytes] | None = None,
    evalsigs: pl.DataFrame | None = None,
) -> pa.Table:
    """The filter rows (one per successful crawl row) for one shard's crawl and dedup tables.

    images: uid -> image bytes, needed only for the CLIP score (config.clip_checkpoint).
    """
    frame = pl.from_arrow(crawl).filter(pl.col("status") == schema.SUCCESS)
    if dedup is not None:
        frame = frame.join(pl.from_arrow(dedup).select(["uid", "dup_of", "dup_reason"]), on="uid", how="left")
    else:
        frame = frame.with_columns(dup_of=pl.lit(None, pl.Utf8), dup_reason=pl.lit(None, pl.Utf8))
    captions = frame["caption"].to_list()
    languages, language_scores = langid.detect(captions, config.language_backend)
    terms, longest = load_terms(config) if rules.text_match else (frozenset(), 0)
    frame = frame.with_columns(
        blocked=Blocklists.load(config).reasons(frame),
        caption_chars=pl.col("caption").str.len_chars().fill_null(0).cast(pl.Int32),
        caption_words=pl.col("caption").str.count_matches(r"\S+").fill_null(0).cast(pl.Int32),
        caption_junk=pl.Series([caption_junk(c) for c in captions], dtype=pl.Utf8),
        language=pl.Series(languages, dtype=pl.Utf8),
        language_score=pl.Series(language_scores, dtype=pl.Float32),
        text_match=pl.Series(text_matches(captions, terms, longest), dtype=pl.Boolean) if rules.text_match
        else pl.lit(None, pl.Boolean),
        clip_score=pl.lit(None, pl.Float32),
    )  # fmt: skip
    if config.decontaminate:
        from pipeline.decontaminate import SCHEMA, overlaps

        sigs = evalsigs if evalsigs is not None else pl.from_arrow(SCHEMA.empty_table())
        near, vectors = config.decontaminate_near_bits, None
        if config.decontaminate_checkpoint:
            from pipeline import clip_score

            found = [(images or {}).get(u, b"") for u in frame["uid"]]
            vectors = clip_score.embed(
                found, config.decontaminate_checkpoint, config.clip_device, config.clip_batch_size
            )
        threshold = config.decontaminate_semantic_threshold
        colour = config.decontaminate_colour_tolerance
        frame = frame.with_columns(overlaps(frame, sigs, near, colour, embeddings=vectors, threshold=threshold))
    if rules.metadata_match:
        from pipeline import curation

        entries = curation.load_metadata(config.metadata)
        frame = frame.with_columns(curation.match(frame["caption"], entries, config.metadata_ignore_case))
    if config.clip_checkpoint:
        from pipeline import clip_score

        images = images or {}
        scores = clip_score.score(
            [images.get(u, b"") for u in frame["uid"]],
            captions,
            config.clip_checkpoint,
            config.clip_device,
            config.clip_batch_size,
        )
        frame = frame.with_columns(clip_score=pl.Series(scores, dtype=pl.Float32))
    language_ok = pl.col("language_score") >= rules.min_language_score
    if rules.languages:
        language_ok = language_ok & pl.col("language").is_in(list(rules.languages))
    clip_active = bool(rules.min_clip_score or rules.clip_top_fraction)
    clip_threshold = rules.min_clip_score if rules.min_clip_score else -np.inf
    if rules.clip_top_fraction and frame.height:
        kth = max(1, int(np.ceil(frame.height * rules.clip_top_fraction)))
        ranked = np.sort(np.nan_to_num(frame["clip_score"].to_numpy(), nan=-2.0))[::-1]
        clip_threshold = max(clip_threshold, float(ranked[kth - 1]))
    where = where_expr(config.where, frame.columns) if config.where else pl.lit(True)
    reasons = {
        "blocked": pl.col("blocked"),
        "eval_overlap": pl.when(pl.col("eval_overlap").is_not_null()).then(pl.lit("eval_overlap"))
        if config.decontaminate
        else pl.lit(None, pl.Utf8),
        "duplicate": pl.when(pl.col("dup_of").is_not_null() & config.drop_duplicates).then(pl.lit("duplicate")),
        "where": pl.when(~where.fill_null(False)).then(pl.lit("where")),
        "image": image_reason(rules),
        "caption": caption_reason(rules),
        "language": pl.when(~language_ok).then(pl.lit("language")),
        "text_match": pl.when(pl.lit(rules.text_match) & ~pl.col("text_match").fill_null(False)).then(
            pl.lit("no_text_match")
        ),
        "metadata": pl.when(pl.col("metadata_ids").list.len() == 0).then(pl.lit("no_metadata_match"))
        if rules.metadata_match
        else pl.lit(None, pl.Utf8),
        "clip_score": pl.when(
            pl.lit(clip_active) & ((pl.col("clip_score") < clip_threshold) | pl.col("clip_score").is_nan())
        ).then(pl.lit("clip_score")),
    }
    frame = frame.with_columns(drop_reason=pl.coalesce([reasons[name] for name in CHAIN]))
    frame = frame.with_columns(keep=pl.col("drop_reason").is_null())
    extra = ["url", "caption", "dup_of", "dup_reason", "blocked", "caption_chars", "caption_words", "caption_junk",
             "text_match", *(["metadata_ids"] if rules.metadata_match else []),
             *(["eval_overlap"] if config.decontaminate else [])]  # fmt: skip
    out = frame.select([f.name for f in schema.FILTER] + extra).to_arrow()
    return schema.conform(out, schema.FILTER, "filter", keep_extra=True)


_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}
_ARITHMETIC = {ast.Add: "__add__", ast.Sub: "__sub__", ast.Mult: "__mul__", ast.Div: "__truediv__"}


def where_expr(text: str, columns: list[str] | None = None) -> pl.Expr:
    """A `where:` rule as a polars expression: Python's syntax for comparisons (`== != < <= > >=`,
    `in [..]`, `not in`, `is None`), `and`, `or`, `not`, `+ - * /`, column names and literals. It is
    translated node by node, never evaluated as Python. A column not in `columns` is a one-line error."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"filter.where: {text!r} is not an expression ({e.msg})") from None

    def lit(node):
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        raise ConfigError(f"filter.where: {ast.unparse(node)!r}: only literals go in a list")

    def build(node) -> pl.Expr:
        if isinstance(node, ast.BoolOp):
            parts = [build(v) for v in node.values]
            out = parts[0]
            for part in parts[1:]:
                out = out & part if isinstance(node.op, ast.And) else out | part
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~build(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -build(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return getattr(build(node.left), _ARITHMETIC[type(node.op)])(build(node.right))
        if isinstance(node, ast.Compare):
            out, left = None, node.left
            for op, right in zip(node.ops, node.comparators, strict=True):
                if isinstance(op, (ast.In, ast.NotIn)):
                    if not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                        raise ConfigError(f"filter.where: 'in' takes a list of literals: {ast.unparse(node)!r}")
                    test = build(left).is_in([lit(v) for v in right.elts])
                    test = ~test if isinstance(op, ast.NotIn) else test
                elif isinstance(op, (ast.Is, ast.IsNot)) and isinstance(right, ast.Constant) and right.value is None:
                    test = build(left).is_null() if isinstance(op, ast.Is) else build(left).is_not_null()
                elif type(op) in _COMPARE:
                    test = _COMPARE[type(op)](build(left), build(right))
                else:
                    raise ConfigError(f"filter.where: {type(op).__name__} is not supported in {text!r}")
                out = test if out is None else out & test
                left = right
            return out
        if isinstance(node, ast.Name):
            if columns is not None and node.id not in columns:
                raise ConfigError(
                    f"filter.where: no column {node.id!r} (columns here: {', '.join(sorted(columns))}; "
                    "carry input columns with ingest.carry_columns)"
                )
            return pl.col(node.id)
        if isinstance(node, ast.Constant):
            return pl.lit(lit(node))
        raise ConfigError(f"filter.where: {ast.unparse(node)!r} is not supported (comparisons, and/or/not, + - * /)")

    return build(tree)


# Columns the filter computes before its rules run: a where: rule may use them beside the crawl's.
COMPUTED = ("dup_of", "dup_reason", "blocked", "caption_chars", "caption_words", "caption_junk", "language",
            "language_score", "text_match", "clip_score")  # fmt: skip


def plan_filter(ctx: PlanContext) -> list[int]:
    ctx.config.rules()  # a bad preset/override is one error on the driver, before any task
    check_calibration(ctx.config)
    shards = committed_shards(ctx.storage, "crawl")
    if ctx.config.where:  # and so is a where: rule that is malformed or names a column no crawl shard has
        columns = None
        if shards:
            with ctx.storage.open_seekable(layout.crawl_parquet(shards[0])) as f:
                columns = [*pq.ParquetFile(f).schema_arrow.names, *COMPUTED]
        where_expr(ctx.config.where, columns)
    return shards


def check_calibration(config: FilterConfig) -> str | None:
    """Warn (once, on the driver) when a preset's CLIP-score threshold meets a model it was not set for."""
    calibrated = CALIBRATED_FOR.get(config.preset)
    if not (calibrated and config.clip_checkpoint and config.min_clip_score is None):
        return None
    from pipeline.clip_score import architecture

    found = architecture(config.clip_checkpoint)
    if found == calibrated:
        return None
    message = (
        f"filter: preset '{config.preset}' sets min_clip_score {PRESETS[config.preset].min_clip_score} for "
        f"{calibrated}, but {config.clip_checkpoint} is a {found}: set filter.min_clip_score for this model"
    )
    log.warning(message)
    return message


def unbalanced_table(ctx: ShardContext, config: FilterConfig, rules: Rules) -> pa.Table:
    """The filter rows of `ctx.shard` under every rule but the balancing (which needs every shard's counts)."""
    crawl = ctx.read_table(layout.crawl_parquet(ctx.shard))
    crawl = schema.with_later_crawl_columns(crawl)
    schema.validate(crawl, schema.CRAWL, layout.crawl_parquet(ctx.shard))
    dedup = None
    if config.drop_duplicates:
        rel = layout.dedup_parquet(ctx.shard)
        if not ctx.storage.exists(rel):
            raise SchemaError(f"{rel} is missing: run the dedup stage first, or set filter.drop_duplicates: false")
        dedup = ctx.read_table(rel)
    images = None
    if config.clip_checkpoint or config.decontaminate_checkpoint:
        images = read_images(ctx.storage, layout.crawl_tar(ctx.shard))
    evalsigs = None
    if config.decontaminate:
        from pipeline.decontaminate import load_signatures

        evalsigs = load_signatures(ctx.storage)
    return filter_table(crawl, dedup, config, rules, images, evalsigs)


def balancing(config: FilterConfig) -> bool:
    return bool(config.rules().balance_per_entry)


# --- balancing: match (per shard) → counts (per entry partition) → filter (per shard) ------------------

MATCH = "filter/_match"
COUNTS = "filter/_counts"
COUNT_SCHEMA = pa.schema([pa.field("entry", pa.int32()), pa.field("count", pa.int64())])


def match_parquet(shard: int) -> str:
    return f"{MATCH}/{layout.shard_name(shard)}.parquet"


def match_counts(shard: int) -> str:
    return f"{MATCH}/{layout.shard_name(shard)}.counts.arrow"


def plan_match(ctx: PlanContext) -> list[int]:
    if not balancing(ctx.config):
        return []
    return plan_filter(ctx)


def run_match(ctx: ShardContext) -> dict:
    """Every rule but the balancing, and this shard's count of each metadata entry among the rows it keeps,
    partitioned by entry id (the pool size rides along as entry POOL in partition 0)."""
    from pipeline import curation
    from pipeline.shuffle import write_partitioned

    config: FilterConfig = ctx.config
    table = unbalanced_table(ctx, config, config.rules())
    ctx.write_table(match_parquet(ctx.shard), table)
    kept = pl.from_arrow(table.select(["keep", "metadata_ids"])).filter("keep")["metadata_ids"]
    counts = curation.entry_counts(kept).to_arrow().cast(COUNT_SCHEMA)
    parts = np.maximum(counts["entry"].to_numpy(), 0) % config.metadata_partitions
    write_partitioned(ctx, match_counts(ctx.shard), counts, parts, config.metadata_partitions)
    return {"rows": table.num_rows, "pool": len(kept), "entries": counts.num_rows - 1}


def plan_counts(ctx: PlanContext) -> list[int]:
    return list(range(ctx.config.metadata_partitions)) if balancing(ctx.config) else []


def run_counts(ctx: ShardContext) -> dict:
    """The global count of every entry in partition `ctx.shard` (entry id mod partitions): a sum over every shard."""
    from pipeline.shuffle import map_files, read_partition

    rels = map_files(ctx.storage, MATCH)
    from pipeline import curation

    names = curation.load_metadata(ctx.config.metadata)
    pieces = pl.from_arrow(read_partition(ctx.storage, rels, ctx.shard, COUNT_SCHEMA))
    total = pieces.group_by("entry").agg(pl.col("count").sum()).sort("entry")
    total = total.with_columns(  # the report shows entries by name
        name=pl.col("entry").map_elements(lambda e: names[e] if e >= 0 else None, return_dtype=pl.Utf8)
    )
    ctx.write_table(f"{COUNTS}/{layout.shard_name(ctx.shard)}.parquet", total.to_arrow())
    return {"entries": int((total["entry"] >= 0).sum()), "rows": int(total.filter(pl.col("entry") >= 0)["count"].sum())}


def global_counts(storage, entries: int) -> tuple[np.ndarray, int]:
    """(count per entry id, pool size) from the counts step's files."""
    from pipeline import curation

    counts = np.zeros(entries, dtype=np.int64)
    pool = 0
    for rel in storage.list(COUNTS, suffix=".parquet"):
        part = storage.read_frame(rel)
        pool += int(part.filter(pl.col("entry") == curation.POOL)["count"].sum())
        part = part.filter(pl.col("entry") >= 0)
        counts[part["entry"].to_numpy()] = part["count"].to_numpy()
    return counts, pool


def run_filter(ctx: ShardContext) -> dict:
    config: FilterConfig = ctx.config
    rules = config.rules()
    if not rules.balance_per_entry:
        table = unbalanced_table(ctx, config, rules)
        extra = {}
    else:
        from pipeline import curation

        table = ctx.read_table(match_parquet(ctx.shard))
        counts, pool = global_counts(ctx.storage, len(curation.load_metadata(config.metadata)))
        t = curation.threshold(rules.balance_per_entry, pool)
        frame = pl.from_arrow(table)
        sampled = curation.balanced(frame["uid"], frame["metadata_ids"], counts, t)
        out = frame["keep"].to_numpy() & ~sampled
        frame = frame.with_columns(
            drop_reason=pl.when(pl.Series(out)).then(pl.lit("balanced_out")).otherwise(pl.col("drop_reason")),
            keep=pl.col("keep") & pl.Series(sampled),
        )
        table = schema.conform(frame.to_arrow(), schema.FILTER, "filter", keep_extra=True)
        extra = {"balance_t": t, "pool": pool}
    ctx.write_table(layout.filter_parquet(ctx.shard), table)
    reasons = pl.from_arrow(table.select(["drop_reason"])).drop_nulls()["drop_reason"].value_counts(sort=True)
    languages = pl.from_arrow(table.select(["language"]))["language"].value_counts()
    return {
        "rows": table.num_rows,
        "kept": int(pc.sum(table["keep"].cast(pa.int64())).as_py() or 0),
        "drop_reasons": {r: int(n) for r, n in sorted(reasons.iter_rows())},
        "languages": {lang: int(n) for lang, n in sorted(languages.iter_rows())},
        **extra,
    }


def filter_reads(config: FilterConfig) -> Reads:
    """The crawl and dedup rows of the shard, and every file the config names, by content; with balancing,
    the shard's matched rows and every entry count instead (they carry the rest)."""
    if balancing(config):
        return Reads(same=(MATCH,), every=(COUNTS,))
    return match_reads(config)


def match_reads(config: FilterConfig) -> Reads:
    files = (
        *config.blocklist_url_sha256,
        *config.blocklist_domains,
        *config.blocklist_image_sha256,
        *config.blocklist_image_md5,
        *config.blocklist_image_pdq,
        *config.text_terms_files,
        *((config.metadata,) if config.metadata else ()),
    )
    for model in (config.clip_checkpoint, config.decontaminate_checkpoint):
        if model:
            from training.checkpoint import checkpoint_files

            files += checkpoint_files(model)
    every = ("filter/_evalsig",) if config.decontaminate else ()
    return Reads(same=("crawl", "dedup") if config.drop_duplicates else ("crawl",), every=every, external=files)


def evalsig_reads(config: FilterConfig) -> Reads | None:
    if not config.decontaminate:
        return None
    from training.checkpoint import checkpoint_files

    model = config.decontaminate_checkpoint
    return Reads(external=checkpoint_files(model) if model else ())


EVALSIG_STAGE = Stage(
    name=EVALSIG,
    plan=plan_evalsig,
    run_shard=run_evalsig,
    config_key="filter",
    reads=evalsig_reads,
    gpu_when=lambda config: bool(config.decontaminate_checkpoint),
)
MATCH_STAGE = Stage(
    name=MATCH,
    plan=plan_match,
    run_shard=run_match,
    config_key="filter",
    rate_key="rows",
    gpu_when=lambda config: bool(config.clip_checkpoint or config.decontaminate_checkpoint),
    reads=lambda config: match_reads(config) if balancing(config) else None,
)
COUNTS_STAGE = Stage(
    name=COUNTS,
    plan=plan_counts,
    run_shard=run_counts,
    config_key="filter",
    reads=lambda config: Reads(every=(MATCH,)) if balancing(config) else None,
)
STAGE = Stage(
    name="filter",
    plan=plan_filter,
    run_shard=run_filter,
    config_key="filter",
    rate_key="rows",
    # the CLIP-score pass runs the model (in the match step when balancing)
    gpu_when=lambda config: bool(config.clip_checkpoint or config.decontaminate_checkpoint) and not balancing(config),
    reads=filter_reads,
)
STAGES = (EVALSIG_STAGE, MATCH_STAGE, COUNTS_STAGE, STAGE)
