"""Previews for coordinators: a picture that shows a file is readable. Never interpreted.

* `dicom_contact_sheet`: one PNG for a study, a row of a few evenly chosen thumbnails per series.
  Headers are read first (``stop_before_pixels``, only the tags needed to group and choose);
  only the chosen instances are walked by `intake.dicom.scan` and decoded, one frame each.
  An instance that cannot be shown is a grey tile with an "x"; it never raises.
* `pdf_first_page`: page 1 rendered by PDFium, PNG.
* `image_thumbnail`: EXIF-transposed, JPEG, under the pixel budget of `intake.image`.
* `preview`: the dispatcher by `Kind` value, returning ``(mime, bytes)`` or None.

All are synchronous, pure and module-level, so the worker pool of `intake.runner` can run them
with picklable openers (`intake.runner.OpenPath`, the vault's ``BlobOpener``) as arguments. A file
that cannot be previewed raises `PreviewError` (its ``code`` is the matching finding code); the
sheet draws no patient name, date or identifier: series number, modality, description, counts.
"""

from __future__ import annotations

import contextlib
import io
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from intake import dicom, image, limits, pdf
from intake.verdict import Kind

PREVIEW_LONG_SIDE = 1200  # a PDF page or a photo
MAX_PREVIEW_BYTES = 2_000_000  # any preview; a larger encoding is scaled down until it fits
SHEET_MAX_SIDE = 1600
SHEET_TILE = 256  # largest thumbnail side; smaller when the rows would not fit
PER_SERIES = 4
MAX_SERIES = 6
SHEET_PAD, SHEET_LABEL = 8, 20  # pixels around tiles; height of a label line (the layout below)
_MAX_HEADER_VALUE = 1024  # a header value longer than this is not read (a hostile length)

Opener = Callable[[], BinaryIO]
Source = Opener | BinaryIO  # an opener (picklable for the worker) or an open, seekable stream


class PreviewError(Exception):
    """The file cannot be previewed; ``code`` is the finding code that says why."""

    def __init__(self, code: str, **params: Any) -> None:
        super().__init__(code)
        self.code = code
        self.params = params


@contextlib.contextmanager
def _opened(source: Source) -> Iterator[BinaryIO]:
    """An opener is called and its stream closed after use; a stream is rewound and left open."""
    if not callable(source):
        source.seek(0)
        yield source
        return
    stream = source()
    try:
        yield stream
    finally:
        with contextlib.suppress(Exception):
            stream.close()


def _encode(img: Image.Image, fmt: str, max_bytes: int) -> bytes:
    """PNG or JPEG bytes; scaled down by a fifth at a time until under ``max_bytes``."""
    options: dict[str, Any] = {"quality": 85} if fmt == "JPEG" else {"compress_level": 6}
    while True:
        buf = io.BytesIO()
        img.save(buf, fmt, **options)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
        if min(img.size) < 32:
            raise PreviewError("preview_too_large")
        img = img.resize((img.width * 4 // 5, img.height * 4 // 5), Image.Resampling.BILINEAR)


# DICOM contact sheet --------------------------------------------------------------------------

_HEADER_TAGS = [
    0x00080005,  # SpecificCharacterSet: descriptions in the right encoding
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200013,  # InstanceNumber
    0x00280010,  # Rows
    0x00280011,  # Columns
]
_DISPLAY_TAGS = [0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00283000]  # window, rescale


@dataclass(frozen=True)
class _Header:
    index: int  # position among the sources
    series: str  # SeriesInstanceUID, or a stand-in
    series_number: int | None
    modality: str
    description: str
    number: int | None  # InstanceNumber
    image: bool  # has rows and columns (not a report, structure set or DICOMDIR)


def _header_value(ds: Any, tag: int) -> Any:
    """A header value, or None when absent, deferred by its length, or unparsable."""
    raw = ds.get_item(tag)
    if raw is None or getattr(raw, "length", 0) > _MAX_HEADER_VALUE:
        return None
    try:
        value = ds[tag].value
    except Exception:  # a malformed value is as good as none for a preview
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):  # multi-valued
        value = value[0] if len(value) else None
    return None if value in ("", b"") else value


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_header(source: Source, index: int) -> _Header | None:
    """Group-and-choose tags of one instance, pixels never read; None when unreadable. An
    object without rows and columns is walked (`intake.dicom.scan`) to tell a report, a
    structure set or a DICOMDIR from garbage or a file cut short in its header."""
    import pydicom

    try:
        with _opened(source) as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(
                stream,
                stop_before_pixels=True,
                force=True,
                defer_size=_MAX_HEADER_VALUE,
                specific_tags=_HEADER_TAGS,
            )
            values = {tag: _header_value(ds, tag) for tag in _HEADER_TAGS}
            is_image = bool(_int(values[0x00280010]) and _int(values[0x00280011]))
            if not is_image:
                dicom.scan(stream)  # raises DicomError when cut short or corrupt
    except MemoryError:
        raise
    except Exception:  # garbage, truncated header: counted and shown as unreadable
        return None
    modality = str(values[0x00080060] or "")
    series = str(values[0x0020000E] or "")
    series_number = _int(values[0x00200011])
    return _Header(
        index=index,
        series=series or f"?{series_number}:{modality}",
        series_number=series_number,
        modality=modality,
        description=str(values[0x0008103E] or ""),
        number=_int(values[0x00200013]),
        image=is_image,
    )


def _evenly(items: Sequence[_Header], count: int) -> list[_Header]:
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / (count - 1) if count > 1 else 0
    return [items[round(i * step)] for i in range(count)]


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(values, (1, 99)))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, max(hi, lo + 1e-6)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (values.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _dataset_window(ds: Any) -> tuple[float, float] | None:
    """(low, high) from the first WindowCenter/WindowWidth, when present and sane."""
    center, width = (_header_value(ds, tag) for tag in (0x00281050, 0x00281051))
    try:
        c, w = float(center), float(width)
    except (TypeError, ValueError):
        return None
    return (c - w / 2, c + w / 2) if w > 0 and np.isfinite(c) else None


def _display(arr: np.ndarray, ds: Any, side: int) -> Image.Image:
    """A decoded frame as an 8-bit picture fitted to ``side``: colour as is (palette
    applied), grey through the modality LUT and the dataset's window, else the 1st-99th
    percentile window; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    step = max(1, max(arr.shape[:2]) // (2 * side))  # decimate before any float copy
    arr = arr[::step, ::step]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour: RGB (pydicom converts YBR), shown as is
        rgb = arr[..., :3]
        if rgb.dtype != np.uint8:
            rgb = _stretch(rgb, *_robust_range(rgb))
        picture = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    else:
        values = apply_modality_lut(arr, ds)
        window = _dataset_window(ds)
        grey = _stretch(values, *window) if window else None
        if grey is None or grey.std() < 1:  # no window, or one that shows nothing
            grey = _stretch(values, *_robust_range(values))
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        picture = Image.fromarray(grey, "L")
    return ImageOps.contain(picture, (side, side), Image.Resampling.BILINEAR)


def _decode(source: Source, side: int) -> Image.Image | None:
    """The thumbnail of one instance (middle frame of a multi-frame), or None."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.pixels import pixel_array

    try:
        with _opened(source) as stream, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = dicom.scan(stream)  # the structural walk gates pydicom, as in the check
            findings = {f.code for f in dicom.structural_findings(result)}
            frames = _int(result.values.get("frames")) or 1
            frame_bytes = (
                dicom.expected_pixel_bytes(result.values, result.pixel_tag) or 0
            ) // frames
            if (
                result.pixel_length is None
                or "dicom_pixel_data_truncated" in findings
                or frame_bytes > limits.MAX_FRAME_BYTES
            ):
                return None
            index = frames // 2 if frames > 1 else None
            stream.seek(0)
            ds = Dataset()
            if result.inflated is not None:  # deflated: pydicom inflates (bounded by the walk)
                ds = pydicom.dcmread(stream, force=True)
                arr = pixel_array(ds, index=index)
            else:
                arr = pixel_array(stream, ds_out=ds, index=index, specific_tags=_DISPLAY_TAGS)
            return _display(arr, ds, side)
    except MemoryError:
        raise
    except Exception:  # a codec or a value pydicom cannot handle: a grey tile
        return None


@dataclass
class _Row:
    label: str
    sources: list[Source]  # the instances shown, chosen evenly


def _plain(text: str) -> str:
    """Printable ASCII for the default font (accents dropped, other scripts left out)."""
    text = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in text if " " <= c <= "~").split())


def _series_rows(
    sources: Sequence[Source], per_series: int, max_series: int
) -> tuple[list[_Row], list[str]]:
    """Rows of chosen instances, and footer lines for what has no row."""
    headers = [_read_header(source, i) for i, source in enumerate(sources)]
    unreadable = [sources[i] for i, h in enumerate(headers) if h is None]
    images = [h for h in headers if h is not None and h.image]
    others = sum(1 for h in headers if h is not None and not h.image)
    series: dict[str, list[_Header]] = {}
    for h in images:
        series.setdefault(h.series, []).append(h)
    ordered = sorted(
        series.values(),
        key=lambda s: (s[0].series_number is None, s[0].series_number or 0, s[0].index),
    )
    rows: list[_Row] = []
    for members in ordered[:max_series]:
        members.sort(key=lambda h: (h.number is None, h.number or 0, h.index))
        first = members[0]
        number = "?" if first.series_number is None else str(first.series_number)
        parts = [f"#{number}", first.modality, first.description, f"[{len(members)}]"]
        label = "  ".join(p for p in (_plain(p) for p in parts) if p)
        rows.append(_Row(label, [sources[h.index] for h in _evenly(members, per_series)]))
    # The sheet carries no words of ours, only numbers and the files' own codes: it is made
    # in a worker for a coordinator of any language, and the legend of these marks travels
    # in the photo's caption, from the catalog (coordinator.preview_legend_dicom).
    if unreadable:
        rows.append(_Row(f"?  [{len(unreadable)}]", unreadable[:per_series]))
    footer: list[str] = []
    hidden = ordered[max_series:]
    if hidden:
        footer.append(f"+{len(hidden)} #  [{sum(len(s) for s in hidden)}]")
    if others:
        footer.append(f"+{others}  [-]")
    if not rows and not footer:
        raise PreviewError("dicom_no_instances")
    return rows, footer


def _write(draw: ImageDraw.ImageDraw, y: int, text: str, font: Any) -> None:
    """One line of label at ``y``, cut with "..." to the sheet's width."""
    room = draw.im.size[0] - 2 * SHEET_PAD
    if draw.textlength(text, font=font) > room:
        while text and draw.textlength(text + "...", font=font) > room:
            text = text[:-1]
        text += "..."
    draw.text((SHEET_PAD, y + 2), text, fill="white", font=font)


def _x_tile(side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), (128, 128, 128))
    draw = ImageDraw.Draw(tile)
    a, b = side // 4, side - side // 4
    for line in ((a, a, b, b), (a, b, b, a)):
        draw.line(line, fill=(60, 60, 60), width=max(2, side // 40))
    return tile


def dicom_contact_sheet(
    sources: Sequence[Source],
    *,
    per_series: int = PER_SERIES,
    max_series: int = MAX_SERIES,
    tile: int = SHEET_TILE,
    max_side: int = SHEET_MAX_SIDE,
    max_bytes: int = MAX_PREVIEW_BYTES,
) -> bytes:
    """A PNG contact sheet of a study's instances (one file each in ``sources``).

    A row per series (by SeriesNumber), ``per_series`` thumbnails chosen evenly by
    InstanceNumber, a label with series number, modality, description and image count; at most
    ``max_series`` rows, the rest counted in a footer, as are objects without pixels. Files whose
    header does not read get a row of their own; an instance that does not decode is a grey
    tile with an "x". At most ``max_side`` pixels a side and ``max_bytes`` bytes. Raises
    `PreviewError` (``dicom_no_instances``) only when ``sources`` is empty.
    """
    rows, footer = _series_rows(sources, per_series, max(1, max_series))
    columns = max([len(r.sources) for r in rows] or [1])
    fixed_height = SHEET_PAD * (len(rows) + 2) + SHEET_LABEL * (len(rows) + len(footer))
    side = min(
        tile,
        (max_side - SHEET_PAD) // columns - SHEET_PAD,
        (max_side - fixed_height) // max(len(rows), 1),
    )
    side = max(side, 16)
    width = min(max(SHEET_PAD + columns * (side + SHEET_PAD), 480), max_side)  # room for the labels
    height = min(fixed_height + len(rows) * side, max_side)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    colour = False
    y = SHEET_PAD
    for row in rows:
        _write(draw, y, row.label, font)
        y += SHEET_LABEL
        for i, source in enumerate(row.sources):
            thumb = _decode(source, side)
            colour = colour or (thumb is not None and thumb.mode == "RGB")
            thumb = thumb if thumb is not None else _x_tile(side)
            x = SHEET_PAD + i * (side + SHEET_PAD)
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill="black")
            sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        y += side + SHEET_PAD
    for line in footer:
        _write(draw, y, line, font)
        y += SHEET_LABEL
    return _encode(sheet if colour else sheet.convert("L"), "PNG", max_bytes)


# PDF and images -------------------------------------------------------------------------------


def pdf_first_page(
    stream: BinaryIO,
    password: str | None = None,
    *,
    long_side: int = PREVIEW_LONG_SIDE,
    max_bytes: int = MAX_PREVIEW_BYTES,
) -> bytes:
    """Page 1 as a PNG, ``long_side`` pixels on its longer side. Raises `PreviewError`:
    ``pdf_password_required`` / ``pdf_password_wrong`` / ``pdf_corrupt``."""
    import pypdfium2 as pdfium

    try:
        doc = pdf._open(stream, password or None)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == pdf._ERR_PASSWORD:
            code = "pdf_password_wrong" if password else "pdf_password_required"
            raise PreviewError(code) from exc
        raise PreviewError("pdf_corrupt") from exc
    try:
        if len(doc) == 0:
            raise PreviewError("pdf_corrupt")
        page = doc[0]
        try:
            width, height = page.get_size()
            if min(width, height) <= 0:
                raise PreviewError("pdf_corrupt")
            bitmap = page.render(scale=long_side / max(width, height))
            try:
                picture = bitmap.to_pil().convert("RGB")
            finally:
                bitmap.close()
        finally:
            page.close()
    except pdfium.PdfiumError as exc:
        raise PreviewError("pdf_corrupt") from exc
    finally:
        with contextlib.suppress(Exception):
            doc.close()
    return _encode(picture, "PNG", max_bytes)


def image_thumbnail(
    stream: BinaryIO, *, long_side: int = PREVIEW_LONG_SIDE, max_bytes: int = MAX_PREVIEW_BYTES
) -> bytes:
    """A JPEG no longer than ``long_side``, EXIF-transposed, transparency on white.

    The header is opened by `intake.image.open_image`, under ``limits.MAX_IMAGE_PIXELS``: a
    decompression bomb raises `PreviewError` (``image_too_many_pixels``) before any pixel is
    decoded; a broken file raises it with ``image_corrupt`` or ``image_truncated``.
    """
    try:
        img = image.open_image(stream)
    except image.ImageError as exc:
        raise PreviewError(exc.code, **exc.params) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if img.format == "JPEG":
                img.draft("RGB", (long_side, long_side))  # reduced decode: 1/2, 1/4, 1/8
            img = ImageOps.exif_transpose(img) or img
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                white = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(white, img.convert("RGBA"))
            img = img.convert("RGB")
            img.thumbnail((long_side, long_side), Image.Resampling.BILINEAR)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise PreviewError("image_too_many_pixels") from exc
        except OSError as exc:
            code = "image_truncated" if "truncated" in str(exc) else "image_corrupt"
            raise PreviewError(code) from exc
        except (SyntaxError, ValueError, EOFError) as exc:
            raise PreviewError("image_corrupt") from exc
    return _encode(img, "JPEG", max_bytes)


def preview(kind: str, *sources: Source, password: str | None = None) -> tuple[str, bytes] | None:
    """``(mime, bytes)`` for a file of this `Kind` value, or None for kinds without a preview
    (office, zip, other). DICOM takes a study (every instance's source); PDF and image take one
    source. Raises `PreviewError` when a file cannot be previewed (never for a DICOM instance:
    that is a grey tile), ValueError for an unknown kind or a wrong number of sources."""
    which = Kind(kind)
    if which is Kind.DICOM:
        return "image/png", dicom_contact_sheet(sources)
    if which not in (Kind.PDF, Kind.IMAGE):
        return None
    if len(sources) != 1:
        raise ValueError(f"one file expected for a {which.value} preview, got {len(sources)}")
    with _opened(sources[0]) as stream:
        if which is Kind.PDF:
            return "image/png", pdf_first_page(stream, password)
        return "image/jpeg", image_thumbnail(stream)


__all__ = [
    "MAX_PREVIEW_BYTES",
    "PREVIEW_LONG_SIDE",
    "PreviewError",
    "Source",
    "dicom_contact_sheet",
    "image_thumbnail",
    "pdf_first_page",
    "preview",
]
