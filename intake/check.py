"""Entry point of the checks: sniff the content, then hand it to the checker for its kind."""

from __future__ import annotations

import io
import zlib
from typing import BinaryIO

from intake.sniff import HEAD_SIZE, describe_other, sniff
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

_PARSER_ERRORS = (
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    OSError,
    EOFError,
    RecursionError,
    NotImplementedError,
    OverflowError,
    UnicodeError,
    ArithmeticError,
    AssertionError,
    LookupError,
    RuntimeError,
    SyntaxError,
    zlib.error,
)


def check(
    stream: BinaryIO,
    declared_name: str | None = None,
    declared_mime: str | None = None,
    *,
    compressed_photo: bool = False,
    password: str | None = None,
    _depth: int = 0,
) -> Verdict:
    """Judge one file by its content. Never raises for a bad file: a bad file is a verdict.

    ``compressed_photo`` tells that the picture came as a Telegram photo (recompressed), so a
    marginal one is answered with "send it as a File". ``password`` opens a protected PDF
    (the patient typed it after a `pdf_password_required` verdict). MemoryError is let
    through on purpose: the worker runner turns it into ``check_failed`` and recycles the
    process.
    """
    del declared_name, declared_mime  # kept for the coordinator's view; never used to judge
    try:
        stream.seek(0, io.SEEK_END)
        size = stream.tell()
        stream.seek(0)
        if size == 0:
            return verdict_from(Kind.OTHER, [Finding("file_empty", Severity.ERROR)])
        kind = sniff(stream)
        return _dispatch(stream, kind, compressed_photo, _depth, password)
    except MemoryError:
        raise
    except _PARSER_ERRORS as exc:
        return verdict_from(
            Kind.OTHER, [Finding("check_failed", Severity.ERROR, {"reason": type(exc).__name__})]
        )


def _dispatch(
    stream: BinaryIO, kind: Kind, compressed_photo: bool, depth: int, password: str | None = None
) -> Verdict:
    if kind is Kind.PDF:
        from intake.pdf import check_pdf

        return check_pdf(stream, password)
    if kind is Kind.DICOM:
        from intake.dicom import check_dicom

        return check_dicom(stream)
    if kind is Kind.IMAGE:
        from intake.image import check_image

        return check_image(stream, compressed_photo=compressed_photo)
    if kind is Kind.OFFICE:
        from intake.office import check_office

        return check_office(stream)
    if kind is Kind.ZIP:
        from intake.archive import check_zip

        return check_zip(stream, depth=depth)
    stream.seek(0)
    detected = describe_other(stream.read(HEAD_SIZE))
    stream.seek(0)
    return verdict_from(kind, [Finding("unsupported_type", Severity.ERROR, {"detected": detected})])
