"""Real multilingual text whose language is known: the translations in Debian's gettext catalogues.

Every Debian system carries compiled message catalogues under
/usr/share/locale/LANG/LC_MESSAGES/*.mo, written by human translators. The
translated strings (msgstr) are in the catalogue's language and the source
strings (msgid) are English, so they make an offline, labelled test set for
language identification that is not our own synthetic captions. Used by the
language-filter tests and bench/langid.py.
"""

from __future__ import annotations

import gettext
import random
import re
from pathlib import Path

LOCALE_DIR = Path("/usr/share/locale")
# locale directory -> langdetect code, for the languages langdetect knows
LOCALES = {
    "af": "af", "ar": "ar", "bg": "bg", "bn": "bn", "ca": "ca", "cs": "cs", "cy": "cy", "da": "da", "de": "de",
    "el": "el", "es": "es", "et": "et", "fa": "fa", "fi": "fi", "fr": "fr", "gu": "gu", "he": "he", "hi": "hi",
    "hr": "hr", "hu": "hu", "id": "id", "it": "it", "ja": "ja", "kn": "kn", "ko": "ko", "lt": "lt", "lv": "lv",
    "mk": "mk", "ml": "ml", "mr": "mr", "nb": "no", "ne": "ne", "nl": "nl", "pa": "pa", "pl": "pl", "pt": "pt",
    "pt_BR": "pt", "ro": "ro", "ru": "ru", "sk": "sk", "sl": "sl", "sq": "sq", "sv": "sv", "ta": "ta", "te": "te",
    "th": "th", "tr": "tr", "uk": "uk", "ur": "ur", "vi": "vi", "zh_CN": "zh-cn", "zh_TW": "zh-tw",
}  # fmt: skip
MARKUP = re.compile(r"%[-+ #0-9.]*[a-zA-Z]|%\([^)]*\)[a-z]|\{[^}]*\}|<[^>]*>|\$\{?\w+\}?|[_&](?=\w)|\\[nt]")


def _clean(text: str) -> str:
    return " ".join(MARKUP.sub(" ", text).split())


def load(min_words: int = 4, per_language: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """(text, language) pairs: up to `per_language` translations of at least `min_words` words per language,
    plus as many English source strings; deterministic for a seed. Empty where no catalogues exist."""
    rng = random.Random(seed)
    found: dict[str, set[str]] = {}
    english: set[str] = set()
    for locale, lang in sorted(LOCALES.items()):
        for mo in sorted((LOCALE_DIR / locale / "LC_MESSAGES").glob("*.mo")):
            if mo.name.startswith(("iso_", "iso-")):
                continue  # country/language-name lists: single proper nouns, not sentences
            try:
                with open(mo, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            for msgid, msgstr in catalog.items():
                if isinstance(msgid, tuple):
                    msgid = msgid[0]
                if not msgid or not msgstr or msgid == msgstr:
                    continue
                text, source = _clean(msgstr), _clean(msgid)
                if len(text.split()) >= min_words or (lang in ("ja", "zh-cn", "zh-tw", "th") and len(text) >= 8):
                    found.setdefault(lang, set()).add(text)
                if len(source.split()) >= min_words:
                    english.add(source)
    found["en"] = english
    pairs = []
    for lang in sorted(found):
        texts = sorted(found[lang])
        rng.shuffle(texts)
        pairs.extend((t, lang) for t in texts[:per_language])
    return pairs
