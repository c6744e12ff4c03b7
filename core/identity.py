"""Whose record is this: the patient's name and birth date against those inside a record.

Pure functions, no I/O. A name becomes one or more alternatives, each an unordered multiset of
ASCII tokens: case folded, diacritics stripped, DICOM component groups (``=``) as alternatives
and components (``^``) as tokens, Chinese through pypinyin (Mandarin, toneless), other scripts
through anyascii. Romanisation between scripts is irregular, so tokens written in different
scripts compare by a phonetic key (Cyrillic, Greek...) or a consonant skeleton (Thai, Arabic,
Hebrew) rather than by equality. A missing middle name or an initial still matches; a different
given name under the same family name does not.

Only what a record states is a mismatch (a DICOM header, a labelled field in a PDF); a name that
simply does not appear is unknown. Limits: Han characters are read as Mandarin, so a Japanese
name typed in kanji or a Cantonese romanisation (CHAN for 陳) does not match; two-digit years
are not read.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from itertools import islice, permutations, product
from typing import Any, NamedTuple


class Match(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    UNKNOWN = "unknown"  # nothing to compare, or too little to tell


NAME_MISMATCH = "identity_name_mismatch"
BIRTH_DATE_MISMATCH = "identity_birth_date_mismatch"


@dataclass(frozen=True)
class IdentityEvidence:
    """What one record says about whose it is."""

    name: Match = Match.UNKNOWN
    birth_date: Match = Match.UNKNOWN

    def mismatch_codes(self) -> tuple[str, ...]:
        pairs = ((NAME_MISMATCH, self.name), (BIRTH_DATE_MISMATCH, self.birth_date))
        return tuple(code for code, found in pairs if found is Match.MISMATCH)


@dataclass(frozen=True)
class IdentityFinding:
    """A record that seems to be someone else's: which check, which source, which one of them."""

    code: str  # NAME_MISMATCH or BIRTH_DATE_MISMATCH
    source: str  # "dicom" or "pdf"
    index: int  # position in the summaries or texts given to `check_identity`


# --- scripts and tokens ------------------------------------------------------------------

_LATIN, _HAN, _THAI, _ABJAD, _OTHER = "latin", "han", "thai", "abjad", "other"
_SKELETAL = {_THAI, _ABJAD}  # written without (most) vowels: compare consonants only
_MAX_SPELLINGS = 64
_MAX_ALTERNATIVES = 64

_TITLES = {"mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "herr", "frau", "sra", "srta"}
_TITLES |= {"mme", "mlle", "jr", "sr", "md", "phd"}
_PLACEHOLDERS = {"anonymous", "anonymized", "anonymised", "anon", "unknown", "noname", "none"}
_PLACEHOLDERS |= {"null", "na", "nn", "xxx", "removed", "deidentified", "patient", "test"}


class _Lazy:
    """A pattern compiled on first use: compiling them all on import would cost ~15 ms."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern, self.flags = pattern, flags

    @functools.cached_property
    def rx(self) -> re.Pattern[str]:
        return re.compile(self.pattern, self.flags)


_THAI_TITLE = _Lazy(
    r"(?:(?<=\s)|^)(?:เด็กชาย|เด็กหญิง|นางสาว|น\.\s?ส\.|ด\.\s?ช\.|ด\.\s?ญ\.|นาง|นาย)\s*(?=[ก-ฮ])",
    re.M,
)
_THAI_SILENT = _Lazy("[ก-ฮ][ิ-ุ]?์")  # a letter (and vowel) cancelled by thanthakhat
_THAI_MARKS = _Lazy("[็-๋ํ๎]")  # tone marks and the like
_THAI_LEADING = _Lazy("([เ-ไ])([ก-ฮ])")  # vowels written before the consonant they follow
_UMLAUTS = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue"})


@dataclass(frozen=True)
class _Token:
    spellings: frozenset[str]
    script: str

    @property
    def initial(self) -> bool:
        return self.script in (_LATIN, _OTHER) and all(len(s) == 1 for s in self.spellings)

    @functools.cached_property
    def keys(self) -> frozenset[str]:
        return frozenset(_key(s) for s in self.spellings)

    @functools.cached_property
    def skeletons(self) -> frozenset[str]:
        return frozenset(_skeleton(s) for s in self.spellings) - {""}

    @functools.cached_property
    def loose_skeletons(self) -> frozenset[str]:
        """Without r and l, often silent in Thai (ศรี Sri / Si, ฉัตร Chat), and tch as ch
        (Watchara / วัชร); too short to tell when under two consonants."""
        loose = (_collapse(s.replace("R", "").replace("L", "")) for s in self.skeletons)
        return frozenset(s for s in (_collapse(s.replace("TC", "C")) for s in loose) if len(s) > 1)


class _Alt(NamedTuple):
    tokens: tuple[_Token, ...]
    exact: bool = False  # Chinese syllables one by one: every token must be accounted for
    joined: bool = False  # neighbours joined into one token (Jean Pierre: jeanpierre)


@functools.cache
def _anyascii() -> Callable[[str], str]:
    from anyascii import anyascii

    return anyascii


def _script(char: str) -> str:
    o = ord(char)
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
        return _HAN
    if 0x20000 <= o <= 0x3134F:
        return _HAN
    if 0x0E00 <= o <= 0x0E7F:
        return _THAI
    if 0x0590 <= o <= 0x08FF or 0xFB1D <= o <= 0xFDFF or 0xFE70 <= o <= 0xFEFF:
        return _ABJAD
    if o < 0x250 or 0x1E00 <= o <= 0x1EFF:
        return _LATIN
    return _OTHER


def _runs(text: str) -> Iterator[tuple[str, str]]:
    """(script, run) for each run of letters in one script; marks stay with their letter."""
    script: str | None = None
    start = 0
    for i, char in enumerate(text):
        category = unicodedata.category(char)[0]
        if category == "M" and script is not None:
            continue
        now = _script(char) if category == "L" else None
        if now == script:
            continue
        if script is not None:
            yield script, text[start:i]
        script, start = now, i
    if script is not None:
        yield script, text[start:]


def _fold(text: str, script: str) -> str:
    """ASCII letters only: diacritics stripped (Latin) or transliterated (anything else)."""
    text = text.casefold()
    greek = script == _OTHER and any("\u0370" <= c <= "\u03ff" for c in text)
    if script == _LATIN or greek:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
    if greek:  # ου is u (Papadopoulou), which anyascii writes oy
        text = text.replace("ου", "ou")
    if not text.isascii():
        text = _anyascii()(text)
    return "".join(c for c in text.lower() if "a" <= c <= "z")


def _word(script: str, run: str) -> _Token | None:
    """One token from a run of letters that is not Chinese."""
    if script == _THAI:
        run = _THAI_SILENT.rx.sub("", run)
        run = _THAI_LEADING.rx.sub(r"\2\1", _THAI_MARKS.rx.sub("", run))
    spellings = {_fold(run, script)}
    if script == _LATIN and any(c in run.casefold() for c in "äöü"):
        spellings.add(_fold(run.casefold().translate(_UMLAUTS), script))  # Müller: Mueller
    spellings.discard("")
    return _Token(frozenset(spellings), script) if spellings else None


# Family names read otherwise than the character's usual reading (单 is dan, the family Shan).
_SURNAMES = {"单": "shan", "曾": "zeng", "区": "ou", "仇": "qiu", "解": "xie", "朴": "piao"}
_SURNAMES |= {"查": "zha", "盖": "ge", "繁": "po", "乐": "yue", "覃": "qin", "翟": "zhai"}
_SURNAMES |= {"种": "chong", "秘": "bi", "召": "shao", "缪": "miao", "尉": "yu", "柏": "bai"}
_SURNAMES |= {"员": "yun", "重": "chong"}


@functools.lru_cache(maxsize=8192)
def _readings(char: str) -> frozenset[str]:
    """A Han character's usual reading (and its reading as a family name), toneless; ü as v,
    u and yu (LV, LU, LYU for 吕)."""
    from pypinyin import Style, pinyin

    readings = {_fold(r, _LATIN) for (r, *_) in pinyin(char, style=Style.NORMAL)}
    readings = (readings | {_SURNAMES.get(char, "")}) - {""} or {_fold(char, _OTHER)}
    readings |= {r.replace("v", u) for r in readings if "v" in r for u in ("u", "yu")}
    return frozenset(readings - {""})


def _syllables(run: str) -> tuple[frozenset[str], ...]:
    return tuple(r for r in map(_readings, run) if r)


def _join(parts: Iterable[_Token]) -> _Token:
    parts = list(parts)
    combos = islice(product(*(sorted(p.spellings) for p in parts)), _MAX_SPELLINGS)
    return _Token(frozenset("".join(c) for c in combos), parts[0].script)


def _han(syllables: tuple[frozenset[str], ...], alone: bool) -> list[list[_Token]]:
    """Ways to read a run of Chinese: whole, or family name then given name when it stands
    alone (王小明: wang xiaoming; 欧阳小明: ouyang xiaoming)."""
    units = [_Token(s, _HAN) for s in syllables]
    ways = [[_join(units)]]
    if alone:
        ways += [[_join(units[:k]), _join(units[k:])] for k in (1, 2) if len(units) > k]
    return ways


def _compositions(tokens: list[_Token]) -> Iterator[tuple[_Token, ...]]:
    """The tokens, and with neighbours of one script joined: Jean Pierre / Jeanpierre,
    Xiao Ming / Xiaoming."""
    n = len(tokens)
    for mask in range(1 << (n - 1) if 1 < n <= 6 else 1):
        out, current = [], [tokens[0]]
        for i in range(1, n):
            token = tokens[i]
            if mask >> (i - 1) & 1:
                if token.script != current[0].script or token.initial or current[-1].initial:
                    break
                current.append(token)
            else:
                out.append(_join(current) if len(current) > 1 else current[0])
                current = [token]
        else:
            out.append(_join(current) if len(current) > 1 else current[0])
            yield tuple(out)


def _unmojibake(text: str) -> str | None:
    """UTF-8 read as Latin-1 (a DICOM header without its character set), read again."""
    if text.isascii() or any(ord(c) > 0xFF for c in text):
        return None
    try:
        fixed = text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None
    return fixed if fixed != text else None


def _alternatives(name: str) -> tuple[_Alt, ...]:
    texts = [name, _unmojibake(name) or ""]
    groups = [g for t in texts for g in unicodedata.normalize("NFKC", t).split("=")]
    found: dict[str, _Alt] = {}
    for raw in groups:
        group = _THAI_TITLE.rx.sub("", raw.replace("^", " "))
        runs = list(_runs(group))
        words: list[list[list[_Token]]] = []
        syllables: list[_Token] = []  # the exact reading: every Chinese syllable a token
        for script, run in runs:
            if script == _HAN:
                readings = _syllables(run)
                if readings:
                    words.append(_han(readings, alone=len(runs) == 1))
                    syllables += [_Token(s, _HAN) for s in readings]
                continue
            token = _word(script, run)
            if token is not None and not token.spellings <= _TITLES:
                words.append([[token]])
                syllables.append(token)
        if all(t.spellings <= _PLACEHOLDERS for w in words for t in w[0]):
            continue  # nothing, or ANONYMOUS^PATIENT
        tokens = ([t for part in way for t in part] for way in product(*words))
        alts = [_Alt(c, joined=len(c) < len(t)) for t in tokens for c in _compositions(t)]
        if len(syllables) > len(words):
            alts.append(_Alt(tuple(syllables), exact=True))
        for alt in alts:
            key = repr((alt.exact, sorted((sorted(t.spellings), t.script) for t in alt.tokens)))
            found.setdefault(key, alt)
    return tuple(islice(found.values(), _MAX_ALTERNATIVES))


def name_keys(name: str) -> set[tuple[str, ...]]:
    """Comparable forms of a name: sorted token tuples, one per reading and spelling
    ("王小明": ("wang", "xiaoming"), ("ming", "wang", "xiao"), ("wangxiaoming",)...)."""
    keys = set()
    for alt in _alternatives(name or ""):
        spellings = islice(product(*(sorted(t.spellings) for t in alt.tokens)), 16)
        keys |= {tuple(sorted(combo)) for combo in spellings}
    return keys


# --- comparing tokens --------------------------------------------------------------------

_NONE, _INITIAL, _FULL = 0, 1, 2
_SKELETON_UNIT = _Lazy(r"tch|ch|sh|kh|ph|th|ng|bp|[a-z]")
_SKELETON_CLASS = {"tch": "TC", "ch": "C", "sh": "C", "j": "C", "kh": "K", "k": "K", "g": "K"}
_SKELETON_CLASS |= {"c": "K", "q": "K", "ph": "P", "bp": "P", "p": "P", "b": "P", "th": "T"}
_SKELETON_CLASS |= {"t": "T", "d": "T", "ng": "G", "f": "F", "v": "F", "s": "S", "z": "S"}
_SKELETON_CLASS |= {"x": "S", "m": "M", "n": "N", "r": "R", "l": "L"}
_KEY_RULES = [
    (_Lazy(pattern), replacement)
    for pattern, replacement in (
        ("x", "ks"),
        ("shch|sch", "Q"),
        ("tch|ch", "C"),
        ("kh", "H"),
        ("zh", "Z"),
        ("ts|tz|tc", "Z"),
        ("[yij]u", "U"),
        ("[yij]a", "A"),
        ("[yij]o", "O"),
        ("[yij]e", "E"),
        ("(?:iy|ii|yy|yi|ij|y)$", "I"),
        ("oy|ou", "U"),
        ("[yj]", "i"),
        ("w", "v"),
        ("ff$", "v"),
        (r"(.)\1+", r"\1"),
    )
]


def _collapse(classes: str) -> str:
    return "".join(c for i, c in enumerate(classes) if i == 0 or classes[i - 1] != c)


def _skeleton(spelling: str, final: bool = True) -> str:
    """Consonant classes of a romanised Thai (or Arabic...) word: somchai / สมชาย -> SMC."""
    units = _SKELETON_UNIT.rx.findall(spelling.replace("rn", "r"))
    out = _collapse("".join(_SKELETON_CLASS.get(unit, "") for unit in units))
    if final and out[-1:] in ("R", "L"):  # a final r or l is said n: Kamol / Kamon
        out = _collapse(out[:-1] + "N")
    return out


def _key(spelling: str) -> str:
    """A phonetic key for romanised Cyrillic, Greek...: Yuriy, Iurii, Yury -> uri."""
    for pattern, replacement in _KEY_RULES:
        spelling = pattern.rx.sub(replacement, spelling)
    return spelling.lower()


def _same(a: _Token, b: _Token) -> int:
    """_FULL when two tokens can be one name, _INITIAL when one is the other's initial."""
    if a.initial or b.initial:
        short, other = (a, b) if a.initial else (b, a)
        letters = {s[0] for s in other.spellings}
        return _INITIAL if short.spellings & letters else _NONE
    if a.spellings & b.spellings:
        return _FULL
    if a.script == b.script or _HAN in (a.script, b.script):
        return _NONE  # one script, or pinyin: spelled alike or not the same name
    if a.script in _SKELETAL or b.script in _SKELETAL:
        close = a.skeletons & b.skeletons or a.loose_skeletons & b.loose_skeletons
        return _FULL if close else _NONE
    return _FULL if a.keys & b.keys else _NONE


_Same = Callable[[_Token, _Token], int]


def _assign(short: tuple[_Token, ...], long: tuple[_Token, ...], same: _Same) -> int:
    """Best strength of matching every token of `short` to its own token of `long`."""
    grid = [[same(s, t) for t in long] for s in short]

    def walk(i: int, used: frozenset[int], full: bool) -> int:
        if i == len(short):
            return _FULL if full else _INITIAL
        best = _NONE
        for j, strength in enumerate(grid[i]):
            if strength and j not in used:
                best = max(best, walk(i + 1, used | {j}, full or strength == _FULL))
                if best == _FULL:
                    break
        return best

    return walk(0, frozenset(), False)


def _compare(x: _Alt, y: _Alt, same: _Same) -> Match:
    short, long = (x, y) if len(x.tokens) <= len(y.tokens) else (y, x)
    if (x.exact or y.exact) and len(short.tokens) != len(long.tokens):
        return Match.MISMATCH
    strength = _assign(short.tokens, long.tokens, same)
    if strength == _NONE:
        return Match.MISMATCH
    if strength == _INITIAL or len(short.tokens) < min(2, len(long.tokens)):
        # Initials only, or one name of several: too little to tell (unless that one token is
        # a whole name joined up, which only a whole name can match).
        return Match.MISMATCH if short.joined else Match.UNKNOWN
    return Match.MATCH


def compare_names(patient: str, found: str) -> Match:
    """MATCH when `found` can be the patient's name (order, case, diacritics, script,
    a missing middle name and initials tolerated); UNKNOWN when either is empty or says too
    little; MISMATCH otherwise."""
    ours, theirs = _alternatives(patient or ""), _alternatives(found or "")
    if not ours or not theirs:
        return Match.UNKNOWN
    same = functools.cache(_same)  # a local memo: no name outlives the call
    results = set()
    for x in ours:
        for y in theirs:
            result = _compare(x, y, same)
            if result is Match.MATCH:
                return result
            results.add(result)
    return Match.UNKNOWN if Match.UNKNOWN in results else Match.MISMATCH


# --- dates -------------------------------------------------------------------------------

_MONTH_NAMES = {
    1: "january jan janvier janv enero ene januar jän janeiro январь января янв มกราคม ม.ค.",
    2: "february feb février fevrier févr fevr fév fev febrero februar fevereiro февраль "
    "февраля фев กุมภาพันธ์ ก.พ.",
    3: "march mar mars marzo märz marz mär mrz março marco март марта มีนาคม มี.ค.",
    4: "april apr avril avr abril abr апрель апреля апр เมษายน เม.ย.",
    5: "may mai mayo maio май мая พฤษภาคม พ.ค.",
    6: "june jun juin junio juni junho июнь июня июн มิถุนายน มิ.ย.",
    7: "july jul juillet juil julio juli julho июль июля июл กรกฎาคม ก.ค.",
    8: "august aug août aout agosto ago август августа авг สิงหาคม ส.ค.",
    9: "september sept sep septembre septiembre setiembre setembro set сентябрь сентября "
    "сент сен กันยายน ก.ย.",
    10: "october oct octobre octubre oktober okt outubro out октябрь октября окт ตุลาคม ต.ค.",
    11: "november nov novembre noviembre novembro ноябрь ноября ноя พฤศจิกายน พ.ย.",
    12: "december dec décembre decembre déc diciembre dic dezember dez dezembro декабрь "
    "декабря дек ธันวาคม ธ.ค.",
}
_MONTHS = {word: month for month, words in _MONTH_NAMES.items() for word in words.split()}
_MONTH = "(?:" + "|".join(re.escape(w) for w in sorted(_MONTHS, key=len, reverse=True)) + ")"
_MONTH_RE = rf"(?<![^\W\d_])(?P<mon{{n}}>{_MONTH})\.?(?![^\W\d_])"
_DATE = _Lazy(
    "|".join(
        (
            r"(?<!\d)(?P<y1>\d{4})\s*[-/.年년]\s*(?P<m1>\d{1,2})\s*[-/.月월]\s*(?P<d1>\d{1,2})(?!\d)",
            r"(?<!\d)(?P<d2>\d{1,2})\s*[-/.]\s*(?P<m2>\d{1,2})\s*[-/.]\s*(?P<y2>\d{4})(?!\d)",
            r"(?<!\d)(?P<d3>\d{1,2})(?:st|nd|rd|th|er)?[\s.,/-]*(?:de\s+)?"
            + _MONTH_RE.format(n=3)
            + r"[\s.,/-]*(?:de\s+|[พค]\.\s?ศ\.\s*)?(?P<y3>\d{4})(?!\d)",
            _MONTH_RE.format(n=4) + r"\s*(?P<d4>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y4>\d{4})(?!\d)",
        )
    ),
    re.I,
)
_COMPACT = _Lazy(r"(?<!\d)(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})(?!\d)")  # DICOM DA


def _day(year: int, month: int, day: int) -> date | None:
    if year > 2400:  # Thai Buddhist era: 2523 is 1980
        year -= 543
    if not 1850 <= year <= 2200:
        return None
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _candidates(m: re.Match[str]) -> list[date]:
    """The dates a match can mean, the likeliest first (day before month unless impossible)."""
    g = m.groupdict()
    if g.get("y") is not None:
        found = [_day(int(g["y"]), int(g["m"]), int(g["d"]))]
    elif g["y1"] is not None:
        found = [_day(int(g["y1"]), int(g["m1"]), int(g["d1"]))]
    elif g["y2"] is not None:
        first, second, year = int(g["d2"]), int(g["m2"]), int(g["y2"])
        found = [_day(year, second, first), _day(year, first, second)]
    else:
        n = 3 if g["y3"] is not None else 4
        month = _MONTHS[g[f"mon{n}"].casefold()]
        found = [_day(int(g[f"y{n}"]), month, int(g[f"d{n}"]))]
    return list(dict.fromkeys(d for d in found if d is not None))


def _dates(text: str, compact: bool) -> Iterator[tuple[int, list[date]]]:
    """(where, the dates it can mean) for each date in the text, in order."""
    matches = list(_DATE.rx.finditer(text))
    if compact:
        matches += _COMPACT.rx.finditer(text)
    for m in sorted(matches, key=lambda m: m.start()):
        found = _candidates(m)
        if found:
            yield m.start(), found


def parse_date(text: str) -> date | None:
    """The first date in `text`: DICOM DA (19800131), ISO, 31.01.1980, 31/01/1980 (day first
    unless impossible), 1980年1月31日, 31 Jan 1980, January 31, 1980, Thai Buddhist years."""
    return next((found[0] for _, found in _dates(text or "", compact=True)), None)


def compare_dates(patient: date | None, found: date | None) -> Match:
    if patient is None or found is None:
        return Match.UNKNOWN
    return Match.MATCH if patient == found else Match.MISMATCH


# --- free text ---------------------------------------------------------------------------

_L, _R = r"(?<![^\W\d_])", r"(?![^\W\d_])"  # not inside a word
_NAME_LABELS = (  # (pattern, whether it must start a field: "Name:" after "Doctor" is not ours)
    (
        _L + r"(?:patient'?s?\s+(?:full\s+)?name|name\s+of\s+(?:the\s+)?patient|pt\.?\s+name"
        r"|patientenname|patient(?:e|in)?|nombre\s+del\s+paciente|nombre\s+y\s+apellidos?"
        r"|apellidos?\s+y\s+nombres?|paciente|nom\s+du\s+patient|nom\s+et\s+pr[ée]noms?"
        r"|nome\s+do\s+paciente|ф\.?\s?и\.?\s?о\.?(?:\s+пациента)?"
        r"|фамилия,?\s+имя,?\s+отчество|пациент(?:ка)?)\s*:",
        False,
    ),
    (_L + r"(?:full\s+name|name|nombre|nome|nom)\s*:", True),
    (
        r"(?:患者姓名|病人姓名|姓名|患者氏名|氏名|환자\s*성명|성명|이름|ชื่อ\s*-\s*(?:นาม)?สกุล"
        r"|ชื่อ\s*ผู้ป่วย|(?<!ลง)ชื่อ(?!แพทย์|ผู้|เล่น|ยา|เสียง|โรง|สถาน|บริษัท|เรื่อง))"
        r"(?:\s*:|\s+|(?=นาย|นาง|น\.ส\.|ด\.[ชญ]\.|เด็ก))",
        False,
    ),
    (r"(?:患者|病人|ผู้ป่วย|환자)\s*:", False),
)
_NAME_LABEL_RES = tuple((_Lazy(p, re.I), field) for p, field in _NAME_LABELS)
_DOB_LABEL = _Lazy(
    _L + r"(?:d\.?\s?o\.?\s?b|date\s+of\s+birth|birth\s*date|fecha\s+de\s+nacimiento|f\.\s?nac"
    r"|fecha\s+nac|date\s+de\s+naissance|n[ée]e?\s+le|geburtsdatum|geb\.?\s?am|geb"
    r"|data\s+de\s+nascimento|data\s+di\s+nascita|дата\s+рождения|дата\s+рожд|д\.\s?р)"
    + _R
    + r"|出生日期|出生年月日|生年月日|出生年月|生日|วัน\s*/?\s*เดือน\s*/?\s*ปี\s*เกิด|วันเกิด|생년월일",
    re.I,
)
_VALUE_END = _Lazy(
    r"\d|[|;\t(\[]|\s{3,}|" + _L + r"[A-Za-zÀ-ɏЀ-ӿ][\w.'’/-]*\s*:"
    r"|性别|性別|年龄|年齢|出生|科室|床号|病历号|住院号|门诊号|电话|地址|성별|나이|생년월일"
    r"|เพศ|อายุ|วันเกิด|เลขที่|โรงพยาบาล|ที่อยู่"
)
_PROSE = {"the", "is", "was", "has", "had", "with", "and", "for", "who", "el", "los", "las"}
_PROSE |= {"es", "con", "die", "das", "ist", "mit", "und", "les", "est", "avec", "et", "old"}
_SLACK = 3  # other words allowed among a name's words in running text


def _starts_field(text: str, pos: int) -> bool:
    before = text[text.rfind("\n", 0, pos) + 1 : pos]
    stripped = before.rstrip(" ")
    return not stripped or not stripped[-1].isalpha() or before.endswith(("  ", "\t"))


def _labelled_names(text: str) -> Iterator[str]:
    """The values of fields labelled as the patient's name."""
    for pattern, field in _NAME_LABEL_RES:
        for m in pattern.rx.finditer(text):
            if field and not _starts_field(text, m.start()):
                continue
            end = text.find("\n", m.end())
            end = len(text) if end < 0 else end
            value = text[m.end() : end].strip()
            if not value:  # a table: the value on the next line
                value = text[end + 1 :].lstrip().split("\n", 1)[0].strip()
            cut = _VALUE_END.rx.search(value)
            value = value[: cut.start()] if cut else value
            words = [run for _, run in _runs(value)]
            if 0 < len(words) <= 6 and not any(w.casefold() in _PROSE for w in words):
                yield value


def _spans(token: _Token, units: list[_Token]) -> list[tuple[int, int, int]]:
    """Where `token` is in the text: (start, end, strength), end past the last unit; a
    pinyin token may cover several Chinese characters (xiaoming: 小明)."""

    def covers(rest: str, i: int, left: int) -> bool:
        if left == 0:
            return not rest
        if not rest or i >= len(units) or units[i].script != _HAN:
            return False
        return any(
            rest.startswith(s) and covers(rest[len(s) :], i + 1, left - 1)
            for s in units[i].spellings
        )

    found = []
    for i, unit in enumerate(units):
        strength = _same(token, unit)
        if strength:
            found.append((i, i + 1, strength))
        elif unit.script == _HAN and token.script != _THAI and not token.initial:
            for k in (2, 3, 4):
                if any(covers(s, i, k) for s in token.spellings):
                    found.append((i, i + k, _FULL))
                    break
        if len(found) >= 200:
            break
    return found


def _placed(spans: list[list[tuple[int, int, int]]]) -> bool:
    """Each token at its own place, all close together, one at least not an initial."""
    order = sorted(spans, key=len)

    def walk(k: int, used: list[tuple[int, int]], full: bool) -> bool:
        if k == len(order):
            return full
        for start, end, strength in order[k]:
            if any(start < e and s < end for s, e in used):
                continue
            lo = min([start] + [s for s, _ in used])
            hi = max([end] + [e for _, e in used])
            if hi - lo > end - start + sum(e - s for s, e in used) + _SLACK:
                continue
            if walk(k + 1, [*used, (start, end)], full or strength == _FULL):
                return True
        return False

    return walk(0, [], False)


def _in_units(alt: _Alt, where: Callable[[_Token], list[tuple[int, int, int]]]) -> bool:
    spans = [where(t) for t in alt.tokens]
    if _placed(spans):
        return True
    if alt.exact or len(spans) < 3:
        return False  # a middle name may be missing from the text, nothing else
    return any(_placed(spans[:i] + spans[i + 1 :]) for i in range(len(spans)))


def _in_thai(alt: _Alt, segments: list[str]) -> bool:
    """Thai is written without spaces between words: look for the whole name in a stretch."""
    tokens = alt.tokens
    if not segments or len(tokens) > 4 or any(t.script == _HAN or t.initial for t in tokens):
        return False
    thai = all(t.script == _THAI for t in tokens)
    skeletons = [_skeleton(s, final=False) for s in segments]
    for order in permutations(tokens):
        for combo in islice(product(*(sorted(t.spellings) for t in order)), 8):
            joined = "".join(combo)
            if thai and any(joined in s for s in segments):
                return True
            needle = _skeleton(joined, final=False)
            if not thai and len(needle) >= 4 and any(needle in s for s in skeletons):
                return True
    return False


def _name_appears(text: str, name: str) -> bool:
    units: list[_Token] = []
    segments: list[str] = []
    last_thai = -2
    for index, (script, run) in enumerate(_runs(text)):
        if script == _HAN:
            units += [_Token(s, _HAN) for s in _syllables(run)]
            continue
        token = _word(script, run)
        if token is None:
            continue
        units.append(token)
        if script == _THAI:
            if last_thai == index - 1:
                segments[-1] += next(iter(token.spellings))
            else:
                segments.append(next(iter(token.spellings)))
            last_thai = index
    where = functools.cache(lambda token: _spans(token, units))
    return any(_in_units(a, where) or _in_thai(a, segments) for a in _alternatives(name))


def _decide(labelled: Iterable[Match], appears: Callable[[], bool]) -> Match:
    """A labelled field decides (any one matching, else any one differing); otherwise the
    name or date merely appearing somewhere is a match, and its absence tells nothing."""
    seen = set(labelled)
    for result in (Match.MATCH, Match.MISMATCH):
        if result in seen:
            return result
    return Match.MATCH if appears() else Match.UNKNOWN


def _labelled_dates(text: str, birth_date: date) -> Iterator[Match]:
    """For each labelled birth date: the date right after the label against the patient's."""
    for m in _DOB_LABEL.rx.finditer(text):
        window = text[m.end() : m.end() + 40]
        start, found = next(_dates(window, compact=True), (0, []))
        if found and start <= 15 and not any(c.isdigit() for c in window[:start]):
            yield Match.MATCH if birth_date in found else Match.MISMATCH


def find_in_text(text: str, name: str, birth_date: date | None) -> IdentityEvidence:
    """What a record's free text (a PDF's, any script) says about the patient's name and
    birth date. Only a labelled field that differs ("Name:", "姓名", "DOB"...) is a mismatch."""
    text = unicodedata.normalize("NFKC", text or "").replace("\r\n", "\n").replace("\r", "\n")
    name_result = Match.UNKNOWN
    if _alternatives(name or ""):
        name_result = _decide(
            (compare_names(name, value) for value in _labelled_names(text)),
            lambda: _name_appears(text, name),
        )
    date_result = Match.UNKNOWN
    if birth_date is not None:
        date_result = _decide(
            _labelled_dates(text, birth_date),
            lambda: any(birth_date in found for _, found in _dates(text, compact=False)),
        )
    return IdentityEvidence(name_result, date_result)


def check_identity(
    patient_name: str,
    patient_birth_date: date | None,
    dicom_summaries: Iterable[Mapping[str, Any]] = (),
    pdf_texts: Iterable[str | None] = (),
) -> list[IdentityFinding]:
    """One finding per record whose name or birth date differs from the patient's: DICOM
    summaries (`patient_name`, `patient_birth_date` from the headers) and PDF texts."""

    @functools.cache  # the instances of a study repeat one header
    def header(name: str, birth_date: str) -> IdentityEvidence:
        return IdentityEvidence(
            compare_names(patient_name, name),
            compare_dates(patient_birth_date, parse_date(birth_date)),
        )

    def dicom(summary: Mapping[str, Any]) -> IdentityEvidence:
        fields = (summary.get("patient_name"), summary.get("patient_birth_date"))
        return header(*(str(f or "") for f in fields))

    sources = (
        ("dicom", map(dicom, dicom_summaries)),
        ("pdf", (find_in_text(t or "", patient_name, patient_birth_date) for t in pdf_texts)),
    )
    return [
        IdentityFinding(code, source, index)
        for source, evidence in sources
        for index, found in enumerate(evidence)
        for code in found.mismatch_codes()
    ]
