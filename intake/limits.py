"""Every limit the checks enforce, in one place (sizes in bytes unless named otherwise)."""

from __future__ import annotations

# Images
MAX_IMAGE_PIXELS = 64_000_000  # 64 MP: above any phone camera (48 MP sensors bin to 12 MP)
ANALYSIS_LONG_SIDE = 1600  # legibility measures run on a copy this size
MIN_TEXT_SIDE = 600  # shorter side below this cannot carry a page of text

# PDF
MAX_PDF_PAGES = 2000
MAX_PAGES_ANALYSED = 30  # pages rendered for blank/scan checks; the rest are counted only
PDF_RENDER_DPI = 40
PDF_SCAN_DPI = 110  # scanned pages are measured at this resolution
MAX_PDF_PAGE_PIXELS = 40_000_000  # a page rendered at PDF_SCAN_DPI larger than this is skipped
MAX_TEXT_CHARS = 20_000  # text sampled for language detection

# DICOM
MAX_DICOM_DEPTH = 16  # sequence nesting; real files rarely exceed 4
MAX_DICOM_ELEMENTS = 200_000
MAX_DEFLATED_SIZE = 64 * 1024 * 1024
MAX_DEFLATE_RATIO = 200
MAX_FRAME_BYTES = 192 * 1024 * 1024  # one decoded frame

# ZIP
MAX_ZIP_ENTRIES = 10_000
MAX_ZIP_TOTAL = 8 * 1024**3  # expanded size of everything (a full CD is < 1 GB)
MAX_ZIP_MEMBER = 2 * 1024**3
MAX_ZIP_RATIO = 100  # per entry, above 1 MiB expanded
ZIP_RATIO_FLOOR = 1024 * 1024
MAX_ZIP_DEPTH = 2  # a ZIP inside a ZIP is read; one more level is refused
MAX_ZIP_NAME = 1024

# Office
MAX_OFFICE_ENTRIES = 5_000
MAX_OFFICE_TOTAL = 512 * 1024 * 1024

# Photo legibility: fast screen, then OCR (intake/ocr.py) on a crop of the text. The verdict's
# calibrated thresholds live in intake/image.py (picked by `python bench/legibility_bench.py` on
# the train half of the generated labelled corpus, reported on its held-out half).
OCR_TIMEOUT_S = 8.0  # one tesseract run on a crop; a timeout reads as nothing read
OCR_LONG_SIDE = 2000  # the OCR sample is cut from a copy this size (10 pt type: ~23 px em)
OCR_WINDOW = (0.18, 0.6)  # (height, width) share of the picture read: the densest text there
OCR_BUDGET_S = 6.0  # all the languages read for one picture; past it, the readings made decide
# The fast screen's verdict when there is no OCR (not calibrated on the corpus: without OCR it
# scores what `bench/legibility_bench.py` prints as "fast screen alone").
SCREEN_FOCUS_REJECT = 1.1  # far out of focus
SCREEN_FOCUS_MARGINAL = 2.2
SCREEN_LOW_CONTRAST = 12  # p99.5 - p0.5 grey levels: flat
OCR_STRONG_WORD = 80.0  # a word read at this confidence or more counts as "strong"
OCR_CONF_MARGINAL = 88.0  # below, a Telegram photo is nudged to "send as File"
READ_DARK_MEDIAN = 90  # when OCR fails: the cause named is darkness below this median grey
READ_LOW_CONTRAST = 60  # ... or low contrast below this
OCR_LINE_PX = 32  # small type is enlarged to lines this tall before OCR (at most OCR_MAX_UPSCALE)
OCR_MAX_UPSCALE = 3.0
OCR_SAMPLE_LINES = 8  # the sample read: about this many lines of this many characters
OCR_SAMPLE_LINE_CHARS = 90
