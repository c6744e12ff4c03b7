"""Preview benchmark: `python bench/preview_bench.py [INSTANCES]` from the project root.

Prints, for a generated study (default 100 instances of 512x512, two series): the time of its
contact sheet as a ratio to pydicom's bare ``dcmread`` of the same files in the same run (lower
is better; the sheet reads every header and decodes at most 4 instances per series), the sheet's
size; and the median time of a PDF first page and of a 12 MP photo's thumbnail.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "intake")]

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from intake.preview import dicom_contact_sheet, image_thumbnail, pdf_first_page  # noqa: E402
from intake.runner import OpenPath  # noqa: E402


def _median(fn: Callable[[], object], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _photo_12mp() -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.normal(200, 20, (3000, 4000)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").save(buf, "JPEG", quality=88)
    return buf.getvalue()


def main() -> int:
    instances = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as tmp:
        paths = corpus.dicom_study(Path(tmp), instances, series=2, rows=512)
        sources = [OpenPath(str(p)) for p in paths]
        sheet: list[bytes] = []
        t_sheet = _median(lambda: sheet.append(dicom_contact_sheet(sources)), 3)
        t_read = _median(lambda: [pydicom.dcmread(p) for p in paths], 3)
    size = Image.open(io.BytesIO(sheet[-1])).size
    print(f"study: {instances} instances of 512x512 in 2 series")
    print(f"contact sheet: {t_sheet * 1000:.0f} ms, {size[0]}x{size[1]}, {len(sheet[-1])} bytes")
    print(f"dcmread of every file: {t_read * 1000:.0f} ms")
    print(f"ratio sheet / dcmread: {t_sheet / t_read:.2f}")
    pdf = corpus.text_pdf("Discharge summary", pages=5)
    print(f"pdf first page: {_median(lambda: pdf_first_page(io.BytesIO(pdf))) * 1000:.0f} ms")
    photo = _photo_12mp()
    t_photo = _median(lambda: image_thumbnail(io.BytesIO(photo)))
    print(f"12 MP photo thumbnail: {t_photo * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
