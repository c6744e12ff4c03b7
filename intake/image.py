"""Photos and images: decoded under a pixel budget, then judged for legibility in two steps.

1. The fast screen: cheap measures on a grey copy at most `ANALYSIS_LONG_SIDE` pixels long (JPEG
   uses Pillow's reduced `draft()` decode, ~25 ms at 12 MP). Before OCR it rejects only what no
   reading could overturn (far too small, black, flat, far out of focus: `screen_errors`), and
   it owns the geometric checks OCR is blind to: glare and text cut off at the edge.
2. The OCR signal (`intake.ocr`, Tesseract) decides the rest: the character-weighted mean word
   confidence and the share of characters in confidently read words, on a sample of about eight
   lines of the densest text scaled to lines Tesseract reads best, judged against each
   language's own calibrated thresholds (`OCR_READABLE`). One line of the sample is read first
   in each language until one reads it confidently (the script), so the whole sample is read
   once, in the right language. An unreadable picture is given the fast screen's likeliest
   cause (dark, blurred, washed out...) or `photo_unreadable`. Without Tesseract, or when no
   reading finishes in time, the fast screen's whole verdict stands (`screen_only_errors`).

The thresholds below are calibrated by ``bench/legibility_bench.py`` on the train split of the
labelled corpus (tests/intake/legibility_corpus.py) and reported on its held-out split.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import deque
from typing import Any, BinaryIO

import numpy as np
import pillow_heif  # HEIC/HEIF from iPhones
from PIL import Image, ImageOps

from intake import limits, ocr
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

pillow_heif.register_heif_opener()

Image.MAX_IMAGE_PIXELS = limits.MAX_IMAGE_PIXELS
Image.init()  # register every plugin before the allow-list is computed
_WANTED = ("JPEG", "PNG", "WEBP", "TIFF", "GIF", "HEIF", "AVIF", "MPO", "BMP")
FORMATS = [f for f in _WANTED if f in Image.OPEN] or None

# The fast screen's whole verdict, used when OCR is unavailable (measures at 1600 px).
FOCUS_REJECT = limits.SCREEN_FOCUS_REJECT  # noise-corrected Laplacian energy ratio, blurred ~1
FOCUS_MARGINAL = limits.SCREEN_FOCUS_MARGINAL
DARK_MEDIAN = 55  # median grey level of the page
LOW_CONTRAST = limits.SCREEN_LOW_CONTRAST  # p99.5 - p0.5 grey levels
WASHED_P05 = 200
GLARE_SHARE = 0.04  # largest blown-out blob, share of the picture
BLANK_INK = 0.002  # share of inked pixels below which a page is blank
BLANK_TEXT = 0.0005  # with OCR: share of text cells below which a picture of paper is blank
BLANK_PAPER = 0.5  # ... when at least this share of it is plain paper (a page, not a photo of
# something else) ...
BLANK_MARKS = 12.0  # ... with no smudge rising this many grey levels above the paper's noise
# (text blurred beyond strokes: 20-60; blank paper, sensor noise up to sigma 20: 0-8)
# Calibrated by `python bench/legibility_bench.py` (210 generated pages in Latin, Chinese and
# Thai): picked on the 105 train pages, every value inside its search grid; on the 105 held-out
# pages balanced accuracy 0.992 (Latin 1.000, Chinese 0.977, Thai 1.000; train 0.974).
# Before OCR: the floors no reading overturns (calibrated) ...
HARD_MIN_SIDE = 300  # shorter side in pixels
HARD_LOW_CONTRAST = 8  # p99.5 - p0.5 grey levels
HARD_FOCUS = 1.05  # focus measure
# ... and one product floor, not calibrated: a page with a median grey below this is too dark
# for a person on a phone, whatever the engine reads (it reads text 20 grey levels above black;
# the bench reports the readable corpus pages the floor rejects: none in the held-out half).
HARD_DARK_MEDIAN = 40
# The OCR verdict.
OCR_MIN_CHARS = 12  # fewer characters read than this is not a text sample worth judging
# Per language, the (character-weighted mean word confidence, share of the characters in words
# read at `limits.OCR_STRONG_WORD` or more) a reading must reach for the page to count as
# legible; legible when any language reaches its own (each engine model has its own scale).
OCR_READABLE: dict[str, tuple[float, float]] = {
    "eng": (55.0, 0.5),  # calibrated
    "chi_sim": (65.0, 0.7),  # calibrated
    "tha": (55.0, 0.85),  # calibrated: Thai's model reads noise at 50-60, the strong share tells
    "rus": (65.0, 0.5),  # not calibrated: no Cyrillic pages in the corpus
}
# Nothing read at all: unreadable when this share of the picture's cells hold text strokes on
# paper (text that did not read), or when less sharp than `NO_TEXT_FOCUS`. A sharp picture with
# no text (a photo of teeth) is not ours to refuse: the corpus has none (it would push both to
# refuse everything OCR reads nothing on), so neither is calibrated.
NO_TEXT_CELLS = 0.002  # a photo of shapes and sensor noise: 0.0004; a page of text: 0.01-0.1
NO_TEXT_FOCUS = limits.SCREEN_FOCUS_MARGINAL
# Text cut off at an edge: this many separate text lines run into one side of the picture, on
# the page and not on its border (`cut_text`) ...
CUT_LINES = 2
CUT_PAPER = 0.3  # ... on a picture of a page: at least this share of it plain paper ...
CUT_TEXT = 0.002  # ... with text on it: at least this share of it text cells
SCREEN_SIZES = {
    (w, h)
    for w, h in [
        (750, 1334),
        (828, 1792),
        (1080, 1920),
        (1080, 2340),
        (1080, 2400),
        (1125, 2436),
        (1170, 2532),
        (1179, 2556),
        (1242, 2208),
        (1242, 2688),
        (1284, 2778),
        (1290, 2796),
        (1440, 2560),
        (1440, 3200),
        (1440, 3088),
        (720, 1600),
        (720, 1280),
        (1366, 768),
        (1920, 1080),
        (2560, 1440),
        (1280, 800),
        (1440, 900),
        (1536, 864),
        (2880, 1800),
        (3024, 1964),
        (1680, 1050),
        (1600, 900),
        (2048, 1536),
        (1620, 2160),
        (1640, 2360),
        (1668, 2388),
        (2048, 2732),
        (1280, 720),
        (3840, 2160),
        (1280, 1024),
    ]
}


class ImageError(Exception):
    """The image could not be decoded within the budget; `code` says why."""

    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code = code
        self.params = params


def open_image(stream: BinaryIO) -> Image.Image:
    """Open and verify the header under the pixel budget; pixels are not decoded yet."""
    stream.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(stream, formats=FORMATS)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError("image_too_many_pixels", max_megapixels=_mp()) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("image_corrupt") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("image_corrupt")
    if width * height > limits.MAX_IMAGE_PIXELS:
        raise ImageError("image_too_many_pixels", max_megapixels=_mp())
    return img


def _mp() -> int:
    return limits.MAX_IMAGE_PIXELS // 1_000_000


def load_grey(img: Image.Image, long_side: int = limits.ANALYSIS_LONG_SIDE) -> np.ndarray:
    """Decode to a grey array no longer than ``long_side``; raises ImageError when broken."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if img.format == "JPEG":
                img.draft("L", (long_side, long_side))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img.convert("RGBA"))
            grey = img.convert("L")
            grey.thumbnail((long_side, long_side), Image.Resampling.BILINEAR)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageError("image_too_many_pixels", max_megapixels=_mp()) from exc
        except OSError as exc:
            if "truncated" in str(exc):
                raise ImageError("image_truncated") from exc
            raise ImageError("image_corrupt") from exc
        except (SyntaxError, ValueError, EOFError) as exc:
            raise ImageError("image_corrupt") from exc
    return np.asarray(grey, dtype=np.float32)


def _smooth(a: np.ndarray) -> np.ndarray:
    b = a.copy()
    b[1:-1, :] = (a[:-2, :] + 2 * a[1:-1, :] + a[2:, :]) / 4
    c = b.copy()
    c[:, 1:-1] = (b[:, :-2] + 2 * b[:, 1:-1] + b[:, 2:]) / 4
    return c


def _laplacian(a: np.ndarray) -> np.ndarray:
    return a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]


def _largest_blob(mask: np.ndarray) -> int:
    """Cells in the largest 4-connected component of a small boolean grid."""
    seen = np.zeros_like(mask)
    best = 0
    rows, cols = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        size = 0
        queue = deque([(r0, c0)])
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            size += 1
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < rows and 0 <= cc < cols and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        best = max(best, size)
    return best


def text_cells(grey: np.ndarray, cell: int = 8) -> tuple[np.ndarray, np.ndarray, float]:
    """(text cells, plain paper cells, marks) of a `cell` px grid. Text: a dark stroke inside a
    cell that is paper-bright, with paper-bright cells all around (so the page's own edge on a
    darker table, or a shadow, is not text). Plain paper: paper-bright without a stroke.
    Marks: how far the grey range inside the most marked 1% of the paper cells well inside the
    paper rises above the typical one (sensor noise), in grey levels: text too blurred to
    leave a stroke still leaves smudges, a blank page does not."""
    g = _smooth(grey)  # sensor noise is not a stroke
    rows, cols = g.shape[0] // cell, g.shape[1] // cell
    if rows < 3 or cols < 3:
        empty = np.zeros((max(rows, 0), max(cols, 0)), dtype=bool)
        return empty, empty, 0.0
    c = g[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell)
    cmax, cmin = c.max(axis=(1, 3)), c.min(axis=(1, 3))
    level = float(np.percentile(cmax, 90))  # the paper
    floor = float(np.percentile(cmax, 2))
    paper = cmax >= level - max(25.0, 0.35 * (level - floor))
    stroke = cmin <= cmax - np.maximum(40.0, 0.3 * cmax)
    plain = paper & ~stroke
    text = paper & stroke & _all_around(paper, True)
    inner = (cmax - cmin)[plain & _all_around(plain, False)]
    marks = float(np.percentile(inner, 99) - np.median(inner)) if inner.size else 0.0
    return text, plain, marks


def _all_around(mask: np.ndarray, beyond: bool) -> np.ndarray:
    """Cells whose 3x3 neighbourhood is all ``mask`` (cells beyond the picture count as
    ``beyond``)."""
    rows, cols = mask.shape
    padded = np.pad(mask, 1, constant_values=beyond)
    out = np.ones_like(mask)
    for dr in range(3):
        for dc in range(3):
            out &= padded[dr : dr + rows, dc : dc + cols]
    return out


def cut_text(text: np.ndarray, depth: int = 2) -> tuple[int, int]:
    """(text lines, text cells) running into the picture's edge on its worst side, from the
    grid of `text_cells`.

    Text cells in the outer ``depth`` cells of a side, as runs along that side: a page cut
    through its lines shows one run per line cut. A side whose text cells cover most of its
    length is a ruled border or a table's edge, not text, and is left out."""
    if not text.size:
        return 0, 0
    best = (0, 0)
    strips: list[np.ndarray] = [
        np.asarray(text[:depth].any(axis=0)),
        np.asarray(text[-depth:].any(axis=0)),
        np.asarray(text[:, :depth].any(axis=1)),
        np.asarray(text[:, -depth:].any(axis=1)),
    ]
    for strip in strips:
        n = int(strip.sum())
        if not n or n > 0.6 * strip.size:
            continue
        starts = np.diff(np.concatenate(([0], strip.astype(np.int8)))) == 1
        best = max(best, (int(starts.sum()), n))
    return best


def measure(grey: np.ndarray, *, read_text: bool = True) -> dict[str, float]:
    """Legibility measures of a grey page picture (values 0..255).

    The cheap measures always; with ``read_text`` also the OCR signal on the densest text of
    this same picture (``ocr_conf``, ``ocr_chars``; absent when OCR is unavailable), which is
    how a scanned PDF page, rendered by `intake.pdf`, gets the same check as a photo.
    """
    lo, p05, p50, p95, hi = (
        float(v) for v in np.percentile(grey[::2, ::2], (0.5, 5, 50, 95, 99.5))
    )
    # Focus: how much of the Laplacian energy a light smoothing removes. Sharp text loses most
    # of it (ratio well above 2); a blurred picture has little left to lose (ratio near 1).
    # Only the busiest blocks count, so a wide empty margin does not dilute the figure.
    lap = _laplacian(grey)
    lap_s = _laplacian(_smooth(grey))
    block = 32
    h, w = (lap.shape[0] // block) * block, (lap.shape[1] // block) * block
    e1 = (lap[:h, :w] ** 2).reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    e2 = (lap_s[:h, :w] ** 2).reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    if e2.size:
        busy = e2 >= np.percentile(e2, 90)
        quiet = e2 <= np.percentile(e2, 20)  # paper: what is left there is sensor noise
        n1, n2 = float(e1[quiet].mean()), float(e2[quiet].mean())
        s1 = max(float(e1[busy].mean()) - n1, 0.0)
        s2 = max(float(e2[busy].mean()) - n2, 1e-6)
        focus = float(np.sqrt(s1 / s2)) if s1 > 0 else 0.0
    else:
        focus = 0.0
    # Glare: the largest blown-out blob on a grid of 16 px cells, when the page is not white.
    cells = grey[: (grey.shape[0] // 16) * 16, : (grey.shape[1] // 16) * 16]
    cell_min = cells.reshape(cells.shape[0] // 16, 16, cells.shape[1] // 16, 16).min(axis=(1, 3))
    blown = cell_min >= 250
    glare = _largest_blob(blown) / max(blown.size, 1) if blown.mean() < 0.5 else 0.0
    # Flatness: share of 8x8 cells with no variation at all (screenshots, clean renders).
    c8 = grey[: (grey.shape[0] // 8) * 8, : (grey.shape[1] // 8) * 8]
    c8 = c8.reshape(c8.shape[0] // 8, 8, c8.shape[1] // 8, 8)
    flat = float(((c8.max(axis=(1, 3)) - c8.min(axis=(1, 3))) == 0).mean())
    ink = float((grey < (p50 - max(30.0, (p50 - lo) / 2))).mean())
    text, paper, marks = text_cells(grey)
    cut_lines, cut_cells = cut_text(text)
    m = {
        "p05": p05,
        "median": p50,
        "p95": p95,
        "contrast": hi - lo,  # text covers a few percent of a page: use the extremes
        "focus": focus,
        "glare": float(glare),
        "flat": flat,
        "ink": ink,
        "text": float(text.mean()) if text.size else 0.0,  # share of cells with a stroke
        "paper": float(paper.mean()) if paper.size else 0.0,  # ... plain paper
        "marks": marks,
        "cut_lines": float(cut_lines),
        "cut_cells": float(cut_cells),
    }
    if read_text and not screen_errors(m, 10_000, 10_000):
        m.update(read_measures(grey))
    return m


def text_window(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the `OCR_WINDOW` share of the picture holding the most
    edges: where the text is densest, so the OCR sample has text to read."""
    height, width = grey.shape
    wh = max(1, min(height, int(height * limits.OCR_WINDOW[0])))
    ww = max(1, min(width, int(width * limits.OCR_WINDOW[1])))
    if wh >= height and ww >= width:
        return 0, 0, height, width
    cell = 16
    rows, cols = height // cell, width // cell
    if rows < 2 or cols < 2:
        return 0, 0, height, width
    a = grey[: rows * cell, : cols * cell]
    gx = np.abs(np.diff(a, axis=1, append=a[:, -1:])).reshape(rows, cell, cols, cell)
    gy = np.abs(np.diff(a, axis=0, append=a[-1:, :])).reshape(rows, cell, cols, cell)
    edges = gx.sum(axis=(1, 3)) + gy.sum(axis=(1, 3))
    # Strong edges only (text strokes), so paper texture and sensor noise do not pull the window.
    energy = np.minimum(edges, np.percentile(edges, 99))
    energy = energy - np.median(energy)
    np.maximum(energy, 0, out=energy)
    wr, wc = max(1, wh // cell), max(1, ww // cell)
    summed = np.zeros((rows + 1, cols + 1))
    summed[1:, 1:] = energy.cumsum(axis=0).cumsum(axis=1)
    box = (
        summed[wr:, wc:] - summed[:-wr, wc:] - summed[wr:, :-wc] + summed[:-wr, :-wc]
    )  # sums of every wr x wc window of cells
    r, c = np.unravel_index(int(np.argmax(box)), box.shape)
    top, left = int(r) * cell, int(c) * cell
    return top, left, min(height, top + wh), min(width, left + ww)


def text_lines(grey: np.ndarray) -> list[tuple[int, int]]:
    """(top, bottom) rows of the lines of text in a window of text, [] when no lines show
    (skewed, blurred or empty). A line is a run of rows with ink; runs a small gap apart are
    one line (descenders, and the marks above and below a Thai line, thin out the rows)."""
    lo, mid = np.percentile(grey, (1, 50))
    if mid - lo < 20:
        return []
    inked = (grey < (lo + mid) / 2).mean(axis=1) > 0.004
    edges = np.flatnonzero(np.diff(np.concatenate(([0], inked.astype(np.int8), [0]))))
    runs = [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    if not runs:
        return []
    typical = float(np.median([b - a for a, b in runs]))
    merged = [runs[0]]
    for a, b in runs[1:]:
        if a - merged[-1][1] <= max(2.0, 0.3 * typical):
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return [(a, b) for a, b in merged if b - a >= 3]


def line_height(grey: np.ndarray) -> float:
    """Height in pixels of a text line in a window of text (the median of `text_lines`, those
    cut by the window's edge left out), 0 when no lines show."""
    lines = text_lines(grey)
    whole = [(a, b) for a, b in lines if a > 0 and b < grey.shape[0]]
    heights = [b - a for a, b in (whole if len(whole) >= 2 else lines)]
    return float(np.median(heights)) if len(heights) >= 2 else 0.0


def ocr_sample(grey: np.ndarray) -> np.ndarray:
    """The crop OCR reads: about `OCR_SAMPLE_LINES` whole lines of the densest text (cut
    between lines, not through them), enlarged when the type is small (Tesseract reads best
    with lines `OCR_LINE_PX` tall; its confidence falls on small type that a person still
    reads)."""
    top, left, bottom, right = text_window(grey)
    crop = grey[top:bottom, left:right]
    lines = text_lines(crop)
    lh = line_height(crop)
    if lh <= 0:
        return crop
    wh = min(crop.shape[0], int(limits.OCR_SAMPLE_LINES * 1.8 * lh))
    ww = min(crop.shape[1], int(limits.OCR_SAMPLE_LINE_CHARS * 0.6 * lh))
    r0 = (crop.shape[0] - wh) // 2
    c0 = (crop.shape[1] - ww) // 2
    whole = [(a, b) for a, b in lines if a > 0 and b < crop.shape[0]]
    inside = [(a, b) for a, b in whole if a >= r0 - lh and b <= r0 + wh + lh]
    if inside:  # snap to the gaps around the lines kept
        first, last = inside[0], inside[-1]
        before = [b for _, b in whole if b <= first[0]]
        after = [a for a, _ in whole if a >= last[1]]
        r0 = (first[0] + before[-1]) // 2 if before else max(0, first[0] - int(lh / 2))
        end = (last[1] + after[0]) // 2 if after else min(crop.shape[0], last[1] + int(lh / 2))
        wh = end - r0
    crop = crop[r0 : r0 + wh, c0 : c0 + ww]
    scale = min(limits.OCR_MAX_UPSCALE, limits.OCR_LINE_PX / lh)
    if scale > 1.2:
        pil = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8), "L")
        pil = pil.resize(
            (int(crop.shape[1] * scale), int(crop.shape[0] * scale)), Image.Resampling.BICUBIC
        )
        crop = np.asarray(pil, dtype=np.float32)
    return crop


def reads(result: ocr.OcrResult) -> bool:
    """Does this reading say the text is legible? Enough characters, read with the confidence
    calibrated for that language (`OCR_READABLE`: each engine model has its own scale)."""
    conf, strong = OCR_READABLE.get(result.language, OCR_READABLE["eng"])
    return result.chars >= OCR_MIN_CHARS and result.confidence >= conf and result.strong >= strong


def probe_strip(sample: np.ndarray, lines: int = 1) -> np.ndarray:
    """The part of the OCR sample read in every language to find its script: its first
    ``lines`` whole lines (cut between lines, not through them), or, when no lines show, the
    quarter of its rows with the most ink."""
    found = [(a, b) for a, b in text_lines(sample) if a > 0 and b < sample.shape[0]]
    if len(found) > lines:
        gap = found[lines][0] - found[lines - 1][1]  # between the last line kept and the next
        top = max(0, found[0][0] - gap // 2)
        return sample[top : found[lines - 1][1] + gap // 2]
    rows = max(1, sample.shape[0] // 4)
    lo, mid = np.percentile(sample, (1, 50))
    ink = np.concatenate(([0], (sample < (lo + mid) / 2).sum(axis=1).cumsum()))
    top = int(np.argmax(ink[rows:] - ink[:-rows]))
    return sample[top : top + rows]


def read_measures(grey: np.ndarray, *, calibrating: bool = False) -> dict[str, float]:
    """The OCR signal on a sample of the densest text: {} when OCR is unavailable.

    The sample's script is looked for on one line of it (`probe_strip`), then the sample is
    read in the likeliest languages first until one reads it legibly (`reads`), within
    `limits.OCR_BUDGET_S` (`ocr.read`). With ``calibrating`` (the bench) the sample is read in
    every language the check may read it in, without stopping and without the budget, so that
    any thresholds give the verdict the check would. Per language read: ``ocr_<lang>_conf``,
    ``_chars``, ``_strong``; and ``ocr_conf``/``ocr_chars`` of the best, ``ocr_tried``."""
    sample = ocr_sample(grey)
    if calibrating:
        budget = len(ocr.LANGUAGES) * 2 * limits.OCR_TIMEOUT_S
        results = ocr.read(sample, probe=probe_strip(sample), budget=budget)
    else:
        results = ocr.read(sample, enough=reads, probe=probe_strip(sample))
    if not results:
        return {}
    m: dict[str, float] = {}
    for r in results:
        m[f"ocr_{r.language}_conf"] = r.confidence
        m[f"ocr_{r.language}_chars"] = float(r.chars)
        m[f"ocr_{r.language}_strong"] = r.strong
    best = max(results, key=lambda r: (reads(r), r.confidence, r.chars))
    m["ocr_conf"], m["ocr_chars"] = best.confidence, float(best.chars)
    m["ocr_tried"] = float(len(results))
    return m


def _readings(m: dict[str, float]) -> list[ocr.OcrResult]:
    return [
        ocr.OcrResult(m[k], 0, int(m[k[:-5] + "_chars"]), k[4:-5], m[k[:-5] + "_strong"])
        for k in m
        if k.startswith("ocr_") and k.endswith("_conf") and k != "ocr_conf"
    ]


def screen_errors(m: dict[str, float], width: int, height: int) -> list[Finding]:
    """The fast screen before OCR: the picture no reading could make legible (far too small,
    black, flat, far out of focus), rejected without reading it."""
    findings: list[Finding] = []
    if min(width, height) < HARD_MIN_SIDE:
        findings.append(
            Finding("photo_low_resolution", Severity.ERROR, {"width": width, "height": height})
        )
    if m["median"] < HARD_DARK_MEDIAN and m["p95"] < 120:
        findings.append(Finding("photo_too_dark", Severity.ERROR))
    elif m["contrast"] < HARD_LOW_CONTRAST:
        code = "photo_washed_out" if m["p05"] > WASHED_P05 else "photo_low_contrast"
        findings.append(Finding(code, Severity.ERROR))
    elif m["focus"] < HARD_FOCUS:
        findings.append(Finding("photo_blurred", Severity.ERROR))
    return findings


def screen_only_errors(m: dict[str, float], width: int, height: int) -> list[Finding]:
    """The fast screen's whole verdict, when there is no OCR to read the text."""
    findings: list[Finding] = []
    if min(width, height) < limits.MIN_TEXT_SIDE:
        findings.append(
            Finding("photo_low_resolution", Severity.ERROR, {"width": width, "height": height})
        )
    if m["median"] < DARK_MEDIAN and m["p95"] < 120:
        findings.append(Finding("photo_too_dark", Severity.ERROR))
    elif m["p05"] > WASHED_P05 and m["contrast"] < LOW_CONTRAST:
        findings.append(Finding("photo_washed_out", Severity.ERROR))
    elif m["contrast"] < LOW_CONTRAST:
        findings.append(Finding("photo_low_contrast", Severity.ERROR))
    elif m["ink"] < BLANK_INK:
        findings.append(Finding("image_blank", Severity.ERROR))
    elif m["focus"] < FOCUS_REJECT:
        findings.append(Finding("photo_blurred", Severity.ERROR))
    return findings


def _unreadable_reason(m: dict[str, float], width: int, height: int) -> str:
    """The likeliest cause of text OCR could not read, in the patient's terms (so the fix fits)."""
    if min(width, height) < limits.MIN_TEXT_SIDE:
        return "photo_low_resolution"
    if m["median"] < limits.READ_DARK_MEDIAN:
        return "photo_too_dark"
    if m["focus"] < FOCUS_MARGINAL:  # before contrast: a blur smears the text's contrast too
        return "photo_blurred"
    if m["contrast"] < limits.READ_LOW_CONTRAST:
        return "photo_washed_out" if m["p05"] > WASHED_P05 else "photo_low_contrast"
    return "photo_unreadable"


def ocr_says_unreadable(m: dict[str, float]) -> bool | None:
    """True or False by the OCR signal; None when there was no OCR."""
    readings = _readings(m)
    if not readings:
        return None
    if any(reads(r) for r in readings):
        return False
    if max(r.chars for r in readings) < OCR_MIN_CHARS:
        # Hardly any text read in the densest window: unreadable when the picture is a page
        # (mostly paper), shows text strokes that did not read, or is not sharp; a sharp
        # picture without text (a photo of teeth, a panoramic X-ray) is not ours to refuse.
        page = m["paper"] >= BLANK_PAPER
        return page or m["text"] >= NO_TEXT_CELLS or m["focus"] < NO_TEXT_FOCUS
    return True


def _blank(m: dict[str, float]) -> bool:
    """Nothing to read on it: OCR read nothing, and the picture is mostly plain paper with no
    stroke or smudge on it (or has no ink at all)."""
    if max(r.chars for r in _readings(m)) >= OCR_MIN_CHARS:
        return False
    plain_page = m["text"] < BLANK_TEXT and m["paper"] >= BLANK_PAPER and m["marks"] < BLANK_MARKS
    return m["ink"] < BLANK_INK or plain_page


def judge(
    m: dict[str, float], width: int, height: int, *, compressed_photo: bool = False
) -> list[Finding]:
    """Findings from the measures; the first error found is the one the patient needs to fix."""
    findings = screen_errors(m, width, height)
    if not findings:
        unreadable = ocr_says_unreadable(m)
        if unreadable is None:
            findings = screen_only_errors(m, width, height)
        elif _blank(m):
            findings.append(Finding("image_blank", Severity.ERROR))
        elif unreadable:
            findings.append(Finding(_unreadable_reason(m, width, height), Severity.ERROR))
    if m["glare"] >= GLARE_SHARE:
        findings.append(Finding("photo_glare", Severity.ERROR))
    if m["cut_lines"] >= CUT_LINES and m["paper"] >= CUT_PAPER and m["text"] >= CUT_TEXT:
        findings.append(Finding("photo_cut_off", Severity.NOTE))
    errors = any(f.severity is Severity.ERROR for f in findings)
    marginal = m["focus"] < FOCUS_MARGINAL or max(width, height) < 1600
    if "ocr_conf" in m:
        marginal = marginal or m["ocr_conf"] < limits.OCR_CONF_MARGINAL
    if compressed_photo and (errors or marginal):
        findings.append(Finding("photo_send_as_file", Severity.NOTE))
    return findings


def _exif_info(img: Image.Image) -> tuple[bool, bool]:
    """(looks like a camera picture, says it is a screenshot)."""
    try:
        exif = img.getexif()
    except Exception:  # broken EXIF is common and harmless here
        return False, False
    camera = bool(exif.get(0x010F) or exif.get(0x0110))  # Make, Model
    texts: list[str] = []
    with contextlib.suppress(Exception):  # a broken EXIF sub-directory tells nothing
        texts.append(str(exif.get_ifd(0x8769).get(0x9286, "")))  # UserComment
    texts.append(str(exif.get(0x0131, "")))  # Software
    texts.append(str(img.info.get("Software", "")) + str(img.info.get("Description", "")))
    text = " ".join(texts).lower()
    return camera, "screenshot" in text


def is_screenshot(img: Image.Image, m: dict[str, float], size: tuple[int, int]) -> bool:
    camera, says = _exif_info(img)
    if says:
        return True
    if camera:
        return False
    w, h = size
    screen_size = (w, h) in SCREEN_SIZES or (h, w) in SCREEN_SIZES
    lossless = img.format in ("PNG", "WEBP", "GIF", "BMP")
    return (screen_size and (lossless or m["flat"] > 0.3)) or (lossless and m["flat"] > 0.55)


def screen(stream: BinaryIO) -> tuple[Image.Image, tuple[int, int], dict[str, float]]:
    """The fast screen's work: open, reduced decode, cheap measures (no OCR)."""
    img = open_image(stream)
    size = img.size
    grey = load_grey(img)
    return img, size, measure(grey, read_text=False)


def check_image(stream: BinaryIO, *, compressed_photo: bool = False) -> Verdict:
    try:
        img, size, m = screen(stream)
        fmt = img.format or "unknown"
    except ImageError as exc:
        return verdict_from(Kind.IMAGE, [Finding(exc.code, Severity.ERROR, exc.params)])
    findings_extra: list[Finding] = []
    if not screen_errors(m, *size):
        # The OCR sample comes from a sharper copy than the screen's: small print in a 12 MP
        # photo must not be judged at 1600 px.
        try:
            sharp = load_grey(open_image(stream), limits.OCR_LONG_SIDE)
        except ImageError as exc:
            return verdict_from(Kind.IMAGE, [Finding(exc.code, Severity.ERROR, exc.params)])
        read = read_measures(sharp)
        if not read:
            findings_extra.append(Finding("ocr_unavailable", Severity.INFO))
        m.update(read)
    findings = judge(m, *size, compressed_photo=compressed_photo) + findings_extra
    metadata: dict[str, Any] = {
        "format": fmt.lower(),
        "width": size[0],
        "height": size[1],
        "measures": {k: round(v, 4) for k, v in m.items()},
    }
    if is_screenshot(img, m, size):
        findings = [f for f in findings if f.code not in ("photo_cut_off",)]
        findings.append(Finding("photo_screenshot", Severity.NOTE))
        metadata["screenshot"] = True
    return verdict_from(Kind.IMAGE, findings, metadata)
