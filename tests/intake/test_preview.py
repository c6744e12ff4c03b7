"""Coordinator previews: a DICOM study's contact sheet, a PDF's first page, a photo's thumbnail.

Bounded in pixels and bytes, never blank for a readable file, and a broken DICOM instance is a
grey tile, never an exception. The sheet's layout (`SHEET_PAD`, `SHEET_LABEL`, tile side) is
used here to look at each thumbnail on its own.
"""

from __future__ import annotations

import io
import pickle
import random
import struct
import zlib
from pathlib import Path

import corpus
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom import examples
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from intake import Kind, limits
from intake.preview import (
    MAX_PREVIEW_BYTES,
    PREVIEW_LONG_SIDE,
    SHEET_LABEL,
    SHEET_MAX_SIDE,
    SHEET_PAD,
    SHEET_TILE,
    PreviewError,
    dicom_contact_sheet,
    image_thumbnail,
    pdf_first_page,
    preview,
)
from intake.runner import OpenPath

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on odd test files

# Bundled with pydicom (get_testdata_file downloads anything else: not in tests).
BUNDLED = {
    "ct": examples.get_path("ct"),
    "mr": examples.get_path("mr"),
    "palette": examples.get_path("palette_color"),
    "rgb": examples.get_path("rgb_color"),
    "ybr_jpeg": examples.get_path("ybr_color"),  # JPEG baseline, multi-frame (30)
    "jpeg2000": get_testdata_file("JPEG2000.dcm"),
    "rgb_jpeg": get_testdata_file("SC_rgb_jpeg_gdcm.dcm"),
    "rgb_rle_2frame": get_testdata_file("SC_rgb_rle_2frame.dcm"),
    "deflated": get_testdata_file("image_dfl.dcm"),
    "mr_rle": get_testdata_file("MR_small_RLE.dcm"),
}


def _open(png: bytes) -> Image.Image:
    """The PNG verified by Pillow, then reopened to read its pixels."""
    Image.open(io.BytesIO(png)).verify()
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return img


def _bounded(img: Image.Image, data: bytes) -> None:
    assert max(img.size) <= SHEET_MAX_SIDE
    assert len(data) <= MAX_PREVIEW_BYTES


def _tile(sheet: Image.Image, row: int, col: int, side: int = SHEET_TILE) -> np.ndarray:
    """The grey pixels of one thumbnail cell."""
    x = SHEET_PAD + col * (side + SHEET_PAD)
    y = SHEET_PAD + SHEET_LABEL + row * (SHEET_LABEL + side + SHEET_PAD)
    return np.asarray(sheet.convert("L").crop((x, y, x + side, y + side)), dtype=np.float32)


def _is_x_tile(cell: np.ndarray) -> bool:
    """The grey "x" of an instance that could not be shown (mostly exactly grey 128)."""
    return float((cell == 128).mean()) > 0.5


def _shows_an_image(cell: np.ndarray) -> bool:
    return cell.std() > 1 and not _is_x_tile(cell)


def _instance(path: Path, series: str, number: int, pixels: np.ndarray, **attrs: object) -> Path:
    """A CT instance built on pydicom's example, with our series, number and pixels."""
    ds = pydicom.dcmread(examples.get_path("ct"))
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for name, value in attrs.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(base: int, size: int = 64) -> np.ndarray:
    return base + np.tile(np.arange(size, dtype=np.uint16), (size, 1))


# DICOM contact sheet --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_each_bundled_example_gives_a_visible_thumbnail(name: str) -> None:
    """Plain, palette, RGB, YBR, JPEG, JPEG 2000, RLE, deflated, multi-frame: one picture each."""
    data = dicom_contact_sheet([OpenPath(BUNDLED[name])])
    sheet = _open(data)
    _bounded(sheet, data)
    assert _shows_an_image(_tile(sheet, 0, 0)), name


def test_colour_stays_colour_and_grey_stays_grey() -> None:
    """An RGB instance makes an RGB sheet; a grey study a single-channel one (smaller)."""
    assert _open(dicom_contact_sheet([OpenPath(BUNDLED["rgb"])])).mode == "RGB"
    assert _open(dicom_contact_sheet([OpenPath(BUNDLED["ct"])])).mode == "L"


def test_ct_and_mr_give_two_rows_each_visible() -> None:
    """Two series are two rows; the same series twice stays one row."""
    ct, mr = OpenPath(BUNDLED["ct"]), OpenPath(BUNDLED["mr"])
    one = _open(dicom_contact_sheet([ct, ct]))
    two_data = dicom_contact_sheet([ct, mr])
    two = _open(two_data)
    _bounded(two, two_data)
    assert two.height - one.height == SHEET_LABEL + SHEET_TILE + SHEET_PAD
    assert _shows_an_image(_tile(two, 0, 0)) and _shows_an_image(_tile(two, 1, 0))
    assert _shows_an_image(_tile(one, 0, 1))


def test_thumbnails_are_chosen_evenly_by_instance_number(tmp_path: Path) -> None:
    """Ten instances given shuffled: the row shows numbers 1, 4, 7, 10 in order, through the
    dataset's window (brightness grows with the number here)."""
    series = generate_uid()
    paths = [
        _instance(
            tmp_path / f"i{n}", series, n, _ramp(300 * n), WindowCenter=1650, WindowWidth=3300
        )
        for n in range(1, 11)
    ]
    random.Random(4).shuffle(paths)
    sheet = _open(dicom_contact_sheet([OpenPath(str(p)) for p in paths]))
    means = [_tile(sheet, 0, col).mean() for col in range(4)]
    expected = [(300 * n + 31.5) * 255 / 3300 for n in (1, 4, 7, 10)]
    assert means == pytest.approx(expected, abs=6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    """The same pixels as MONOCHROME1 show as the negative of MONOCHROME2."""
    pixels = _ramp(0) * 10
    normal = _instance(tmp_path / "m2", generate_uid(), 1, pixels)
    inverted = _instance(
        tmp_path / "m1", generate_uid(), 1, pixels, PhotometricInterpretation="MONOCHROME1"
    )
    a = _tile(_open(dicom_contact_sheet([OpenPath(str(normal))])), 0, 0)
    b = _tile(_open(dicom_contact_sheet([OpenPath(str(inverted))])), 0, 0)
    assert np.abs((a + b) - 255).mean() < 2


def test_a_window_that_shows_nothing_falls_back_to_percentiles(tmp_path: Path) -> None:
    """A window far off the pixel values would be a black tile: the robust window is used."""
    path = _instance(
        tmp_path / "off", generate_uid(), 1, _ramp(100), WindowCenter=60000, WindowWidth=10
    )
    assert _shows_an_image(_tile(_open(dicom_contact_sheet([OpenPath(str(path))])), 0, 0))


def test_broken_instances_are_grey_tiles_never_exceptions() -> None:
    """Pixel data cut short (same series as MR_small), garbage, a header cut short: grey x."""
    ct_bytes = Path(BUNDLED["ct"]).read_bytes()
    sources = [
        OpenPath(BUNDLED["mr"]),
        OpenPath(get_testdata_file("MR_truncated.dcm")),
        io.BytesIO(b"not a scan at all " * 100),
        io.BytesIO(ct_bytes[:1000]),
        io.BytesIO(b""),
    ]
    data = dicom_contact_sheet(sources)
    sheet = _open(data)
    _bounded(sheet, data)
    assert _shows_an_image(_tile(sheet, 0, 0))  # MR_small
    assert _is_x_tile(_tile(sheet, 0, 1))  # MR_truncated, in its series
    assert all(_is_x_tile(_tile(sheet, 1, col)) for col in range(3))  # the unreadable row


def test_objects_without_pixels_are_counted_not_tiled() -> None:
    """A structure set or a DICOMDIR beside an image adds a footer line, not a row."""
    with_rt = _open(
        dicom_contact_sheet([OpenPath(BUNDLED["ct"]), OpenPath(get_testdata_file("rtplan.dcm"))])
    )
    alone = _open(dicom_contact_sheet([OpenPath(BUNDLED["ct"])]))
    assert with_rt.height - alone.height == SHEET_LABEL


def test_many_series_and_a_tight_byte_cap_stay_bounded(tmp_path: Path) -> None:
    """Nine series of noisy 512 px images: within the side and byte caps, also when a tight
    cap forces the sheet down; series past `max_series` are one footer line, not rows."""
    rng = np.random.default_rng(0)
    paths = [
        _instance(
            tmp_path / f"s{s}_{n}",
            f"1.2.3.{s}",
            n,
            rng.integers(0, 4000, (512, 512)),
            SeriesNumber=s,
        )
        for s in range(1, 10)
        for n in range(1, 6)
    ]
    sources = [OpenPath(str(p)) for p in paths]
    data = dicom_contact_sheet(sources)
    sheet = _open(data)
    _bounded(sheet, data)
    small = dicom_contact_sheet(sources, max_bytes=100_000)
    assert len(small) <= 100_000
    assert max(_open(small).size) < max(sheet.size)
    two_rows = _open(dicom_contact_sheet(sources, max_series=2))
    assert (
        two_rows.height == 2 * SHEET_PAD + 2 * (SHEET_LABEL + SHEET_TILE + SHEET_PAD) + SHEET_LABEL
    )


def test_no_sources_is_a_preview_error() -> None:
    with pytest.raises(PreviewError) as caught:
        dicom_contact_sheet([])
    assert caught.value.code == "dicom_no_instances"


def test_no_identifier_is_drawn(tmp_path: Path) -> None:
    """The label is series number, modality, description and count: the patient's name on
    the file changes nothing on the sheet."""
    series = generate_uid()
    sheets = [
        dicom_contact_sheet(
            [OpenPath(str(_instance(tmp_path / name, series, 1, _ramp(0), PatientName=name)))]
        )
        for name in ("Doe^Jane", "Somebody^Else^Entirely")
    ]
    assert sheets[0] == sheets[1]


# PDF ------------------------------------------------------------------------------------------


def test_pdf_first_page_is_a_bounded_png() -> None:
    data = pdf_first_page(io.BytesIO(corpus.text_pdf("Discharge summary", pages=3)))
    page = _open(data)
    assert max(page.size) == PREVIEW_LONG_SIDE
    assert len(data) <= MAX_PREVIEW_BYTES
    assert np.asarray(page.convert("L")).std() > 1  # text, not a blank page


def test_pdf_password() -> None:
    """Without or with a wrong password: a PreviewError naming which; with it: the page."""
    locked = corpus.encrypted_pdf("s3cret")
    for password, code in ((None, "pdf_password_required"), ("nope", "pdf_password_wrong")):
        with pytest.raises(PreviewError) as caught:
            pdf_first_page(io.BytesIO(locked), password)
        assert caught.value.code == code
    assert _open(pdf_first_page(io.BytesIO(locked), "s3cret")).size[0] > 0


def test_broken_pdf_is_a_preview_error() -> None:
    with pytest.raises(PreviewError) as caught:
        pdf_first_page(io.BytesIO(b"%PDF-1.7\n" + b"\0" * 500))
    assert caught.value.code == "pdf_corrupt"


# Images ---------------------------------------------------------------------------------------


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    img = Image.new("RGB", (width, height), (230, 225, 210))
    draw = ImageDraw.Draw(img)
    for y in range(40, height - 40, 60):
        draw.text((40, y), "Haemoglobin 13.2 g/dL " * 20, fill=(20, 20, 20))
    draw.rectangle((0, 0, width // 10, height // 10), fill=(200, 0, 0))  # top-left marker
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_large_jpeg_thumbnail_is_bounded() -> None:
    data = image_thumbnail(io.BytesIO(_jpeg(4000, 3000)))
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG"
    assert thumb.size == (PREVIEW_LONG_SIDE, 900)
    assert len(data) <= MAX_PREVIEW_BYTES


def test_thumbnail_follows_exif_orientation() -> None:
    """Orientation 6 (rotate 90 clockwise): a landscape sensor picture shows as portrait."""
    thumb = Image.open(io.BytesIO(image_thumbnail(io.BytesIO(_jpeg(1600, 800, 6)))))
    assert thumb.size == (600, 1200)
    r, g, _ = thumb.convert("RGB").getpixel((thumb.width - 10, 10))  # marker now top-right
    assert r > 150 and g < 80


def test_png_with_transparency_on_white() -> None:
    img = Image.new("RGBA", (300, 200), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle((50, 50, 250, 150), fill=(0, 0, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    thumb = Image.open(io.BytesIO(image_thumbnail(buf))).convert("RGB")
    assert thumb.size == (300, 200)
    assert min(thumb.getpixel((5, 5))) > 240  # transparent corner is white, not black


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with a token IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 9_000)])
def test_decompression_bomb_is_refused_before_decoding(size: tuple[int, int]) -> None:
    """Over `limits.MAX_IMAGE_PIXELS` (the check's budget): PreviewError, nothing decoded."""
    assert size[0] * size[1] > limits.MAX_IMAGE_PIXELS
    with pytest.raises(PreviewError) as caught:
        image_thumbnail(io.BytesIO(_png_header_bomb(*size)))
    assert caught.value.code == "image_too_many_pixels"


def test_broken_image_is_a_preview_error() -> None:
    whole = _jpeg(800, 600)
    for data in (b"\x89PNG\r\n\x1a\nnothing", whole[: len(whole) // 3]):
        with pytest.raises(PreviewError) as caught:
            image_thumbnail(io.BytesIO(data))
        assert caught.value.code in ("image_corrupt", "image_truncated")


# Dispatcher -----------------------------------------------------------------------------------


def test_dispatcher_by_kind(tmp_path: Path) -> None:
    """DICOM takes a study, PDF and image one source (opener or stream); others: no preview."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg(800, 600))
    mime, data = preview("dicom", OpenPath(BUNDLED["ct"]), OpenPath(BUNDLED["mr"])) or ("", b"")
    assert mime == "image/png" and _open(data).height > SHEET_TILE * 2
    mime, _ = preview(Kind.PDF, io.BytesIO(corpus.text_pdf("Report"))) or ("", b"")
    assert mime == "image/png"
    mime, _ = preview("image", OpenPath(str(photo))) or ("", b"")
    assert mime == "image/jpeg"
    for kind in ("office", "zip", "other"):
        assert preview(kind, io.BytesIO(b"PK\x03\x04")) is None
    with pytest.raises(ValueError, match="valid Kind"):
        preview("spreadsheet", io.BytesIO(b""))
    with pytest.raises(ValueError):
        preview("pdf", io.BytesIO(b""), io.BytesIO(b""))


def test_dispatcher_and_openers_pickle_for_the_worker_pool() -> None:
    """What a worker job would carry: the function by reference and picklable openers."""
    job = (preview, ("dicom", OpenPath(BUNDLED["ct"])), {"password": None})
    fn, args, kwargs = pickle.loads(pickle.dumps(job))  # noqa: S301 - our own bytes
    assert fn is preview
    mime, data = fn(*args, **kwargs)
    assert mime == "image/png" and _open(data).size[0] > 0
