"""The shipped checklist files load, and a broken file is rejected with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

import checklists
from core.checklist import Accepts, Checklist

EXPECTED_KEYS = {
    "general",
    "joint_replacement",
    "cardiac_surgery",
    "cancer_treatment",
    "dental_implants",
    "ivf",
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, Checklist]:
    return checklists.load_all()


def test_every_expected_checklist_is_there(loaded: dict[str, Checklist]) -> None:
    assert set(loaded) >= EXPECTED_KEYS
    for name, checklist in loaded.items():
        assert checklist.key == name


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_has_required_referral_for_translation(loaded: dict[str, Checklist], key: str) -> None:
    referrals = [
        item
        for item in loaded[key].items
        if "referral" in item.key or "referral" in item.title.lower()
    ]
    assert referrals, f"{key}: no referral item"
    assert any(item.required and item.translation_priority for item in referrals)


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_has_typed_medicines_answer(loaded: dict[str, Checklist], key: str) -> None:
    medicines = [item for item in loaded[key].items if "medic" in item.key]
    assert medicines, f"{key}: no medicines item"
    assert any(item.accepts == frozenset({Accepts.TEXT}) for item in medicines)
    for item in medicines:
        assert item.max_files == 1


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS - {"general"}))
def test_shared_items_reuse_the_general_wording(loaded: dict[str, Checklist], key: str) -> None:
    general = {item.key: item for item in loaded["general"].items}
    for item in loaded[key].items:
        if item.key in {"referral", "medications", "identity"}:
            shared = general[item.key]
            assert (item.title, item.why, item.how) == (shared.title, shared.why, shared.how)


def _item(key: str = "referral", accepts: str = '["pdf", "image"]') -> str:
    return (
        "[[items]]\n"
        f'key = "{key}"\n'
        'title = "Referral letter"\n'
        'why = "The doctors start from this letter."\n'
        'how = "Send it as a PDF if you have one."\n'
        "required = true\n"
        f"accepts = {accepts}\n"
    )


def _checklist(key: str = "broken", items: str | None = None, hospital: bool = True) -> str:
    head = f'key = "{key}"\ntitle = "Broken checklist"\n'
    if hospital:
        head += 'hospital = "Partner hospital"\n'
    head += 'working_languages = ["en"]\n\n'
    return head + (_item() if items is None else items)


def test_the_base_of_the_broken_files_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(_checklist(), encoding="utf-8")
    assert checklists.load_checklist(path).key == "broken"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param(
            _checklist().replace('title = "Broken', "title = Broken"),
            "not valid TOML: Invalid value (at line 2",  # tomllib names the line, not the field
            id="toml",
        ),
        pytest.param(_checklist(hospital=False), "hospital", id="missing-field"),
        pytest.param(
            _checklist(items=_item(accepts='["fax"]')), "items.0.accepts", id="unknown-accepts"
        ),
        pytest.param(
            _checklist(items=_item() + "\n" + _item()),
            "duplicate item keys: referral",
            id="duplicate-keys",
        ),
        pytest.param(_checklist(key="other"), "'key'", id="key-not-file-name"),
        pytest.param(
            _checklist(items=_item(accepts='["text", "pdf"]')),
            "items.0.accepts",
            id="text-with-file",
        ),
    ],
)
def test_broken_file_is_rejected(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(checklists.ChecklistError) as caught:
        checklists.load_all(tmp_path)
    message = str(caught.value)
    assert "broken.toml" in message
    assert field in message
