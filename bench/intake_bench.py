"""Intake benchmark: `python bench/intake_bench.py` from the project root.

Prints, for a generated 500-instance study as a folder and as a ZIP: the check-and-summary time
as a ratio to pydicom's bare ``dcmread(stop_before_pixels=True)`` over the same files in the same
run (goal >= 0.7; higher is better), and for a generated 12 MP page photo the median time of the
fast screen (decode + measures) and of the full verdict; the peak RSS of this process; the
per-check overhead of the warm worker pool.
"""

from __future__ import annotations

import io
import resource
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "intake")]

import corpus  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from intake import check  # noqa: E402
from intake.archive import check_folder  # noqa: E402
from intake.image import load_grey, measure, open_image  # noqa: E402
from intake.runner import OpenPath, WorkerPool  # noqa: E402


def _median(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _photo_12mp() -> bytes:
    img = Image.new("L", (3000, 4000), 230)
    draw = ImageDraw.Draw(img)
    for row in range(110):
        draw.text(
            (150, 150 + row * 34), "Blood test results 12.3 mmol/L patient date " * 4, fill=25
        )
    arr = np.asarray(img, dtype=np.float32)
    arr += np.random.default_rng(0).normal(0, 3, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert("RGB").save(
        buf, "JPEG", quality=88
    )
    return buf.getvalue()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "study"
        paths = corpus.dicom_study(folder, 500, series=5, rows=256)
        zpath = Path(tmp) / "study.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as z:
            for p in paths:
                z.write(p, f"DICOM/{p.name}")
        size_mb = sum(p.stat().st_size for p in paths) / 1e6

        def bare() -> None:
            for p in paths:
                pydicom.dcmread(p, stop_before_pixels=True)

        def folder_check() -> None:
            verdict = check_folder([str(p) for p in paths], root=str(folder))
            assert verdict.metadata["instance_count"] == 500

        def zip_check() -> None:
            with open(zpath, "rb") as stream:
                verdict = check(stream)
            assert verdict.metadata["instance_count"] == 500, verdict.findings

        bare()  # warm the page cache once, so both sides read warm files
        t_bare = _median(bare)
        t_folder = _median(folder_check)
        t_zip = _median(zip_check)
        print(f"study: 500 instances, 5 series, {size_mb:.0f} MB")
        print(f"  bare dcmread(stop_before_pixels): {t_bare * 1000:.0f} ms")
        print(f"  folder check+summary: {t_folder * 1000:.0f} ms  ratio {t_bare / t_folder:.2f}")
        print(f"  zip check+summary:    {t_zip * 1000:.0f} ms  ratio {t_bare / t_zip:.2f}")

        photo = _photo_12mp()

        def screen() -> None:
            measure(load_grey(open_image(io.BytesIO(photo))))

        def full() -> None:
            check(io.BytesIO(photo))

        print(f"photo 12 MP JPEG ({len(photo) / 1e6:.1f} MB):")
        print(f"  fast screen median: {_median(screen, 7) * 1000:.0f} ms")
        print(f"  full verdict median: {_median(full, 7) * 1000:.0f} ms")

        note = Path(tmp) / "note.txt"
        note.write_text("hello")
        pool = WorkerPool(max_workers=1)
        try:
            started = time.perf_counter()
            pool.check(OpenPath(str(note)), None, None)
            cold = time.perf_counter() - started
            warm = _median(lambda: pool.check(OpenPath(str(note)), None, None), 50)
        finally:
            pool.close()
        print(f"worker pool: first check {cold * 1000:.0f} ms (start), warm {warm * 1000:.2f} ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")
    print("legibility accuracy on a labelled corpus: not measured (no OCR labeller yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
