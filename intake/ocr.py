"""The OCR signal of the legibility check: the Tesseract 5 command line, run on a small crop.

The picture goes to ``tesseract`` through stdin as PNG bytes and the TSV comes back on stdout:
no plaintext of a patient's record touches the disk. ``OMP_THREAD_LIMIT=1`` is always set (on
2 vCPU the OpenMP default made OCR ~7x slower, 14.8 s instead of 2.2 s per 12 MP page).

When the engine or its language data are missing, `read` returns None and the verdict rests on
the fast screen alone (the image check then adds the info finding ``ocr_unavailable``).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from intake import limits

# Engine settings of every reading (keyed on by the bench's cache of readings).
PSM = 3
CONFIG = ("-c", "tessedit_do_invert=0")
# Tried in this order; the reading stops at the first language that reads the page readably.
LANGUAGES = ("eng", "chi_sim", "tha", "rus")


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
    """TSV of one grey picture; "" when it timed out (a crop that takes this long is noise, not
    text); None when the engine is missing or fails."""
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
    except subprocess.TimeoutExpired:
        return ""
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace")


def read(
    grey: np.ndarray,
    languages: tuple[str, ...] | None = None,
    *,
    enough: Callable[[OcrResult], bool] | None = None,
    budget: float = limits.OCR_BUDGET_S,
) -> list[OcrResult] | None:
    """OCR of a grey crop in each language, until ``enough`` says a reading settles the question
    (the page reads in that language) or the time ``budget`` is spent. The first language is
    read alone (most pages are in it), the others `limits.OCR_PARALLEL` at a time, so a Thai
    page costs two rounds, not three. Returns the readings made, in order ([] when none finished
    in time; None when OCR is unavailable)."""
    langs = available_languages() if languages is None else languages
    if not langs:
        return None
    height, width = grey.shape
    step = max(1, limits.OCR_PARALLEL)
    rounds = [langs[:1]] + [langs[i : i + step] for i in range(1, len(langs), step)]
    results: list[OcrResult] = []
    deadline = time.monotonic() + budget
    with ThreadPoolExecutor(step) as pool:
        for batch in rounds:
            left = min(limits.OCR_TIMEOUT_S, deadline - time.monotonic())
            if left <= 0.2:
                break
            tsvs = list(pool.map(lambda lang, t=left: run_tesseract(grey, lang, timeout=t), batch))
            settled = False
            for lang, tsv in zip(batch, tsvs, strict=True):
                if tsv is None:
                    continue
                conf, words, chars, strong = parse_tsv(tsv, width, height)
                result = OcrResult(conf, words, chars, lang, strong)
                results.append(result)
                settled = settled or (enough is not None and enough(result))
            if settled:
                break
    return results
