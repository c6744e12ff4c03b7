"""Every shipped catalog is complete: each message translated, placeholders kept, no English."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from datetime import UTC, date, datetime
from functools import cache
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po

from bot.polling import COMMANDS
from checklists import load_all
from core.checklist import Accepts
from core.engine import Context, handle
from core.events import Event, EventKind
from core.model import Case, ItemStatus, State
from core.replies import Text, Verbatim
from handlers.render import (
    FSI,
    PDI,
    Translator,
    available_locales,
    format_date,
    format_datetime,
    format_size,
    language_name,
)
from intake.verdict import Kind
from tests.test_catalog import finding_codes

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
TEMPLATE = LOCALES / "messages.pot"
INTENTIONAL = LOCALES / "INTENTIONAL_UNTRANSLATED.txt"
PLACEHOLDER = re.compile(r"\{(\w*)\}")
# The eight languages of issue 7, each with its name in its own script and that script.
SHIPPED = {
    "en": ("English", "LATIN"),
    "zh": ("简体中文", "CJK"),
    "th": ("ไทย", "THAI"),
    "ru": ("Русский", "CYRILLIC"),
    "ar": ("العربية", "ARABIC"),
    "es": ("Español", "LATIN"),
    "vi": ("Tiếng Việt", "LATIN"),
    "id": ("Bahasa Indonesia", "LATIN"),
}
TRANSLATED = sorted(code for code in SHIPPED if code != "en")


@cache
def catalog(locale: str) -> Catalog:
    path = TEMPLATE if locale == "template" else LOCALES / locale / "LC_MESSAGES" / "messages.po"
    with path.open("rb") as handle_:
        return read_po(handle_, locale=None if locale == "template" else locale)


def strings(locale: str) -> dict[str, str]:
    return {str(m.id): str(m.string) for m in catalog(locale) if m.id}


def source_text(msgid: str) -> str:
    """The English a translation renders: the key's English text, or the checklist text."""
    return strings("en").get(msgid) or msgid


def intentional() -> set[str]:
    lines = INTENTIONAL.read_text(encoding="utf-8").splitlines()
    return {line.split("#")[0].strip() for line in lines} - {""}


def msgids() -> list[str]:
    return sorted(str(m.id) for m in catalog("template") if m.id)


def test_the_eight_languages_are_shipped_and_compiled() -> None:
    on_disk = {p.parent.parent.name for p in LOCALES.glob("*/LC_MESSAGES/messages.po")}
    assert on_disk == set(SHIPPED)
    assert set(available_locales()) == set(SHIPPED), "run `pybabel compile -d locales`"


@pytest.mark.parametrize("locale", TRANSLATED)
def test_every_msgid_is_translated(locale: str) -> None:
    found = {str(m.id): m for m in catalog(locale) if m.id}
    missing = [i for i in msgids() if i not in found or not str(found[i].string).strip()]
    fuzzy = sorted(i for i, m in found.items() if m.fuzzy)
    assert missing == [] and fuzzy == []


@pytest.mark.parametrize("locale", TRANSLATED)
def test_translations_keep_exactly_the_placeholders(locale: str) -> None:
    wrong = []
    for msgid, text in strings(locale).items():
        expected = Counter(PLACEHOLDER.findall(source_text(msgid)))
        if Counter(PLACEHOLDER.findall(text)) != expected:
            wrong.append(msgid)
            continue
        try:  # no stray brace that str.format would choke on
            text.format_map({name: "x" for name in expected})
        except (KeyError, IndexError, ValueError):
            wrong.append(msgid)
    assert wrong == []


@pytest.mark.parametrize("locale", TRANSLATED)
def test_no_translation_is_left_in_english(locale: str) -> None:
    allowed = intentional()
    same = sorted(
        msgid
        for msgid, text in strings(locale).items()
        if text == source_text(msgid) and msgid not in allowed
    )
    assert same == []


def test_the_intentional_list_names_only_existing_messages() -> None:
    assert sorted(intentional() - set(strings("en"))) == []


@pytest.mark.parametrize("locale", sorted(SHIPPED))
def test_every_finding_and_checklist_text_has_its_message(locale: str) -> None:
    catalog_ = strings(locale)
    codes = finding_codes()
    assert len(codes) > 30
    wanted = {f"finding.{code}" for code in codes}
    texts = set()
    for checklist in load_all().values():
        texts.add(checklist.title)
        for item in checklist.items:
            texts |= {item.title, item.why, item.how}
    if locale == "en":  # English checklist texts are their own ids: present, msgstr empty
        assert sorted(k for k in wanted if not catalog_.get(k)) == []
        assert sorted(t for t in texts if t not in catalog_) == []
        return
    wanted |= texts
    wanted |= {f"item_status.{s.value}" for s in ItemStatus}
    wanted |= {f"kind.{k.value}" for k in Kind} | {f"kind.{a.value}" for a in Accepts}
    wanted |= {f"not_now.{s.value}" for s in State} | {f"command.{c}" for c in COMMANDS}
    assert sorted(k for k in wanted if not catalog_.get(k)) == []


@pytest.mark.parametrize("locale", TRANSLATED)
def test_the_renderer_uses_the_translation(locale: str) -> None:
    """The compiled catalog is the current one: rendered text equals the .po text."""
    translator = Translator()
    for msgid, text in strings(locale).items():
        if not PLACEHOLDER.search(text):
            assert translator.text(locale, Text(msgid)) == text, msgid


def _script(name: str) -> set[str]:
    return {unicodedata.name(c).split()[0] for c in name if c.isalpha()}


def test_the_language_picker_shows_each_language_in_its_own_script() -> None:
    locales = available_locales()
    context = Context(
        checklists=load_all(),
        locales=locales,
        language_names={code: language_name(code) for code in locales},
        privacy_version="v1",
        now=datetime(2026, 11, 28, tzinfo=UTC),
    )
    case = Case(id="c1", chat_id=1, locale="th")
    outcome = handle(case, Event(EventKind.LANGUAGE_MENU), context)
    labels = {
        button.arg: button.label.value
        for reply in outcome.replies
        for row in reply.buttons
        for button in row
        if isinstance(button.label, Verbatim)
    }
    assert labels == {code: name for code, (name, _) in SHIPPED.items()}
    for code, (name, script) in SHIPPED.items():
        assert _script(name) == {script}, code


def test_arabic_isolates_ids_numbers_and_latin_text() -> None:
    translator = Translator()
    step = translator.text("ar", Text("item.ask", {"position": 2, "total": 7, "title": "CT"}))
    assert f"{FSI}2{PDI}" in step and f"{FSI}7{PDI}" in step and f"{FSI}CT{PDI}" in step
    erased = translator.text("ar", Text("coordinator.case_erased", {"case_id": Verbatim("ab-1")}))
    assert f"{FSI}ab-1{PDI}" in erased
    title = translator.text("ar", Text("item.done", {"title": Text("Passport or ID")}))
    assert FSI not in title  # Arabic inside Arabic needs no isolation
    english = translator.text("en", Text("item.ask", {"position": 2, "total": 7, "title": "CT"}))
    assert FSI not in english and english == "Step 2 of 7: CT"


def test_numbers_dates_and_sizes_follow_the_locale() -> None:
    translator = Translator()
    params = {"modality": "CT", "date": "20240305", "series": 2, "images": 1200}
    assert "1 200" in translator.text("ru", Text("finding.study_summary", params)).replace(
        "\xa0", " "
    )
    assert "5 мар. 2024" in translator.text("ru", Text("finding.study_summary", params))
    assert "2024年3月5日" in translator.text("zh", Text("finding.study_summary", params))
    assert "Mar 5, 2024" in translator.text("en", Text("finding.study_summary", params))
    unknown = dict(params, date="?")
    assert "CT, ?:" in translator.text("en", Text("finding.study_summary", unknown))
    assert format_date(date(2024, 3, 5), "th") == "5 มี.ค. 2024"
    assert "14:30" in format_datetime(datetime(2024, 3, 5, 14, 30), "ru")
    assert format_size(1536 * 1024, "ru").replace("\xa0", " ") == "1,5 МБ"
    assert format_size(1536 * 1024, "en") == "1.5 MB"
