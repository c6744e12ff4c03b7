"""Identity check: names and birth dates inside records against the patient's, across scripts."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from core.identity import (
    BIRTH_DATE_MISMATCH,
    NAME_MISMATCH,
    IdentityEvidence,
    IdentityFinding,
    Match,
    check_identity,
    compare_dates,
    compare_names,
    find_in_text,
    name_keys,
    parse_date,
)
from intake import check
from intake.cli import main as cli_main
from intake.pdf import TEXT_SAMPLE_CHARS
from tests.files import pdf_bytes

ROOT = Path(__file__).resolve().parent.parent
BORN = date(1980, 1, 31)
M, X, U = Match.MATCH, Match.MISMATCH, Match.UNKNOWN


@pytest.mark.parametrize(
    ("patient", "found"),
    [
        ("Wang Xiaoming", "王^小明"),  # pinyin against the ideographic header
        ("Wáng Xiǎomíng", "王小明"),  # tones typed, no space in the Chinese
        ("Wangxiaoming", "王小明"),  # pinyin without spaces
        ("王小明", "WANG^XIAO MING"),  # the syllables spaced in the header
        ("Xiaoming Wang", "WANG^XIAOMING"),  # given name first
        ("Wang Xiaoming", "Wang^Xiaoming=王^小明=おう^しょうめい"),  # component groups
        ("Shan Tianfang", "单^田芳"),  # 单 is read shan as a family name
        ("Lyu Bu", "吕^布"),  # ü spelled yu on a passport
        ("สมชาย ใจดี", "SOMCHAI^JAIDEE"),  # Thai against a common romanisation
        ("นายสมชาย ใจดี", "Somchai Jaidee"),  # with the title นาย (Mr)
        ("สมศักดิ์ ใจดี", "SOMSAK^JAIDEE"),  # a silent letter (ดิ์)
        ("กนกพร ใจดี", "KANOKPORN^JAIDEE"),  # -porn for final ร
        ("ฉัตรชัย ศรีสุข", "CHATCHAI^SISUK"),  # ร unspoken in ฉัตร and in ศรี
        ("สมชาย ใจดี", "สมชายใจดี"),  # Thai written without a space
        ("José Müller", "JOSE^MUELLER"),  # umlaut written ue
        ("José Müller", "MULLER^JOSE"),  # umlaut dropped, order swapped
        ("José Müller", "José Müller".encode().decode("latin-1")),  # UTF-8 read as Latin-1
        ("Иван Петров", "IVAN^PETROV"),  # Cyrillic
        ("Юрий Гагарин", "GAGARIN^IURII"),  # the passport's transliteration, not anyascii's
        ("Евгений Толстой", "YEVGENY^TOLSTOI"),
        ("Ελένη Παπαδοπούλου", "PAPADOPOULOU^ELENI"),  # Greek
        ("Mohammed Al-Hassan", "محمد الحسن"),  # Arabic, written without short vowels
        ("Doe, John", "JOHN DOE"),  # comma, case
        ("John Doe", "J. Doe"),  # an initial
        ("John Michael Doe", "DOE^JOHN"),  # a missing middle name
        ("Jean-Pierre Martin", "MARTIN^JEANPIERRE"),  # hyphen
        ("Dr. John Doe", "DOE^JOHN^^MR"),  # titles
    ],
)
def test_names_that_match(patient: str, found: str) -> None:
    assert compare_names(patient, found) is M
    assert compare_names(found, patient) is M


@pytest.mark.parametrize(
    ("patient", "found"),
    [
        ("Wang Xiaoming", "WANG^XIAOHONG"),  # same family name, another given name
        ("王小明", "WANG^XIAOHONG"),
        ("王小明", "WANG^MING"),  # a Chinese syllable is not a middle name
        ("Yu Xiaoming", "王小明"),  # no rare reading of 王 as a family name
        ("สมชาย ใจดี", "SOMSAK^JAIDEE"),  # another Thai given name
        ("สมชาย ใจดี", "SOMYING^JAIDEE"),  # one consonant apart is another name
        ("Somchai Jaidee", "สมหญิงใจดี"),  # also when the Thai has no space
        ("Ivan Petrov", "Petrova Anna"),
        ("Иван Петров", "IVANA^PETROVA"),  # tolerant transliteration keeps Ivan from Ivana
        ("José Müller", "JOSE^MILLER"),
        ("John Doe", "Jane Doe"),
        ("J. Doe", "Jane Roe"),
    ],
)
def test_names_that_differ(patient: str, found: str) -> None:
    assert compare_names(patient, found) is X
    assert compare_names(found, patient) is X


@pytest.mark.parametrize(
    ("patient", "found"),
    [
        ("John Doe", ""),  # no name in the header
        ("", "DOE^JOHN"),  # the patient has not given one
        ("John Doe", "ANONYMOUS"),  # an anonymised study
        ("John Doe", "^^^"),  # empty components
        ("John Doe", "DOE"),  # the family name alone neither confirms nor contradicts
        ("John Doe", "J. D."),  # initials alone
    ],
)
def test_names_too_thin_to_tell(patient: str, found: str) -> None:
    assert compare_names(patient, found) is U


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("王小明", {("wang", "xiaoming"), ("ming", "wang", "xiao"), ("wangxiaoming",)}),
        ("Doe^John", {("doe", "john")}),
        ("Müller", {("muller",), ("mueller",)}),
        ("Wang^Xiaoming=王^小明", {("wang", "xiaoming"), ("ming", "wang", "xiao")}),
        ("Иван", {("ivan",)}),
    ],
)
def test_name_keys(name: str, expected: set[tuple[str, ...]]) -> None:
    """Sorted token tuples: Chinese joined and per syllable, umlauts both ways, scripts folded."""
    assert expected <= name_keys(name)
    assert name_keys("John DOE") & name_keys("Doe^John")
    assert name_keys("") == name_keys("ANONYMOUS") == set()


@pytest.mark.parametrize(
    "text",
    [
        "19800131",  # DICOM DA
        "25230131",  # DA written in the Thai Buddhist era
        "1980-01-31",
        "1980-01-31T08:30:00",
        "1980/01/31",
        "31.01.1980",
        "31/01/1980",
        "31-01-1980",
        "01/31/1980",  # month first, as day first is impossible
        "31/01/2523",  # Buddhist era
        "1980年1月31日",
        "1980年01月31日",
        "31 Jan 1980",
        "31 January 1980",
        "January 31, 1980",
        "31. Januar 1980",
        "31 de enero de 1980",
        "31 января 1980 г.",
        "31 ม.ค. 2523",
        "31 มกราคม พ.ศ. 2523",
    ],
)
def test_parse_date_formats(text: str) -> None:
    assert parse_date(text) == BORN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("02/01/1980", date(1980, 1, 2)),  # ambiguous: day first
        ("", None),
        ("no date here", None),
        ("31.02.1980", None),  # impossible
        ("1980", None),  # a year alone
        ("12/13/14/1980", None),
    ],
)
def test_parse_date_ambiguous_or_absent(text: str, expected: date | None) -> None:
    assert parse_date(text) == expected


@pytest.mark.parametrize(
    ("patient", "found", "expected"),
    [
        (BORN, parse_date("19800131"), M),
        (BORN, parse_date("31/01/2523"), M),
        (BORN, parse_date("19800130"), X),
        (BORN, parse_date("31.01.1981"), X),
        (BORN, parse_date("1980"), U),  # a year alone is not compared
        (None, BORN, U),
    ],
)
def test_compare_dates(patient: date | None, found: date | None, expected: Match) -> None:
    assert compare_dates(patient, found) is expected


@pytest.mark.parametrize(
    ("text", "name", "born", "expected"),
    [
        ("Patient: John Doe DOB: 31.01.1980", "John Doe", BORN, (M, M)),
        ("Patient: Jane Roe DOB: 01.02.1975", "John Doe", BORN, (X, X)),
        ("Patient: Jane Roe\ncc: John Doe", "John Doe", BORN, (X, U)),  # the label decides
        ("Name:\nJane Roe\n", "John Doe", BORN, (X, U)),  # the value under its label
        ("Patient Name: DOE^JOHN\nDate of birth 1980-01-31", "John Doe", BORN, (M, M)),
        ("MRI right knee: no effusion, ligaments intact.", "John Doe", BORN, (U, U)),
        ("Referring physician: Dr Albert Smith", "John Doe", BORN, (U, U)),  # not the patient
        ("Doctor Name: Albert Smith", "John Doe", BORN, (U, U)),  # "Name:" of someone else
        ("Patient: the patient is a 45-year-old man", "John Doe", BORN, (U, U)),  # prose
        ("Seen on 31.01.1980 for review.", "John Doe", BORN, (U, M)),  # the date appears
        ("Report date: 05.03.2024", "John Doe", BORN, (U, U)),  # another date, unlabelled
        ("DOB: 02/01/1980", "John Doe", date(1980, 2, 1), (U, M)),  # month first is possible
        ("姓名：王小明 性别：男 出生日期：1980年1月31日", "Wang Xiaoming", BORN, (M, M)),
        ("姓名：王小红 性别：男 出生日期：1980年2月1日", "Wang Xiaoming", BORN, (X, X)),
        ("患者王小明，男，因膝关节疼痛入院。", "Wang Xiaoming", BORN, (M, U)),  # running text
        ("患者王小明，男，因膝关节疼痛入院。", "王小明", BORN, (M, U)),
        ("Wang Xiaoming was seen in clinic today.", "王小明", BORN, (M, U)),
        ("ชื่อ นายสมชาย ใจดี อายุ 45 ปี วันเกิด 31 ม.ค. 2523", "Somchai Jaidee", BORN, (M, M)),
        ("ชื่อนายสมศักดิ์ใจดีอายุ45ปี", "สมชาย ใจดี", BORN, (X, U)),  # Thai without spaces
        ("ผู้ป่วยนายสมชายใจดีมาด้วยอาการปวดเข่า", "Somchai Jaidee", BORN, (M, U)),
        ("ФИО: Петров Иван Сергеевич\nДата рождения: 31.01.1980", "Ivan Petrov", BORN, (M, M)),
        ("ФИО: Петрова Анна\nДата рождения: 01.02.1985", "Ivan Petrov", BORN, (X, X)),
        ("Nombre: José Müller  Fecha de nacimiento: 31/01/1980", "Jose Mueller", BORN, (M, M)),
        ("Patient: John Doe", "", None, (U, U)),  # nothing to compare with
    ],
)
def test_find_in_text(
    text: str, name: str, born: date | None, expected: tuple[Match, Match]
) -> None:
    """Only a labelled name or birth date that differs is a mismatch; absence is unknown."""
    assert find_in_text(text, name, born) == IdentityEvidence(*expected)


def test_check_identity_reports_each_record_that_differs() -> None:
    summaries = [
        {"patient_name": "WANG XIAOMING", "patient_birth_date": "19800131"},
        {"patient_name": "WANG XIAOHONG", "patient_birth_date": "19800131"},
        {"patient_name": "Wang Xiaoming=王 小明", "patient_birth_date": "19750201"},
        {"modality": "CT"},  # an anonymised header: nothing to say
    ]
    texts = ["姓名：王小明", "Patient: Jane Roe DOB: 01.02.1975", None]
    findings = check_identity("Wang Xiaoming", BORN, summaries, texts)
    assert findings == [
        IdentityFinding(NAME_MISMATCH, "dicom", 1),
        IdentityFinding(BIRTH_DATE_MISMATCH, "dicom", 2),
        IdentityFinding(NAME_MISMATCH, "pdf", 1),
        IdentityFinding(BIRTH_DATE_MISMATCH, "pdf", 1),
    ]
    assert [f.name for f in dataclasses.fields(IdentityFinding)] == ["code", "source", "index"]
    assert check_identity("", None, summaries, texts) == []


def test_heavy_transliteration_is_imported_only_when_needed() -> None:
    """Importing the module loads neither pypinyin (~0.2 s) nor anyascii."""
    code = "import sys, core.identity; print('pypinyin' in sys.modules, 'anyascii' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_pdf_verdict_keeps_a_text_sample_for_the_check() -> None:
    verdict = check(io.BytesIO(pdf_bytes(["Patient: John Doe DOB: 31.01.1980"])))
    sample = verdict.metadata["text_sample"]
    assert "Patient: John Doe DOB: 31.01.1980" in sample
    assert find_in_text(sample, "John Doe", BORN) == IdentityEvidence(M, M)


def test_pdf_text_sample_is_bounded_to_the_first_pages() -> None:
    short = check(io.BytesIO(pdf_bytes(["Discharge summary"], pages=3)))
    assert "Page 2 of 3" in short.metadata["text_sample"]
    assert "Page 3 of 3" not in short.metadata["text_sample"]
    long = check(io.BytesIO(pdf_bytes(["x" * 90 + f" line {i}" for i in range(40)], pages=2)))
    assert len(long.metadata["text_sample"]) == TEXT_SAMPLE_CHARS


def test_check_cli_never_prints_the_text_sample(tmp_path: Path, capsys) -> None:
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf_bytes(["Patient: John Doe DOB: 31.01.1980"]))
    for args in ([str(path)], [str(path), "--json"]):
        assert cli_main(args) == 0
        out = capsys.readouterr().out
        assert "John Doe" not in out
        assert "text_sample" not in out
    assert json.loads(out)["metadata"]["page_count"] == 1
