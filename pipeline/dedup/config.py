"""Dedup's settings, the names of its work files, and the schemas of its shuffle files and edges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.stage import IDENTITY

PLAN = "dedup/_plan.json"


MAP, REDUCE, COMPONENTS = "dedup/_map", "dedup/_reduce", "dedup/_components"


# The graph steps between the edges and the clusters (pipeline/dedup/graph.py): connected-component
# rounds, each edge labelled with its component, each node's uid and area brought to its component.
ROUNDS, LABEL, NODES = "dedup/_rounds", "dedup/_label", "dedup/_nodes"


CLUSTERS = "dedup/_clusters"  # per graph partition: its clustered images' dup_of etc., partitioned by crawl shard


# Edge reasons, strongest first: a removed image gets the strongest reason among its own edges.
REASONS = ("exact_bytes", "exact_pixels", "near", "caption", "semantic")


# Added to a near or caption edge's reason by the reduce when its two ends have identical signatures
# (a group of identical windows is collapsed onto one image, so its edges are a star, not a clique).
IDENTICAL = 8


def joins_as_one(reason: np.ndarray) -> np.ndarray:
    """Edges whose two ends count as one image when clusters are stars (DedupConfig.clusters): equal
    bytes or pixels, identical signatures, and semantic groups (whose edges are spanning stars)."""
    return (reason <= REASONS.index("exact_pixels")) | (reason == REASONS.index("semantic")) | (reason >= IDENTICAL)


REASON_NAMES = pa.array([*REASONS, None], pa.string())  # by index; the last (null) for a kept image


KIND_BYTES, KIND_PIXELS, KIND_CAPTION, KIND_SEMANTIC, KIND_NEAR = 0, 1, 2, 4, 10  # near table t: kind 10 + t


EMBED, CENTROIDS = "dedup/_embed", "dedup/_centroids"


@dataclass(frozen=True)
class DedupConfig:
    """What counts as a duplicate, and which copy is kept."""

    exact_bytes: bool = True  # same sha256 of the bytes
    exact_pixels: bool = True  # same decoded pixels at 32x32 (lossless re-encodes, JPEGs with equal coefficients)
    near: bool = True  # in one window: pHash within near_threshold and colours within colour_tolerance
    near_threshold: int = 10  # max pHash Hamming distance
    colour_tolerance: float = 8.0  # max colour residual after a gain/offset fit per channel (0-255 levels)
    near_windows: int = 6  # windows compared (images.WINDOWS): 6, or 1 for the whole image only
    min_texture: int = 4  # windows flatter than this (std of grey levels) never match: their pHash is noise
    caption: bool = True  # same normalised caption on near-identical images
    caption_threshold: int = 12  # looser pHash distance for same-caption pairs
    max_caption_group: int = 2000  # bigger same-caption groups ("photo") are not compared, but counted
    keep_different_captions: bool = False  # True: a duplicate image with another caption is kept
    keep: Literal["largest", "lowest_uid"] = "largest"  # largest resolution (then lowest uid), or lowest uid
    # star: every duplicate matches its keeper itself (exact copies, identical signatures and semantic
    # groups count as one image); components: A~B~C is one cluster, whatever A and C are to each other
    clusters: Literal["star", "components"] = "star"
    semantic: bool = False  # SemDeDup-style, over image embeddings of a CLIP checkpoint
    # a clipline run or .pt, an OpenAI/OpenCLIP file or directory, a Hugging Face CLIPModel directory; or s3://
    semantic_checkpoint: str | None = None
    semantic_threshold: float = 0.95  # cosine similarity at or above which two images are semantic duplicates
    semantic_cluster_size: int = 10_000  # k-means clusters = images / this; pairs are compared within one
    semantic_sample: int = 200_000  # embeddings k-means is fitted on (sampled from every shard)
    semantic_iterations: int = 20  # k-means iterations (fewer if the assignment stops changing)
    semantic_device: str = field(default="auto", metadata={IDENTITY: False})  # auto | cpu | cuda
    semantic_batch_size: int = field(default=256, metadata={IDENTITY: False})  # images per forward pass
    pair_budget_per_image: int = 50  # candidate pairs the near index may cost, per image
    max_tables: int = 32  # emission budget of the near index, per image, for the whole image's pHash
    # images at which the near index's guaranteed radius stops falling with N (null: it falls to keep
    # pair_budget_per_image); past it, pairs per image grow with N (the reduce joins them in batches)
    hold_radius_from: int | None = None
    window_tables: int = 6  # the same for each of the 5 other windows (with near_windows: 6)
    rows_per_partition: int = field(default=1_000_000, metadata={IDENTITY: False})  # memory per reduce task
    # candidate pairs a reduce task joins at once (memory): its groups go in batches of at most this many
    pairs_per_batch: int = field(default=20_000_000, metadata={IDENTITY: False})
    # memory per graph task (components rounds, keepers): the edges of about this many images
    images_per_graph_partition: int = field(default=1_000_000, metadata={IDENTITY: False})

    def __post_init__(self):
        if self.near_windows not in (1, 6):
            raise ConfigError(
                f"dedup.near_windows must be 6 (every window) or 1 (the whole image): {self.near_windows}"
            )


EMPTY_EDGES = {"a": pl.Int64, "b": pl.Int64, "reason": pl.Int8}


EDGES_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("reason", pa.int8())])  # a < b


PAIRS_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])  # a component round's directed edges


NODE_LABELS_SCHEMA = pa.schema([("gid", pa.int64()), ("label", pa.int64())])  # a node and its component


NODES_SCHEMA = pa.schema([("gid", pa.int64()), ("area", pa.int64()), ("uid", pa.string())])  # what keepers need


# dup_reason as its index in REASONS (len(REASONS) for a keeper)
CLUSTERS_SCHEMA = pa.schema(
    [("gid", pa.int64()), ("dup_of", pa.string()), ("reason", pa.int8()), ("cluster_size", pa.int32())]
)


# kind: int16, near kinds go up to KIND_NEAR + windows x tables
EXACT_SCHEMA = pa.schema([("kind", pa.int16()), ("key", pa.int64()), ("gid", pa.int64())])


GRID_COLUMNS = tuple(f"g{i}" for i in range(6))  # a window's 48 colour bytes (16 cells x RGB) as 6 int64


FUZZY_SCHEMA = pa.schema([*EXACT_SCHEMA, ("phash", pa.int64()), *((c, pa.int64()) for c in GRID_COLUMNS)])


CAPTION_FIELD = pa.field("caption_key", pa.int64())  # on fuzzy rows only with keep_different_captions


def fuzzy_schema(config: DedupConfig) -> pa.Schema:
    return FUZZY_SCHEMA.append(CAPTION_FIELD) if config.keep_different_captions else FUZZY_SCHEMA
