"""A cheap language guess from text: the script first, then a stop-word vote for Latin and
Cyrillic text. Good enough to tell what needs translation; not a general language detector."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_STOP_WORDS = {
    "en": "the and of to in is for with on that this are was by from at as be or not patient date",
    "es": "el la de que y en los las del se por con para una un es al paciente fecha",
    "id": "dan yang di ke dari untuk dengan ini itu pada tidak adalah pasien tanggal dalam",
    "vi": "và của là có không các cho được trong với những này một người bệnh ngày",
    "ru": "и в не на что с по как для от из это или при пациент дата к у",
    "de": "der die und das ist nicht mit von für den dem auf patient datum",
    "fr": "le la les et des du une est pour dans avec sur patient date",
}
_STOP = {lang: set(words.split()) for lang, words in _STOP_WORDS.items()}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)

_SCRIPTS = (
    ("CJK", "zh"),
    ("HIRAGANA", "ja"),
    ("KATAKANA", "ja"),
    ("HANGUL", "ko"),
    ("THAI", "th"),
    ("ARABIC", "ar"),
    ("HEBREW", "he"),
    ("DEVANAGARI", "hi"),
    ("CYRILLIC", "cyrillic"),
    ("LATIN", "latin"),
)


def _script(char: str) -> str | None:
    try:
        name = unicodedata.name(char)
    except ValueError:
        return None
    for prefix, script in _SCRIPTS:
        if prefix in name:
            return script
    return None


def detect(text: str) -> str | None:
    """ISO 639-1 code (or a script name when the words do not tell), None without letters."""
    scripts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            script = _script(char)
            if script:
                scripts[script] += 1
    if sum(scripts.values()) < 20:
        return None
    if scripts["ja"] > 0.1 * scripts["zh"] and scripts["ja"] >= 10:
        return "ja"
    script, _ = scripts.most_common(1)[0]
    if script not in ("latin", "cyrillic"):
        return script
    words = [w.lower() for w in _WORD.findall(text)]
    candidates = ("ru",) if script == "cyrillic" else ("en", "es", "id", "vi", "de", "fr")
    votes = Counter({lang: sum(1 for w in words if w in _STOP[lang]) for lang in candidates})
    lang, hits = votes.most_common(1)[0]
    if script == "latin" and any(unicodedata.name(c, "").find("WITH HOOK") >= 0 for c in text):
        votes["vi"] += 5
        lang, hits = votes.most_common(1)[0]
    if hits >= 3:
        return lang
    return "ru" if script == "cyrillic" else "latin"
