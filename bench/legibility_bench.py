"""Photo legibility benchmark: `python bench/legibility_bench.py [N]` from the project root.

Builds (or reads from its cache) the labelled corpus of N generated page photos (default 210;
tests/intake/legibility_corpus.py: Latin, Chinese and Thai pages degraded like phone photos,
label = Tesseract character accuracy of the text's region in the picture, told the right
language, relative to the clean page as the photo frames it, readable at >= 0.9). Seeds cycle
through the three scripts, so both halves are balanced across them.

1. Measures every sample the way `intake.image` does, with the OCR sample read in every
   language the check may read it in (the script probe's likeliest), without stopping and
   without a time budget (cached, so the figures do not depend on the machine's load).
2. Calibrates the thresholds on the train half (even seeds) by coordinate search: each
   language's (confidence, strong share) pair, then the fast screen's floors, and again.
3. Reports balanced accuracy on the train half and on the held-out half (odd seeds), overall
   and per script, with the confusion counts; the held-out errors by degradation; the fast
   screen alone (no OCR) for comparison; the held-out figure again from `check()` itself (the
   code path the bot runs: script probe, reading order, stops; OCR runs cached); and how the
   cut-off note does on pages whose text the picture cuts.
4. Times a 12 MP phone photo (a Latin, a Chinese and a Thai page): the fast screen, the full
   verdict, and a bare full-size decode of the same file (Pillow), side by side (wall-clock
   medians); and the CPU seconds of a full verdict with the OCR time limits lifted.

The first run spends most of its time labelling (OCR of the text's region of every sample and
of its clean twin, two processes) and reading the samples; both are cached in the system temp
dir (readings keyed by the exact picture, language and engine settings, so a change to how the
sample is cut reads anew).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "intake")]

import legibility_corpus as lc  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from intake import Status, check, image, limits, ocr  # noqa: E402
from intake.verdict import Severity  # noqa: E402

READINGS = lc.CACHE / "readings"
_run_tesseract = ocr.run_tesseract
Measured = list[tuple[lc.Sample, dict[str, float]]]


def cached_run(
    grey: np.ndarray, language: str, *, psm: int = ocr.PSM, timeout: float = 0
) -> str | None:
    """`ocr.run_tesseract`, cached by the exact picture, language and settings, and with a
    generous timeout (the bench measures what OCR reads, not how busy the machine is)."""
    del timeout
    key = hashlib.sha256(ocr._png(grey) + repr((language, psm, ocr.CONFIG)).encode()).hexdigest()[
        :32
    ]
    path = READINGS / f"{key}.tsv"
    if path.exists():
        return path.read_text()
    tsv = _run_tesseract(grey, language, psm=psm, timeout=120)
    if tsv:
        READINGS.mkdir(parents=True, exist_ok=True)
        path.write_text(tsv)
    return tsv


def features(sample: lc.Sample) -> dict[str, float]:
    """Every measure the verdict uses, OCR in every language whatever the screen says (so the
    screen's thresholds and each language's can be tuned too)."""
    ocr.run_tesseract = cached_run  # in the pool's worker process
    data = sample.data()
    _, size, m = image.screen(io.BytesIO(data))
    sharp = image.load_grey(image.open_image(io.BytesIO(data)), limits.OCR_LONG_SIDE)
    m.update(image.read_measures(sharp, calibrating=True))
    m["width"], m["height"] = float(size[0]), float(size[1])
    return m


def verdict(sample: lc.Sample) -> tuple[bool, list[str]]:
    """(rejected, finding codes) of `check()` itself, its OCR runs cached."""
    ocr.run_tesseract = cached_run
    result = check(io.BytesIO(sample.data()))
    return result.status is Status.REJECTED, [f.code for f in result.findings]


def predict(m: dict[str, float]) -> bool:
    """True when the verdict would reject the picture (an error finding)."""
    findings = image.judge(m, int(m["width"]), int(m["height"]))
    return any(f.severity is Severity.ERROR for f in findings)


def balanced(pairs: list[tuple[bool, bool]]) -> tuple[float, dict[str, int]]:
    """(balanced accuracy, confusion) of (truly unreadable, predicted unreadable) pairs."""
    tp = sum(1 for t, p in pairs if t and p)
    fn = sum(1 for t, p in pairs if t and not p)
    tn = sum(1 for t, p in pairs if not t and not p)
    fp = sum(1 for t, p in pairs if not t and p)
    rates = []
    if tp + fn:
        rates.append(tp / (tp + fn))
    if tn + fp:
        rates.append(tn / (tn + fp))
    score = sum(rates) / len(rates) if rates else float("nan")
    return score, {
        "rejected_unreadable": tp,
        "accepted_unreadable": fn,
        "accepted_readable": tn,
        "rejected_readable": fp,
    }


LANGS = ("eng", "chi_sim", "tha")
# Wide enough that the plateau of best scores lies inside the grid, not against its edge.
CONF_GRID = [float(c) for c in range(30, 95, 5)]
STRONG_GRID = [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
# Not `HARD_DARK_MEDIAN`: a product floor (a page darker than that is too dark for a person,
# whatever an engine reads), whose cost on the held-out half is reported. Nor `NO_TEXT_CELLS`:
# every corpus page has text, so the corpus would push it to refuse every picture OCR reads
# nothing on, photos of teeth included.
SCREEN_GRID: dict[str, list[float]] = {
    "HARD_MIN_SIDE": [200, 300, 400, 500, 600, 700],
    "HARD_LOW_CONTRAST": [4, 8, 12, 16, 20],
    "HARD_FOCUS": [0.9, 1.0, 1.05, 1.1, 1.2, 1.3],
}


def apply(params: dict[str, Any]) -> None:
    for name, value in params.items():
        setattr(image, name, value)


def current() -> dict[str, Any]:
    return {
        **{name: getattr(image, name) for name in SCREEN_GRID},
        "OCR_READABLE": dict(image.OCR_READABLE),
    }


def _bacc(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each column of ``pred`` (samples x candidates)."""
    pos, neg = truth, ~truth
    tpr = (pred & pos[:, None]).sum(axis=0) / max(int(pos.sum()), 1)
    tnr = (~pred & neg[:, None]).sum(axis=0) / max(int(neg.sum()), 1)
    return (tpr + tnr) / 2


def _score(train: Measured) -> float:
    return balanced([(not s.readable, predict(m)) for s, m in train])[0]


def _search_languages(train: Measured) -> None:
    """Every language's (confidence, strong share) pair at once, the screen fixed (vectorised:
    the verdict is the screen's floors, else no language reads the sample)."""
    truth = np.array([not s.readable for s, _ in train])
    pairs = list(itertools.product(CONF_GRID, STRONG_GRID))
    passes = {}  # language -> samples x pairs: that reading alone says legible
    saved = dict(image.OCR_READABLE)
    readings = [
        {lang: [r for r in image._readings(m) if r.language == lang] for lang in LANGS}
        for _, m in train
    ]
    for lang in LANGS:
        cols = []
        for pair in pairs:
            image.OCR_READABLE[lang] = pair
            cols.append([any(image.reads(r) for r in read[lang]) for read in readings])
        passes[lang] = np.array(cols).T
    image.OCR_READABLE.update(saved)
    # With no language reading: rejected unless the screen passes it as a picture without text.
    image.OCR_READABLE.update({lang: (101.0, 2.0) for lang in LANGS})
    unread = np.array([predict(m) for _, m in train])  # rejected when nothing reads
    image.OCR_READABLE.update(saved)
    hard = np.array(
        [bool(image.screen_errors(m, int(m["width"]), int(m["height"]))) for _, m in train]
    )
    other = np.array([m["glare"] >= image.GLARE_SHARE for _, m in train])
    scores = np.zeros((len(pairs),) * 3)
    for i, j in itertools.product(range(len(pairs)), repeat=2):
        either = passes["eng"][:, i] | passes["chi_sim"][:, j]
        legible = either[:, None] | passes["tha"]
        pred = hard[:, None] | other[:, None] | (unread[:, None] & ~legible)
        scores[i, j] = _bacc(truth, pred)
    tied = np.argwhere(scores >= scores.max() - 1e-9)  # (i, j, k) rows
    grid = np.array(list(itertools.product(range(len(CONF_GRID)), range(len(STRONG_GRID)))))
    i, j, k = tied[_centred(np.hstack([grid[tied[:, n]] for n in range(3)]))]
    image.OCR_READABLE.update(eng=pairs[i], chi_sim=pairs[j], tha=pairs[k])


def _centred(points: np.ndarray) -> int:
    """Index of the point nearest the centroid of ``points`` (the candidates tied for the best
    score, in grid steps): the middle of the plateau rather than its edge, which is where the
    held-out pages the train half never showed fall on the wrong side."""
    centre = points.mean(axis=0)
    return int(np.argmin(((points - centre) ** 2).sum(axis=1)))


def _search_screen(train: Measured) -> None:
    """The fast screen's floors and the no-text rule, the languages fixed."""
    combos = list(itertools.product(*(range(len(v)) for v in SCREEN_GRID.values())))
    scores = []
    for combo in combos:
        apply({name: SCREEN_GRID[name][n] for name, n in zip(SCREEN_GRID, combo, strict=True)})
        scores.append(_score(train))
    best = max(scores)
    tied = np.array([c for c, score in zip(combos, scores, strict=True) if score >= best - 1e-9])
    chosen = tied[_centred(tied)]
    apply({name: SCREEN_GRID[name][n] for name, n in zip(SCREEN_GRID, chosen, strict=True)})


def calibrate(train: Measured) -> dict[str, Any]:
    """Coordinate search on the train half: languages, screen, languages, screen."""
    for _ in range(2):
        _search_languages(train)
        _search_screen(train)
    chosen = current()
    print(f"calibrated on the train half: {chosen}")
    return chosen


def photo_12mp(script: str = "latin") -> bytes:
    """A 12 MP phone photo of a 10 pt A4 page of text in ``script`` (40 lines)."""
    img = Image.new("L", (3000, 4000), 90)
    draw = ImageDraw.Draw(img)
    draw.rectangle((150, 100, 2850, 3900), fill=238)
    path, index = lc.FONTS[script][0]
    font = ImageFont.truetype(path, 45, index=index)
    rng = np.random.default_rng(0)
    text_rng = random.Random(0)
    for row in range(40):
        text = lc._line(text_rng, script, 45 if script == "chinese" else 80)
        while draw.textlength(text, font=font) > 2300:
            text = text[:-1]
        draw.text((400, 400 + row * 80), text, font=font, fill=25)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (4000, 3000))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB").save(
        buf, "JPEG", quality=88
    )
    return buf.getvalue()


def side_by_side(fns: dict[str, Callable[[], object]], runs: int = 5) -> dict[str, float]:
    """Median seconds of each function, run in turn within each round (so a load spike on the
    shared machine hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def _decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def _kinds(sample: lc.Sample) -> list[str]:
    kinds = [k.removeprefix("crop_") if k.startswith("crop_") else k for k in sample.degradations]
    return ["crop" if k in ("left", "right", "top", "bottom") else k for k in kinds] or ["none"]


def report(name: str, part: Measured, preds: list[bool]) -> None:
    for script in (*lc.SCRIPTS, "all"):
        pairs = [
            (not s.readable, p)
            for (s, _), p in zip(part, preds, strict=True)
            if script in (s.script, "all")
        ]
        readable = sum(1 for t, _ in pairs if not t)
        score, confusion = balanced(pairs)
        print(
            f"  {name:5} {script:8} n={len(pairs):3} readable={readable:3}"
            f" balanced accuracy {score:.3f}  {confusion}"
        )


def by_degradation(part: Measured, preds: list[bool]) -> None:
    """Held-out errors by degradation (a page with several counts under each)."""
    total: Counter[str] = Counter()
    wrong_fp: Counter[str] = Counter()
    wrong_fn: Counter[str] = Counter()
    for (s, _), p in zip(part, preds, strict=True):
        for kind in _kinds(s):
            total[kind] += 1
            if p and s.readable:
                wrong_fp[kind] += 1
            if not p and not s.readable:
                wrong_fn[kind] += 1
    print("  held-out errors by degradation (pages / readable rejected / unreadable accepted):")
    print("   " + "  ".join(f"{k} {total[k]}/{wrong_fp[k]}/{wrong_fn[k]}" for k in sorted(total)))
    for (s, m), p in zip(part, preds, strict=True):
        if p == s.readable:
            ocr_keys = {
                k[4:]: round(v, 2)
                for k, v in m.items()
                if k.startswith("ocr_") and k.split("_")[1] in ("eng", "chi", "tha")
            }
            print(
                f"   seed {s.seed} {s.script} {'rejected' if p else 'accepted'}"
                f" relative accuracy {s.relative_accuracy:.2f} {s.degradations}"
                f" focus {m['focus']:.2f} median {m['median']:.0f} {ocr_keys}"
            )


def cut_off(part: list[tuple[lc.Sample, list[str]]]) -> None:
    """How the cut-off note does: pages whose text the picture cuts, and the others."""
    for readable in (True, False):
        group = [(s, codes) for s, codes in part if s.readable is readable]
        cut = [codes for s, codes in group if s.cut]
        whole = [codes for s, codes in group if not s.cut]
        hit = sum(1 for codes in cut if "photo_cut_off" in codes)
        false = sum(1 for codes in whole if "photo_cut_off" in codes)
        print(
            f"  {'readable' if readable else 'unreadable':10} pages: cut off noted on {hit}/"
            f"{len(cut)} cut pages, on {false}/{len(whole)} whole pages"
        )


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished child processes (Tesseract)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timing_12mp(script: str) -> None:
    """The fast screen and the full verdict of a 12 MP photo, with a bare decode of the same
    file side by side (wall-clock medians under the bot's OCR time limits); and the CPU seconds
    of one full verdict with those limits lifted, which the machine's load does not inflate
    (on a busy machine the limits cut OCR short, and the verdict falls back to the screen)."""
    photo = photo_12mp(script)
    check(io.BytesIO(photo))  # warm the OCR models into the page cache
    medians = side_by_side(
        {
            "decode": lambda: _decode(photo),
            "screen": lambda: image.screen(io.BytesIO(photo)),
            "check": lambda: check(io.BytesIO(photo)),
        }
    )
    limited = check(io.BytesIO(photo)).metadata["measures"].get("ocr_tried", 0)
    saved = limits.OCR_BUDGET_S, limits.OCR_TIMEOUT_S
    limits.OCR_BUDGET_S, limits.OCR_TIMEOUT_S = 600.0, 300.0
    try:
        cpu = _cpu()
        result = check(io.BytesIO(photo))
        cpu = _cpu() - cpu
    finally:
        limits.OCR_BUDGET_S, limits.OCR_TIMEOUT_S = saved
    print(
        f"12 MP {script} photo ({len(photo) / 1e6:.1f} MB JPEG), wall-clock medians: fast"
        f" screen {medians['screen']:.2f} s, full verdict {medians['check']:.2f} s (languages"
        f" read in full: {limited:.0f}), bare full-size decode {medians['decode']:.2f} s;"
        f" full verdict without time limits: {cpu:.2f} CPU s ({result.status.value}, languages"
        f" read in full: {result.metadata['measures'].get('ocr_tried', 0):.0f})"
    )


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 210
    if not (lc.tesseract_ready() and lc.fonts_ready()):
        print(
            "tesseract with eng, chi_sim, tha or the fonts missing: run scripts/system-packages.sh"
        )
        return 1
    started = time.perf_counter()
    samples = lc.corpus(range(n))
    print(f"corpus: {n} samples ({time.perf_counter() - started:.0f} s to build or load)")
    started = time.perf_counter()
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as pool:
        measured = list(zip(samples, pool.map(features, samples), strict=True))
    print(f"measured in {time.perf_counter() - started:.0f} s")
    train = [x for x in measured if x[0].seed % 2 == 0]
    test = [x for x in measured if x[0].seed % 2 == 1]
    screen_only = [
        bool(image.screen_only_errors(m, int(m["width"]), int(m["height"]))) for _, m in test
    ]
    calibrate(train)
    print("balanced accuracy (train: thresholds picked there; held-out: never seen):")
    report("train", train, [predict(m) for _, m in train])
    test_preds = [predict(m) for _, m in test]
    report("held", test, test_preds)
    by_degradation(test, test_preds)
    dark = [
        s.seed
        for s, m in test
        if s.readable and m["median"] < image.HARD_DARK_MEDIAN and m["p95"] < 120
    ]
    print(
        f"  readable pages the darkness floor (median grey < {image.HARD_DARK_MEDIAN}) rejects"
        f" whatever OCR reads: {len(dark)} (seeds {dark})"
    )
    score, confusion = balanced(
        [(not s.readable, p) for (s, _), p in zip(test, screen_only, strict=True)]
    )
    print(f"  fast screen alone (no OCR), held-out: {score:.3f} {confusion}")
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        verdicts = list(pool.map(verdict, [s for s, _ in test]))
    differ = sum(1 for p, (rejected, _) in zip(test_preds, verdicts, strict=True) if p != rejected)
    print(
        f"check() itself on the held-out half ({time.perf_counter() - started:.0f} s; differs"
        f" from the calibration's verdict on {differ} pages: reading order and stops):"
    )
    report("check", test, [rejected for rejected, _ in verdicts])
    cut_off([(s, codes) for (s, _), (_, codes) in zip(test, verdicts, strict=True)])
    ocr.run_tesseract = _run_tesseract
    for script in lc.SCRIPTS:
        timing_12mp(script)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: this process {peak:.0f} MiB, largest child process {child:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
