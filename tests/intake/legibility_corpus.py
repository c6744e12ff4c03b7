"""A labelled corpus for photo legibility: rendered pages, degraded like phone photos.

Each sample is a page of text in one script (Latin, Chinese, Thai) rendered at a phone's
resolution (1000-4000 px on the long side, A4 proportions inside a 3:4 frame with a table-top
border), then degraded by a seeded mix of perspective, blur, darkness, low contrast, noise,
downscale, JPEG and crop.

Its label is the OCR character accuracy of the degraded picture against the rendered text
(Tesseract, told the right language), relative to the same page rendered clean and framed as
the photo frames it (the same perspective and crop, none of the damage), readable at
`READABLE_ACCURACY` (0.9) or more:

- Relative, because Tesseract's ceiling differs by script (clean Thai reads ~0.9-0.95, clean
  English ~0.99) and the question is what the photo lost, not what the engine cannot do.
- Framed, because text cropped out of the picture is not illegible, it is missing: that is the
  cut-off note's business (`Sample.cut`, from where the text lies), not the legibility verdict's.
- A reading of the text's own region (`region_accuracy`), where the rendering says the text
  lies, from a reduced copy with its type at a standard size, like the check's own sample.
  Whole-page readings cost several times more and now and then lose a page that reads
  perfectly on its region (bogus columns on a Chinese page, a global threshold on a whole
  dark photo); a label must not hang on that.

At 10% of characters wrong a doctor still reads a page, at 20-30% a report's numbers are no
longer trustworthy: 0.9 is on the safe side of that edge and is where the accuracy of the
corpus pages falls fastest with every degradation, so few labels sit near it.

Everything is deterministic from the seed; samples (JPEG bytes + label JSON) are cached under
the system temp dir, keyed by generator version and seed, and every labelling reading by its
exact picture, so a new label definition reuses the readings already made.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

VERSION = 11
LABEL_TIMEOUT_S = 90  # one labelling reading (a second or two normally; see `ocr_text`)
READABLE_ACCURACY = 0.9
CUT_SHARE = 0.995  # less of the text's ink in the picture than this: text cut off
SCRIPTS = ("latin", "chinese", "thai")
LANG = {"latin": "eng", "chinese": "chi_sim", "thai": "tha"}
CACHE = Path(tempfile.gettempdir()) / "care-companion-legibility"

FONTS = {
    "latin": [
        ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 0),
        ("/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf", 0),
    ],
    "chinese": [
        ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),
        ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2),
    ],
    "thai": [
        ("/usr/share/fonts/truetype/tlwg/Garuda.ttf", 0),
        ("/usr/share/fonts/truetype/tlwg/Loma.ttf", 0),
    ],
}

LATIN = [
    "patient",
    "discharge",
    "summary",
    "admitted",
    "on",
    "with",
    "complaints",
    "of",
    "chest",
    "pain",
    "shortness",
    "of",
    "breath",
    "blood",
    "pressure",
    "heart",
    "rate",
    "temperature",
    "haemoglobin",
    "white",
    "cell",
    "count",
    "platelets",
    "creatinine",
    "glucose",
    "sodium",
    "potassium",
    "the",
    "examination",
    "showed",
    "no",
    "abnormality",
    "was",
    "prescribed",
    "twice",
    "daily",
    "after",
    "meals",
    "follow",
    "up",
    "in",
    "two",
    "weeks",
    "with",
    "the",
    "cardiologist",
    "diagnosis",
    "hypertension",
    "diabetes",
    "mellitus",
    "type",
    "treatment",
    "plan",
    "results",
    "reference",
    "range",
    "units",
    "date",
    "of",
    "birth",
    "hospital",
    "ward",
]
CHINESE = (
    "患者因胸痛气短入院血压心率体温血红蛋白白细胞计数血小板肌酐葡萄糖钠钾检查未见异常每日两次饭后服用"
    "两周后心内科复诊诊断高血压糖尿病治疗方案结果参考范围单位出生日期医院病房出院小结主诉现病史既往史"
)
THAI = [
    "ผู้ป่วย",
    "เข้ารับการรักษา",
    "ที่โรงพยาบาล",
    "ด้วยอาการ",
    "เจ็บหน้าอก",
    "หายใจลำบาก",
    "ความดันโลหิต",
    "อัตราการเต้นของหัวใจ",
    "อุณหภูมิ",
    "ฮีโมโกลบิน",
    "เม็ดเลือดขาว",
    "เกล็ดเลือด",
    "น้ำตาลในเลือด",
    "การตรวจร่างกาย",
    "ไม่พบความผิดปกติ",
    "รับประทานยา",
    "วันละสองครั้ง",
    "หลังอาหาร",
    "นัดติดตามอาการ",
    "อีกสองสัปดาห์",
    "แพทย์ผู้เชี่ยวชาญ",
    "การวินิจฉัย",
    "โรคความดันโลหิตสูง",
    "โรคเบาหวาน",
    "แผนการรักษา",
    "ผลการตรวจ",
    "ค่าอ้างอิง",
    "หน่วย",
    "วันเกิด",
    "หอผู้ป่วย",
]


@dataclass(frozen=True)
class Sample:
    seed: int
    script: str
    width: int
    height: int
    degradations: dict[str, float]
    accuracy: float  # OCR char accuracy of the degraded picture
    framed_accuracy: float  # the clean page framed as the photo frames it (perspective, crop)
    text_kept: float  # share of the page's text (its ink) inside the picture: < 1 when cut off
    path: str

    @property
    def relative_accuracy(self) -> float:
        """What the photo's quality lost: its accuracy relative to the page as framed."""
        return self.accuracy / max(self.framed_accuracy, 1e-6)

    @property
    def readable(self) -> bool:
        return self.relative_accuracy >= READABLE_ACCURACY

    @property
    def cut(self) -> bool:
        """The picture cuts text off (a character's worth or more of the text's ink)."""
        return self.text_kept < CUT_SHARE

    def data(self) -> bytes:
        return Path(self.path).read_bytes()


def tesseract_ready() -> bool:
    from intake import ocr

    return set(LANG.values()) <= set(ocr.available_languages())


def fonts_ready() -> bool:
    return all(Path(p).exists() for fonts in FONTS.values() for p, _ in fonts)


def _line(rng: random.Random, script: str, width_chars: int) -> str:
    if script == "chinese":
        text = "".join(rng.choice(CHINESE) for _ in range(width_chars))
        if rng.random() < 0.5:
            text = text[: width_chars - 6] + f"{rng.randint(1, 999)}.{rng.randint(0, 9)}"
        return text
    words = LATIN if script == "latin" else THAI
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < width_chars:
        if rng.random() < 0.15:
            out.append(f"{rng.randint(1, 999)}.{rng.randint(0, 9)}")
        else:
            out.append(rng.choice(words))
    return " ".join(out[:-1] if len(out) > 1 else out)


def render(seed: int, script: str, long_side: int) -> tuple[Image.Image, str]:
    """(clean grey picture of a page lying on a table, its text)."""
    img, text, _ = layout(seed, script, long_side)
    return img, text


def layout(
    seed: int, script: str, long_side: int, *, text_only: bool = False
) -> tuple[Image.Image, str, int]:
    """`render`, and the type's size in pixels. With ``text_only`` the same text in black on
    white, without the table or the page: where the text lies."""
    rng = random.Random(seed)
    height = long_side
    width = long_side * 3 // 4
    table = rng.randint(60, 120)
    img = Image.new("L", (width, height), 255 if text_only else table)  # the table around it
    page_w = int(width * rng.uniform(0.86, 0.94))
    page_h = min(int(page_w * 1.414), int(height * 0.97))
    x0, y0 = (width - page_w) // 2, (height - page_h) // 2
    draw = ImageDraw.Draw(img)
    paper = rng.randint(225, 250)
    draw.rectangle((x0, y0, x0 + page_w, y0 + page_h), fill=255 if text_only else paper)
    # 9-12 pt type on a 210 mm page: points * 0.3528 mm, at page_w px per 210 mm.
    points = rng.uniform(9, 12)
    px = max(8, round(points * 0.3528 * page_w / 210))
    path, index = rng.choice(FONTS[script])
    font = ImageFont.truetype(path, px, index=index)
    margin = int(page_w * 0.1)
    ink = 0 if text_only else rng.randint(0, 60)
    if text_only:
        rng.randint(0, 60)  # the same draws as the page itself
    avg = font.getlength("的" if script == "chinese" else "abcdefghij ผู้ป่วย"[:10]) / (
        1 if script == "chinese" else 10
    )
    width_chars = max(8, int((page_w - 2 * margin) / max(avg, 1) * 0.9))
    lines: list[str] = []
    y = y0 + margin + rng.randint(0, page_h // 3)
    pitch = int(px * 1.6)
    for _ in range(rng.randint(4, 8)):
        if y + pitch > y0 + page_h - margin:
            break
        text = _line(rng, script, width_chars)
        while text and draw.textlength(text, font=font) > page_w - 2 * margin:
            text = text[:-1].rstrip()
        draw.text((x0 + margin, y), text, font=font, fill=ink)
        lines.append(text)
        y += pitch
    return img, "\n".join(lines), px


def degrade(
    img: Image.Image, rng: random.Random, *, geometry_only: bool = False, crop: bool = True
) -> tuple[Image.Image, dict[str, float], int]:
    """A phone photo of the page: a seeded mix of what goes wrong. Returns (picture, what was
    done, JPEG quality).

    With ``geometry_only`` only the framing is applied (the perspective and, unless not
    ``crop``, the crop; the same for the same ``rng`` state) and none of the damage: the page
    as the photo framed it, which the label compares the photo with."""
    done: dict[str, float] = {}
    w, h = img.size
    scale = max(w, h) / 4000

    def maybe(p: float) -> bool:
        return rng.random() < p

    if maybe(0.3):
        k = rng.uniform(0.005, 0.04)
        quad = [
            (w * rng.uniform(0, k), h * rng.uniform(0, k)),
            (w * rng.uniform(0, k), h * (1 - rng.uniform(0, k))),
            (w * (1 - rng.uniform(0, k)), h * (1 - rng.uniform(0, k))),
            (w * (1 - rng.uniform(0, k)), h * rng.uniform(0, k)),
        ]
        img = img.transform(
            (w, h),
            Image.Transform.QUAD,
            [c for xy in quad for c in xy],
            Image.Resampling.BILINEAR,
            fillcolor=90,
        )
        done["perspective"] = round(k, 4)
    if maybe(0.5):
        sigma = rng.uniform(0.5, 6) * scale * 1.5 if maybe(0.8) else rng.uniform(0, 2)
        if not geometry_only:
            img = img.filter(ImageFilter.GaussianBlur(sigma))
            done["blur"] = round(sigma, 2)
    arr: np.ndarray = np.asarray(img, dtype=np.float32)
    if maybe(0.3):
        gain = rng.uniform(0.05, 0.7)
        gradient = np.linspace(1.0, rng.uniform(0.4, 1.0), arr.shape[0], dtype=np.float32)
        if not geometry_only:
            arr = arr * gain * gradient[:, None]
            done["dark"] = round(gain, 3)
    elif maybe(0.2):
        c = rng.uniform(0.04, 0.5)
        if not geometry_only:
            arr = 255 - (255 - arr) * c
            done["washed"] = round(c, 3)
    if maybe(0.4):
        sigma = rng.uniform(2, 32)
        noise_seed = rng.randrange(2**32)
        if not geometry_only:
            arr = arr + np.random.default_rng(noise_seed).normal(0, sigma, arr.shape)
            done["noise"] = round(sigma, 1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if maybe(0.3):
        f = rng.uniform(0.2, 0.7)
        if not geometry_only:
            img = img.resize((max(64, int(w * f)), max(64, int(h * f))), Image.Resampling.BILINEAR)
            done["downscale"] = round(f, 3)
    if maybe(0.25):
        side = rng.choice(("left", "right", "top", "bottom"))
        f = rng.uniform(0.03, 0.3)
        cw, ch = img.size
        box = {
            "left": (int(cw * f), 0, cw, ch),
            "right": (0, 0, int(cw * (1 - f)), ch),
            "top": (0, int(ch * f), cw, ch),
            "bottom": (0, 0, cw, int(ch * (1 - f))),
        }[side]
        if crop:
            img = img.crop(box)
            done["crop_" + side] = round(f, 3)
    quality = rng.choice((90, 90, 80, 60, 30, 15, 8)) if maybe(0.5) else 92
    if quality < 90 and not geometry_only:
        done["jpeg"] = quality
    return img, done, 92 if geometry_only else quality


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _normalise(text: str) -> str:
    return "".join(text.split())


def levenshtein(a: str, b: str) -> int:
    """Edit distance, one numpy row at a time (the in-row insertions via a running minimum)."""
    if not a:
        return len(b)
    if not b:
        return len(a)
    bv = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    idx = np.arange(len(b) + 1, dtype=np.int64)
    prev = idx.copy()
    av = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32)
    for i, code in enumerate(av, start=1):
        cost = (bv != code).astype(np.int64)
        cur = np.empty_like(prev)
        cur[0] = i
        cur[1:] = np.minimum(prev[1:] + 1, prev[:-1] + cost)
        cur = np.minimum.accumulate(cur - idx) + idx
        prev = cur
    return int(prev[-1])


def char_accuracy(ocr_text: str, truth: str) -> float:
    t, o = _normalise(truth), _normalise(ocr_text)
    return max(0.0, 1 - levenshtein(o, t) / max(len(t), 1))


def ocr_text(data: bytes, lang: str, *, cache: Path = CACHE) -> str:
    """Tesseract's text of a picture read as one block of text (cached by the exact bytes and
    language, so a new label definition reuses every reading already made). A reading that
    takes over `LABEL_TIMEOUT_S` reads as nothing: the engine now and then churns for minutes
    on a noisy picture (normal readings take a second or two)."""
    key = hashlib.sha256(data + f"\0{lang}:psm6".encode()).hexdigest()[:32]
    path = cache / "labels" / f"{key}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    try:
        proc = subprocess.run(
            ["tesseract", "stdin", "stdout", "-l", lang, "--psm", "6"],
            input=data,
            capture_output=True,
            timeout=LABEL_TIMEOUT_S,
            env=env,
            check=True,
        )
        text = proc.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        text = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return text


TextBox = tuple[tuple[int, int, int, int], float] | None


def _ink(mask: Image.Image) -> int:
    return int((np.asarray(mask) < 60).sum())  # text; the perspective's fill is 90


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def text_box(mask: Image.Image, size: tuple[int, int], px: int) -> TextBox:
    """Where the text lies in a picture of ``size`` framed like ``mask`` (its text in black on
    white, type ``px`` pixels tall), with a margin of 2% of the long side, and the type's size
    there; None when no text is left."""
    ys, xs = np.nonzero(np.asarray(mask) < 60)
    if not len(xs):
        return None
    fx, fy = size[0] / mask.width, size[1] / mask.height
    pad = 0.02 * max(size)
    box = (
        max(0, int(xs.min() * fx - pad)),
        max(0, int(ys.min() * fy - pad)),
        min(size[0], int((xs.max() + 1) * fx + pad)),
        min(size[1], int((ys.max() + 1) * fy + pad)),
    )
    return box, px * fy


LABEL_LINE_PX = 32  # the text's region is read with its type scaled to this size ...
LABEL_LONG_SIDE = 2000  # ... from a copy at most this long (the check reads at this size too)


def region_accuracy(
    data: bytes, lang: str, truth: str, text: TextBox, cache: Path = CACHE
) -> float:
    """The character accuracy of the engine's reading of the text's own region of a picture
    (``text``, from `text_box`) as one block, from a copy reduced to `LABEL_LONG_SIDE` with
    the type scaled to `LABEL_LINE_PX` (0 when the picture holds no text).

    The region, not the whole picture: the engine's page layout analysis now and then splits a
    Chinese page into bogus columns or reads a table's edge into the lines, and its global
    threshold on a whole dark or faded photo drowns text it reads on the region; a label must
    not hang on that. Reduced, because at full size sensor noise defeats the engine where a
    reduced copy (what a person looks at on a screen) reads cleanly; scaled, because small type
    reads better enlarged. A region reading also costs a fraction of a whole-page one."""
    if text is None:
        return 0.0
    box, line = text
    with Image.open(io.BytesIO(data)) as img:
        grey = img.convert("L")
    reduce = min(1.0, LABEL_LONG_SIDE / max(grey.size))
    scale = min(4.0, max(0.25, LABEL_LINE_PX / max(line * reduce, 1.0)))
    size = (max(1, round(grey.width * reduce)), max(1, round(grey.height * reduce)))
    left, top, right, bottom = (round(v * reduce) for v in box)
    reduced = grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    region = reduced.crop((left, top, right, bottom))
    size = (max(1, round(region.width * scale)), max(1, round(region.height * scale)))
    scaled = region.resize(size, Image.Resampling.BICUBIC)
    return char_accuracy(ocr_text(_png(scaled), lang, cache=cache), truth)


SIZES = (1280, 1600, 2000, 2560, 3000, 3200, 4000)
SMALL_SIZES = (1280, 1600)  # the tests' short form: labelling OCR in about a second a page


def sample(seed: int, *, small: bool = False, cache: Path = CACHE) -> Sample:
    """The labelled sample for a seed (cached: rendering and labelling OCR run once)."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = "s" if small else ""
    key = hashlib.sha256(f"v{VERSION}:{tag}{seed}".encode()).hexdigest()[:16]
    meta, pic = cache / f"{key}.json", cache / f"{key}.jpg"
    if meta.exists() and pic.exists():
        return Sample(**json.loads(meta.read_text()))
    rng = random.Random(seed)
    script = SCRIPTS[seed % len(SCRIPTS)]
    lang = LANG[script]
    long_side = rng.choice(SMALL_SIZES if small else SIZES)
    page_seed = rng.randrange(2**32)
    clean, truth, px = layout(page_seed, script, long_side)
    mask = layout(page_seed, script, long_side, text_only=True)[0]
    state = rng.getstate()
    img, done, quality = degrade(clean, rng)

    def framing(page: Image.Image, *, crop: bool = True) -> Image.Image:
        replay = random.Random()
        replay.setstate(state)
        return degrade(page, replay, geometry_only=True, crop=crop)[0]

    # Text cut off: the share of the text's ink (black on white, framed alike) the crop keeps.
    framed_mask = framing(mask)
    text_kept = _ink(framed_mask) / max(_ink(framing(mask, crop=False)), 1)
    framed = framing(clean)
    box = text_box(framed_mask, img.size, px)
    framed_acc = region_accuracy(
        _jpeg(framed, 92), lang, truth, text_box(framed_mask, framed.size, px), cache
    )
    data = _jpeg(img, quality)
    acc = region_accuracy(data, lang, truth, box, cache)
    pic.write_bytes(data)
    result = Sample(seed, script, img.width, img.height, done, acc, framed_acc, text_kept, str(pic))
    meta.write_text(json.dumps(asdict(result)))
    return result


def _small_sample(seed: int) -> Sample:
    return sample(seed, small=True)


def corpus(seeds: range | list[int], *, workers: int = 2, small: bool = False) -> list[Sample]:
    """Samples for the seeds, built in `workers` processes (labelling OCR is the cost); with
    ``small``, pages of `SMALL_SIZES` (the tests' short form)."""
    seeds = list(seeds)
    make = _small_sample if small else sample
    if workers <= 1:
        return [make(s) for s in seeds]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(make, seeds, chunksize=2))
