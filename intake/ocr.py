"""The OCR signal of the legibility check: the Tesseract 5 command line, run on a small crop.

The picture goes to ``tesseract`` through stdin as PNG bytes and the TSV comes back on stdout:
no plaintext of a patient's record touches the disk. ``OMP_THREAD_LIMIT=1`` is always set (on
2 vCPU the OpenMP default made OCR ~7x slower, 14.8 s instead of 2.2 s per 12 MP page).

When the engine or its language data are missing, `read` returns None, and when no reading
finishes within the time limits (`limits.OCR_TIMEOUT_S`, `limits.OCR_BUDGET_S`: a busy machine)
it returns []; either way the verdict rests on the fast screen alone (the image check then adds
the info finding ``ocr_unavailable``).
Install them with ``scripts/system-packages.sh`` (Debian ``tesseract-ocr`` and language packs).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from intake import limits

# Engine settings of every reading (keyed on by the bench's cache of readings). The sample is a
# block of text lines: read as one block (6), not with page layout analysis (3), which on a
# noisy picture now and then finds no text at all in lines a person reads at a glance.
PSM = 6
CONFIG = ("-c", "tessedit_do_invert=0")
# The languages read (`available_languages` keeps those installed, in this order).
LANGUAGES = ("eng", "chi_sim", "tha", "rus")
# Finding the script: a small probe is read in this order (cheapest and likeliest first; the
# Chinese model is the slowest, most of all on text that is not Chinese), stopping at the
# first reading of at least `PROBE_MIN_CHARS` characters at `PROBE_CONF` or more.
PROBE_ORDER = ("eng", "tha", "chi_sim", "rus")
PROBE_CONF = 80.0
PROBE_MIN_CHARS = 8
# Languages the whole sample is read in, likeliest first, even when the probe read nothing
# anywhere: reading all four then changed none of the bench's figures (its 210 pages, every
# script, both halves), and a blurred photo costs two readings, not four.
MAX_FULL_READINGS = 2


@dataclass(frozen=True)
class OcrResult:
    confidence: float  # mean word confidence 0..100, weighted by characters; 0 when no words
    words: int
    chars: int
    language: str
    strong: float = 0.0  # share of the characters in words read at >= `limits.OCR_STRONG_WORD`


@functools.cache
def tesseract_path() -> str | None:
    return shutil.which("tesseract")


@functools.cache
def available_languages() -> tuple[str, ...]:
    """The wanted languages whose data is installed, in `LANGUAGES` order (empty: no OCR)."""
    exe = tesseract_path()
    if exe is None:
        return ()
    try:
        out = subprocess.run(  # noqa: S603 - fixed arguments
            [exe, "--list-langs"],
            capture_output=True,
            timeout=10,
            env=_env(),
            check=False,
        ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return ()
    have = {line.strip() for line in out.splitlines()}
    return tuple(lang for lang in LANGUAGES if lang in have)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "TESSDATA_PREFIX", "LANG")}
    env["OMP_THREAD_LIMIT"] = "1"
    return env


def _png(grey: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def parse_tsv(tsv: str, width: int, height: int, edge: int = 2) -> tuple[float, int, int, float]:
    """(character-weighted mean confidence, words, characters, share of the characters in words
    read with a confidence of at least `limits.OCR_STRONG_WORD`) of the word rows.

    Words touching the crop's edge are left out: a crop cuts words in half, and half a word is
    read with a low confidence that says nothing about the picture.
    """
    total_conf = 0.0
    words = chars = strong = 0
    for line in tsv.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) < 12 or cols[0] != "5":
            continue
        text = cols[11].strip()
        try:
            left, top, w, h = (int(c) for c in cols[6:10])
            conf = float(cols[10])
        except ValueError:
            continue
        if not text or conf < 0:
            continue
        if left <= edge or top <= edge or left + w >= width - edge or top + h >= height - edge:
            continue
        n = sum(1 for c in text if c.isalnum()) or len(text)
        total_conf += conf * n
        words += 1
        chars += n
        strong += n if conf >= limits.OCR_STRONG_WORD else 0
    if not chars:
        return 0.0, 0, 0, 0.0
    return total_conf / chars, words, chars, strong / chars


def run_tesseract(
    grey: np.ndarray, language: str, *, psm: int = PSM, timeout: float = limits.OCR_TIMEOUT_S
) -> str | None:
    """TSV of one grey picture; None when the engine is missing, fails or did not finish in
    ``timeout`` (a reading not made is no evidence either way: on a busy machine a readable
    page can take that long, so the verdict must not read a timeout as "nothing legible")."""
    exe = tesseract_path()
    if exe is None:
        return None
    cmd = [exe, "stdin", "stdout", "-l", language, "--psm", str(psm)]
    cmd += [*CONFIG, "tsv"]
    try:
        proc = subprocess.run(  # noqa: S603 - fixed arguments, the image comes through stdin
            cmd,
            input=_png(grey),
            capture_output=True,
            timeout=timeout,
            env=_env(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # TimeoutExpired among them
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace")


def reading(grey: np.ndarray, language: str, *, timeout: float) -> OcrResult | None:
    """One language's reading of a grey picture (`parse_tsv`); None when the engine failed."""
    tsv = run_tesseract(grey, language, timeout=timeout)
    if tsv is None:
        return None
    height, width = grey.shape
    conf, words, chars, strong = parse_tsv(tsv, width, height)
    return OcrResult(conf, words, chars, language, strong)


def found(probe: OcrResult) -> bool:
    """Does this probe reading name the script (its language's model reads it confidently)?"""
    return probe.chars >= PROBE_MIN_CHARS and probe.confidence >= PROBE_CONF


def script_order(probe: np.ndarray, languages: tuple[str, ...], deadline: float) -> list[str]:
    """The languages most likely first, from readings of the small ``probe`` picture in each
    (`PROBE_ORDER`, cheapest and likeliest first) until one reads it confidently: then the
    script is found, and the last probe reading is its language's."""
    order = [lang for lang in PROBE_ORDER if lang in languages]
    order += [lang for lang in languages if lang not in order]
    probes: list[OcrResult] = []
    for lang in order:
        left = min(limits.OCR_TIMEOUT_S, deadline - time.monotonic())
        if left <= 0.2:
            break
        result = reading(probe, lang, timeout=left)
        if result is None:
            continue
        probes.append(result)
        if found(result):
            break
    score = {r.language: r.confidence if r.chars >= PROBE_MIN_CHARS else 0.0 for r in probes}
    ranked = sorted(order, key=lambda lang: -score.get(lang, -1.0))  # stable: unread ones last
    return ranked


def read(
    grey: np.ndarray,
    languages: tuple[str, ...] | None = None,
    *,
    enough: Callable[[OcrResult], bool] | None = None,
    budget: float | None = None,
    probe: np.ndarray | None = None,
) -> list[OcrResult] | None:
    """OCR of a grey crop in each language, until ``enough`` says a reading settles the question
    (the page reads in that language) or the time ``budget`` is spent (default
    `limits.OCR_BUDGET_S`). With a ``probe`` (a
    small part of the crop) the script is looked for first (`script_order`) and the crop is
    read in the likeliest language first, and in at most `MAX_FULL_READINGS` languages: a Thai
    page costs a few small readings and one full one, not three full ones, and a page no
    language reads costs two full ones, not four.
    Returns the readings of the crop, in order, up to the first that did not finish in time
    ([] when none did; None when OCR is unavailable)."""
    langs = available_languages() if languages is None else languages
    if not langs:
        return None
    deadline = time.monotonic() + (limits.OCR_BUDGET_S if budget is None else budget)
    order = list(langs)
    if probe is not None and len(langs) > 1:
        order = script_order(probe, langs, deadline)[:MAX_FULL_READINGS]
    results: list[OcrResult] = []
    for lang in order:
        left = min(limits.OCR_TIMEOUT_S, deadline - time.monotonic())
        if left <= 0.2:
            break
        result = reading(grey, lang, timeout=left)
        if result is None:
            # Not read in time (or the engine failed): the languages after it are less likely,
            # and their readings alone would call a page in this one unreadable.
            break
        results.append(result)
        if enough is not None and enough(result):
            break
    return results
