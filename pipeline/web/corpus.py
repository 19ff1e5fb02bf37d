"""A reproducible synthetic web corpus: real image files, learnable captions, planted faults.

`generate(root, spec)` writes:

    root/spec.json              the spec it was made from (a rerun with the same spec reuses it)
    root/files/NAME             image bytes as served (JPEG/PNG/WebP/GIF ..., and the bad files)
    root/catalog.parquet        one row per URL to serve: site, path, behaviour, file, caption,
                                language, class, duplicate group, and the crawl status expected
    root/heldout/CLASS/ID.jpg   a held-out split in image-folder layout (class = "colour_shape")
    root/heldout/labels.parquet file, label, colour, shape, caption of each held-out image

The server (pipeline/web/server.py) adds the URL lists once it knows its port.

Images are a coloured shape on a textured, low-saturation background; the
caption names the shape and its colour (in en/de/fr/es), so a model trained on
the corpus can learn to tell the colour × shape classes apart.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (135, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
BACKGROUNDS = ("plain", "striped", "dotted", "gradient", "noisy")

# Per language: shape -> (word, gender); colour -> (masculine, feminine); background words.
_WORDS = {
    "de": {
        "shape": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "cross": "Kreuz"},
        "colour": {
            "red": "Rot",
            "green": "Grün",
            "blue": "Blau",
            "yellow": "Gelb",
            "purple": "Lila",
            "orange": "Orange",
        },
        "bg": {
            "plain": "einfarbig",
            "striped": "gestreift",
            "dotted": "gepunktet",
            "gradient": "verlaufend",
            "noisy": "verrauscht",
        },
    },
    "fr": {
        "shape": {
            "circle": ("cercle", "m"),
            "square": ("carré", "m"),
            "triangle": ("triangle", "m"),
            "star": ("étoile", "f"),
            "cross": ("croix", "f"),
        },
        "colour": {
            "red": ("rouge", "rouge"),
            "green": ("vert", "verte"),
            "blue": ("bleu", "bleue"),
            "yellow": ("jaune", "jaune"),
            "purple": ("violet", "violette"),
            "orange": ("orange", "orange"),
        },
        "bg": {"plain": "uni", "striped": "rayé", "dotted": "à pois", "gradient": "dégradé", "noisy": "granuleux"},
    },
    "es": {
        "shape": {
            "circle": ("círculo", "m"),
            "square": ("cuadrado", "m"),
            "triangle": ("triángulo", "m"),
            "star": ("estrella", "f"),
            "cross": ("cruz", "f"),
        },
        "colour": {
            "red": ("rojo", "roja"),
            "green": ("verde", "verde"),
            "blue": ("azul", "azul"),
            "yellow": ("amarillo", "amarilla"),
            "purple": ("morado", "morada"),
            "orange": ("naranja", "naranja"),
        },
        "bg": {
            "plain": "liso",
            "striped": "de rayas",
            "dotted": "de puntos",
            "gradient": "degradado",
            "noisy": "con ruido",
        },
    },
}
_EN_BG = {"plain": "plain", "striped": "striped", "dotted": "dotted", "gradient": "gradient", "noisy": "noisy"}
_POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")


def caption_for(rng: random.Random, lang: str, colour: str, shape: str, bg: str, position: str) -> str:
    """A natural-language caption of one image in `lang` (several templates each)."""
    if lang == "en":
        size = rng.choice(("small", "large", "big", "little"))
        return rng.choice(
            (
                f"a {colour} {shape}",
                f"a photo of a {colour} {shape} on a {_EN_BG[bg]} background",
                f"{colour} {shape}, {_EN_BG[bg]} background",
                f"a {size} {colour} {shape} in the {position} of the picture",
                f"illustration of a {colour} {shape}",
                f"this image shows a {colour} {shape} drawn on a {_EN_BG[bg]} backdrop",
            )
        )
    w = _WORDS[lang]
    if lang == "de":
        s, c, b = w["shape"][shape], w["colour"][colour], w["bg"][bg]
        return rng.choice(
            (
                f"Ein Foto von einem {s} in {c}",
                f"Zeichnung mit einem {s} in {c}, der Hintergrund ist {b}",
                f"{s} in {c} auf einem Bild, dessen Hintergrund {b} ist",
                f"Hier sieht man {'einen' if shape in ('circle', 'star') else 'ein'} {s} in der Farbe {c}",
            )
        )
    (s, g), (cm, cf) = w["shape"][shape], w["colour"][colour]
    c, b = (cf if g == "f" else cm), w["bg"][bg]
    if lang == "fr":
        art = "une" if g == "f" else "un"
        return rng.choice(
            (
                f"une photo d'{art} {s} {c}",
                f"{art} {s} {c} sur un fond {b}",
                f"dessin d'{art} {s} {c}, avec un fond {b}",
                f"voici {art} {s} de couleur {c}",
            )
        )
    art = "una" if g == "f" else "un"
    return rng.choice(
        (
            f"una foto de {art} {s} {c}",
            f"{art} {s} {c} sobre un fondo {b}",
            f"dibujo de {art} {s} {c} con un fondo {b}",
            f"aquí se ve {art} {s} de color {c}",
        )
    )


def junk_caption(rng: random.Random, n: int) -> str:
    """Captions a filter should drop: file names, boilerplate, URLs, noise."""
    return rng.choice(
        (
            f"IMG_{n:04d}.jpg",
            f"DSC{n:05d}",
            "image may contain: text",
            f"http://example.com/images/{n}.jpg",
            "!!!!!!!!!!!!!!!!",
            "click here to buy now",
            f"untitled-{n}",
        )
    )


# --- rendering ------------------------------------------------------------------------


def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> Image.Image:
    base = rng.integers(90, 200)
    tint = rng.integers(-12, 13, size=3)
    colour = np.clip(base + tint, 0, 255).astype(np.uint8)
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = colour
    if kind == "gradient":
        ramp = np.linspace(-40, 40, w if rng.random() < 0.5 else h)
        ramp = ramp[None, :, None] if ramp.shape[0] == w else ramp[:, None, None]
        arr = np.clip(arr.astype(np.int16) + ramp.astype(np.int16), 0, 255).astype(np.uint8)
    elif kind == "noisy":
        arr = np.clip(arr.astype(np.int16) + rng.integers(-25, 26, size=arr.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    other = tuple(int(v) for v in np.clip(colour.astype(int) + rng.integers(25, 45), 0, 255))
    if kind == "striped":
        step = int(rng.integers(6, 16))
        for x in range(0, w + h, step * 2):
            draw.line([(x, 0), (x - h, h)], fill=other, width=step // 2 + 1)
    elif kind == "dotted":
        step = int(rng.integers(8, 18))
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=other)
    return img


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [
            (cx + r * math.cos(rot + k * 2 * math.pi / 3), cy + r * math.sin(rot + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = rot + k * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "square":
        return [
            (
                cx + r * 0.8 * math.cos(rot + math.pi / 4 + k * math.pi / 2) * math.sqrt(2) / 1.2,
                cy + r * 0.8 * math.sin(rot + math.pi / 4 + k * math.pi / 2) * math.sqrt(2) / 1.2,
            )
            for k in range(4)
        ]
    raise AssertionError(shape)


def render(
    seed: int | list[int], colour: str, shape: str, bg: str, size: tuple[int, int], position: str
) -> Image.Image:
    """Draw one image: a `colour` `shape` on a `bg` background, deterministic in `seed` (an int or int list)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = _background(rng, bg, w, h)
    draw = ImageDraw.Draw(img)
    r = min(w, h) * float(rng.uniform(0.18, 0.32))
    fx, fy = {
        "top left": (0.3, 0.3),
        "top right": (0.7, 0.3),
        "bottom left": (0.3, 0.7),
        "bottom right": (0.7, 0.7),
        "centre": (0.5, 0.5),
    }[position]
    cx = w * fx + float(rng.uniform(-0.05, 0.05)) * w
    cy = h * fy + float(rng.uniform(-0.05, 0.05)) * h
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, size=3), 0, 255))
    rot = float(rng.uniform(0, 2 * math.pi))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=fill)
    # A few faint marks of the background's own hue: every image its own, as photos are, while
    # the named shape and colour stay what the caption says.
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        x1, y1 = x0 + float(rng.uniform(-0.4, 0.4)) * w, y0 + float(rng.uniform(-0.4, 0.4)) * h
        grey = int(rng.integers(40, 230))
        draw.line([(x0, y0), (x1, y1)], fill=(grey, grey, grey), width=int(rng.integers(2, max(3, min(w, h) // 12))))
    return img


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "png":
        img.save(buf, "PNG", optimize=False)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=0)
    else:
        raise AssertionError(fmt)
    return buf.getvalue()


EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}


# --- the spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebSpec:
    """What to generate. Same spec → same bytes."""

    seed: int = 0
    images: int = 400  # distinct rendered images served with captions
    heldout: int = 150  # held-out labelled images (not served)
    content_sites: int = 3  # sites serving the corpus (one loopback address each)
    languages: tuple[str, ...] = ("en", "en", "en", "de", "fr", "es")  # drawn uniformly: en-heavy like the web
    exact_dup_fraction: float = 0.06  # served again byte-identical under another URL
    near_dup_fraction: float = 0.06  # served again re-encoded / resized / cropped
    junk_caption_fraction: float = 0.04
    min_side: int = 96
    max_side: int = 320
    faults: bool = True  # one URL (or a few) per fault of docs/faults.md

    def to_json(self) -> dict:
        """As stored in spec.json (tuples become lists, so a reloaded spec compares equal)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


SIZES: dict[str, WebSpec] = {
    "tiny": WebSpec(images=300, heldout=120),
    "small": WebSpec(images=3000, heldout=300),
    "medium": WebSpec(images=20000, heldout=1000),
}


def class_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


# --- faults ----------------------------------------------------------------------------------
# behaviour -> crawl status a correct crawler reports (see pipeline/schema.py STATUS_KINDS).
# "file" behaviours serve a generated bad file; the others are HTTP behaviours of the server.

FAULT_BEHAVIOURS: dict[str, str] = {
    # N1 connection faults
    "reset": "connection_error",
    "refused": "connection_error",
    # N2, N3
    "slow": "timeout",
    "endless": "too_large",
    # N4
    "short_body": "truncated",
    "chunked_cut": "truncated",
    # N5
    "gzip_bomb": "too_large",
    # N6
    "status_404": "not_found",
    "status_410": "not_found",
    "status_451": "legal_unavailable",
    "status_500": "server_error",
    "status_503": "server_error",
    "status_429": "rate_limited",
    "flaky_429": "success",  # 429 + Retry-After once, then the image
    "flaky_503": "success",
    # N7
    "redirect_ok": "success",
    "redirect_loop": "redirect_error",
    "redirect_many": "redirect_error",
    "redirect_scheme": "redirect_error",
    # S3: a redirect to an address that is not allow-listed (loopback stand-ins)
    "redirect_private": "refused_address",
    "redirect_ipv6": "refused_address",
    # N8 X-Robots-Tag
    "xrobots_noai": "opted_out",
    "xrobots_noimageai": "opted_out",
    "xrobots_noindex": "opted_out",
    "xrobots_noimageindex": "opted_out",
    "xrobots_combined": "opted_out",
    "xrobots_repeated": "opted_out",
    "xrobots_agent": "opted_out",
    "xrobots_other_agent": "success",
    # N9 robots.txt
    "robots_disallowed": "robots_disallowed",
    "robots_5xx": "robots_disallowed",
    # N10
    "html_as_jpeg": "not_an_image",
    "svg_as_jpeg": "not_an_image",
    # I1
    "zero_bytes": "not_an_image",
    "random_bytes": "not_an_image",
    "truncated_jpeg": "decode_error",
    "truncated_png": "decode_error",
    # I2
    "png_bomb": "decompression_bomb",
    "jpeg_bomb": "decompression_bomb",
    # I3
    "tiff": "format_not_allowed",
    "psd": "format_not_allowed",
    "eps": "format_not_allowed",
    "bmp": "format_not_allowed",
    # I4
    "tiny_image": "image_too_small",
    "extreme_aspect": "bad_aspect_ratio",
    # I5: awkward but valid, normalised to upright RGB
    "cmyk_jpeg": "success",
    "png_16bit": "success",
    "palette_alpha": "success",
    "animated_gif": "success",
    "animated_webp": "success",
    "exif_rotated": "success",
}

# Rows of the URL list that must be refused before any request (S1, S2, S4, M1).
# {port} and {loopback_port} are filled in by the server.
URL_LIST_FAULTS: list[tuple[str, str | None, str]] = [
    ("file:///etc/passwd", "a file url", "refused_scheme"),
    ("ftp://127.0.1.1/image.jpg", "an ftp url", "refused_scheme"),
    ("gopher://127.0.1.1/1", "a gopher url", "refused_scheme"),
    ("data:image/png;base64,iVBORw0KGgo=", "a data url", "refused_scheme"),
    ("http://127.0.0.2:{port}/img/stand-in.jpg", "loopback not allow-listed", "refused_address"),
    ("http://[::1]:{port}/img/stand-in.jpg", "ipv6 loopback", "refused_address"),
    ("http://[::ffff:127.0.0.2]:{port}/img/stand-in.jpg", "ipv4-mapped ipv6", "refused_address"),
    ("http://2130706434:{port}/img/stand-in.jpg", "decimal 127.0.0.2", "refused_address"),
    ("http://0177.0.0.2:{port}/img/stand-in.jpg", "octal 127.0.0.2", "refused_address"),
    ("http://127.2:{port}/img/stand-in.jpg", "short form 127.0.0.2", "refused_address"),
    ("http://0x7f.0.0.2:{port}/img/stand-in.jpg", "hex 127.0.0.2", "refused_address"),
    ("not a url at all", "garbage", "invalid_url"),
    ("http://", "empty host", "invalid_url"),
]


def _bad_files(rng: random.Random, good: Image.Image) -> dict[str, tuple[bytes, str]]:
    """behaviour -> (bytes, content-type served) for the file-based faults."""
    jpeg = encode(good, "jpeg")
    png = encode(good, "png")
    files: dict[str, tuple[bytes, str]] = {}
    files["html_as_jpeg"] = (b"<!DOCTYPE html><html><body><h1>Not found</h1></body></html>", "image/jpeg")
    files["svg_as_jpeg"] = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "image/jpeg",
    )
    files["zero_bytes"] = (b"", "image/jpeg")
    files["random_bytes"] = (bytes(rng.getrandbits(8) for _ in range(4096)), "image/jpeg")
    files["truncated_jpeg"] = (jpeg[: len(jpeg) // 2], "image/jpeg")
    files["truncated_png"] = (png[: len(png) // 2], "image/png")

    # PNG whose IHDR declares 60000 x 60000 (3.6 G pixels) with a tiny IDAT.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    files["png_bomb"] = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b""),
        "image/png",
    )
    # JPEG whose SOF0 declares 65000 x 65000.
    sof = jpeg.find(b"\xff\xc0")
    patched = bytearray(jpeg)
    patched[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    files["jpeg_bomb"] = (bytes(patched), "image/jpeg")
    buf = io.BytesIO()
    good.save(buf, "TIFF")
    files["tiff"] = (buf.getvalue(), "image/tiff")
    files["psd"] = (
        b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 64, 64, 8, 3) + b"\x00" * 64,
        "image/vnd.adobe.photoshop",
    )
    files["eps"] = (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n%%EOF\n",
        "application/postscript",
    )
    buf = io.BytesIO()
    good.save(buf, "BMP")
    files["bmp"] = (buf.getvalue(), "image/bmp")
    files["tiny_image"] = (encode(good.resize((8, 8)), "jpeg"), "image/jpeg")
    files["extreme_aspect"] = (encode(good.resize((2400, 40)), "jpeg"), "image/jpeg")
    # I5
    buf = io.BytesIO()
    good.convert("CMYK").save(buf, "JPEG", quality=90)
    files["cmyk_jpeg"] = (buf.getvalue(), "image/jpeg")
    buf = io.BytesIO()
    arr16 = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(arr16).save(buf, "PNG")
    files["png_16bit"] = (buf.getvalue(), "image/png")
    buf = io.BytesIO()
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 0
    pal.save(buf, "PNG", transparency=0)
    files["palette_alpha"] = (buf.getvalue(), "image/png")
    frames = [good, good.rotate(90), good.rotate(180)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated_gif"] = (buf.getvalue(), "image/gif")
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, method=0)
    files["animated_webp"] = (buf.getvalue(), "image/webp")
    # EXIF orientation 6: stored rotated, to be shown rotated 90° clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    good.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    files["exif_rotated"] = (buf.getvalue(), "image/jpeg")
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing; 256 MiB of zeros → ~250 KiB
    zeros = b"\x00" * (1 << 20)
    files["gzip_bomb"] = (b"".join(bomb.compress(zeros) for _ in range(256)) + bomb.flush(), "image/jpeg")
    return files


# --- generation --------------------------------------------------------------------------------

CATALOG_SCHEMA = pa.schema(
    [
        ("site", pa.int16()),
        ("path", pa.string()),
        ("behaviour", pa.string()),  # "image" for plain content, else a FAULT_BEHAVIOURS key
        ("file", pa.string()),  # under files/, or null for pure HTTP behaviours
        ("content_type", pa.string()),
        ("caption", pa.string()),
        ("language", pa.string()),  # null for junk captions
        ("colour", pa.string()),
        ("shape", pa.string()),
        ("label", pa.string()),  # "colour shape", null for junk / faults without content
        ("image_id", pa.int32()),  # the rendered image this URL shows (duplicates share it)
        ("dup_kind", pa.string()),  # null, "exact" (same bytes) or "near" (re-encoded/resized/cropped)
        ("expected_status", pa.string()),
    ]
)


def _spec_matches(root: Path, spec: WebSpec) -> bool:
    try:
        return json.loads((root / "spec.json").read_text()) == spec.to_json() and (root / "catalog.parquet").exists()
    except (OSError, ValueError):
        return False


def generate(root: str | Path, spec: WebSpec = WebSpec()) -> Path:
    """Write the corpus for `spec` under `root` (reused as is when already generated with it)."""
    root = Path(root)
    if _spec_matches(root, spec):
        return root
    (root / "files").mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    rows: list[dict] = []

    def add_file(name: str, data: bytes) -> str:
        (root / "files" / name).write_bytes(data)
        return name

    def draw_attributes(r: random.Random) -> tuple[str, str, str, tuple[int, int], str]:
        colour, shape = r.choice(list(COLOURS)), r.choice(SHAPES)
        bg, position = r.choice(BACKGROUNDS), r.choice(_POSITIONS)
        w = r.randint(spec.min_side, spec.max_side)
        h = int(w * r.uniform(0.6, 1.6))
        h = max(spec.min_side, min(spec.max_side, h))
        return colour, shape, bg, (w, h), position

    formats = ["jpeg"] * 7 + ["png"] * 2 + ["webp"]
    for image_id in range(spec.images):
        colour, shape, bg, size, position = draw_attributes(rng)
        img = render([spec.seed, 0, image_id], colour, shape, bg, size, position)
        fmt = rng.choice(formats)
        name = add_file(f"{image_id:06d}.{EXT[fmt]}", encode(img, fmt, quality=rng.randint(80, 95)))
        junk = rng.random() < spec.junk_caption_fraction
        lang = None if junk else rng.choice(spec.languages)
        caption = junk_caption(rng, image_id) if junk else caption_for(rng, lang, colour, shape, bg, position)
        site = image_id % spec.content_sites
        # Some images of site 0 sit under /private/, which its robots.txt disallows.
        private = spec.faults and site == 0 and image_id % 97 == 13
        behaviour = "robots_disallowed" if private else "image"
        original = dict(
            site=site,
            path=f"/{'private' if private else 'img'}/{image_id:06d}.{EXT[fmt]}",
            behaviour=behaviour,
            file=name,
            content_type=MIME[fmt],
            caption=caption,
            language=lang,
            colour=colour,
            shape=shape,
            label=class_name(colour, shape),
            image_id=image_id,
            dup_kind=None,
            expected_status="robots_disallowed" if private else "success",
        )
        rows.append(original)
        # Planted duplicates, on another site so they land in other shards.
        if rng.random() < spec.exact_dup_fraction:
            same_caption = rng.random() < 0.5
            rows.append(
                dict(
                    original,
                    site=(site + 1) % spec.content_sites,
                    path=f"/mirror/{image_id:06d}.{EXT[fmt]}",
                    behaviour="image",
                    caption=caption if same_caption else caption_for(rng, "en", colour, shape, bg, position),
                    language=lang if same_caption else "en",
                    dup_kind="exact",
                    expected_status="success",
                )
            )
        if rng.random() < spec.near_dup_fraction:
            variant = rng.choice(("reencode", "resize", "crop"))
            if variant == "resize":
                near = img.resize(
                    (max(32, int(img.width * 0.8)), max(32, int(img.height * 0.8))), Image.Resampling.BICUBIC
                )
            elif variant == "crop":
                dx, dy = max(1, img.width // 60), max(1, img.height // 60)
                near = img.crop((dx, dy, img.width - dx, img.height - dy))
            else:
                near = img
            data = encode(near, "jpeg", quality=rng.randint(45, 70))
            near_name = add_file(f"{image_id:06d}-near-{variant}.jpg", data)
            rows.append(
                dict(
                    original,
                    site=(site + 2) % spec.content_sites,
                    path=f"/variants/{image_id:06d}-{variant}.jpg",
                    behaviour="image",
                    file=near_name,
                    content_type="image/jpeg",
                    dup_kind="near",
                    expected_status="success",
                    caption=caption_for(rng, "en", colour, shape, bg, position),
                    language="en",
                )
            )

    if spec.faults:
        base_img = render([spec.seed, 2], "blue", "circle", "plain", (160, 120), "centre")
        bad = _bad_files(random.Random(spec.seed + 1), base_img)
        for n, (behaviour, expected) in enumerate(FAULT_BEHAVIOURS.items()):
            site = spec.content_sites if behaviour == "robots_5xx" else 0
            file = None
            content_type = "image/jpeg"
            if behaviour in bad:
                data, content_type = bad[behaviour]
                file = add_file(f"fault-{behaviour}.bin", data)
            elif behaviour != "refused":
                file = "fault-base.jpg"
                (root / "files" / file).write_bytes(encode(base_img, "jpeg"))
            path = f"/private/fault-{behaviour}.jpg" if behaviour == "robots_disallowed" else f"/fault/{behaviour}.jpg"
            valid = expected == "success"
            rows.append(
                dict(
                    site=site,
                    path=path,
                    behaviour=behaviour,
                    file=file,
                    content_type=content_type,
                    caption="a blue circle" if valid else f"fault case {behaviour}",
                    language="en" if valid else None,
                    colour="blue" if valid else None,
                    shape="circle" if valid else None,
                    label="blue circle" if valid else None,
                    image_id=-1 - n,
                    dup_kind=None,
                    expected_status=expected,
                )
            )

    pq.write_table(pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), root / "catalog.parquet")
    _write_heldout(root / "heldout", spec)
    (root / "spec.json").write_text(json.dumps(spec.to_json(), indent=1, sort_keys=True))
    return root


def _write_heldout(root: Path, spec: WebSpec) -> None:
    """Held-out labelled images in image-folder layout, drawn from a separate seed stream."""
    rng = random.Random(spec.seed + 999_983)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(spec.heldout):
        colour, shape = classes[i % len(classes)]  # balanced classes
        bg, position = rng.choice(BACKGROUNDS), rng.choice(_POSITIONS)
        w = rng.randint(spec.min_side, spec.max_side)
        img = render([spec.seed, 1, i], colour, shape, bg, (w, w), position)
        folder = f"{colour}_{shape}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        rel = f"{folder}/{i:05d}.jpg"
        img.save(root / rel, "JPEG", quality=90)
        rows.append(
            dict(
                file=rel,
                label=class_name(colour, shape),
                colour=colour,
                shape=shape,
                caption=caption_for(rng, "en", colour, shape, bg, position),
            )
        )
    schema = pa.schema([(k, pa.string()) for k in ("file", "label", "colour", "shape", "caption")])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "labels.parquet")
