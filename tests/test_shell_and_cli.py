"""The offline shell and the CLI, as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.files import dicom_path, document_photo, pdf_bytes

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    tmp_path: Path, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if k not in {"BOT_TOKEN", "COORDINATOR_CHAT_ID"}},
        "DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=180,
        check=False,
    )


def test_scripted_shell_session_completes_a_checklist(tmp_path: Path) -> None:
    """A typed session: consent, procedure, files by path, answers; the case completes."""
    referral = tmp_path / "referral.pdf"
    referral.write_bytes(pdf_bytes(["Referral letter"]))
    photo = tmp_path / "passport.jpg"
    photo.write_bytes(document_photo())
    session = "\n".join(
        [
            "/status",
            f"/send {referral}",  # before consent: refused with a hint
            "AGREE",
            "GENERAL",
            "Ann Example",
            "31.01.1980",
            f"/send {referral}",
            "DONE",
            f"/send {dicom_path()}",
            "DONE",
            "SKIP",
            "DONT_HAVE",
            "Ibuprofen 200 mg when needed. No allergies.",
            "SKIP",
            f"/send {photo}",
            "DONE",
            "/quit",
        ]
    )
    result = run_cli(
        tmp_path, "shell", stdin=_press_by_label(session), env={"COORDINATOR_CHAT_ID": "-77"}
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Before you send anything" in out
    assert "[coordinator] Case" in out and "is complete" in out
    cases = json.loads(run_cli(tmp_path, "cases", "list", "--json").stdout)
    view = json.loads(run_cli(tmp_path, "cases", "show", cases[0]["case_id"], "--json").stdout)
    assert view["complete"] is True
    assert sum(len(item["files"]) for item in view["items"]) == 3


def _press_by_label(session: str) -> str:
    """Shell input where labels in capitals stand for pressing that button.

    The shell numbers the buttons of the last message; the labels below are found in the
    order the bot offers them, so the test reads as a conversation.
    """
    numbers = {"AGREE": "1", "GENERAL": "1", "DONE": "1", "SKIP": "1", "DONT_HAVE": "2"}
    return "\n".join(numbers.get(line, line) for line in session.splitlines()) + "\n"


def test_run_without_token_explains_how_to_get_one(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "run")
    assert result.returncode == 2
    assert "@BotFather" in result.stderr and "care-companion shell" in result.stderr


def test_malformed_setting_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "run", env={"BOT_TOKEN": "123:abc", "COORDINATOR_CHAT_ID": "group"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "COORDINATOR_CHAT_ID" in result.stderr
    bad_token = run_cli(tmp_path, "run", env={"BOT_TOKEN": "not-a-token"})
    assert bad_token.returncode == 2 and "BOT_TOKEN" in bad_token.stderr


def test_master_key_is_created_private(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "migrate").returncode == 0
    key = tmp_path / "data" / "master.key"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0


def test_invite_prints_a_deep_link_and_rejects_unknown_procedures(tmp_path: Path) -> None:
    ok = run_cli(tmp_path, "cases", "invite", "--procedure", "ivf", "--bot-username", "cc_bot")
    assert ok.returncode == 0 and ok.stdout.startswith("https://t.me/cc_bot?start=")
    bad = run_cli(tmp_path, "cases", "invite", "--procedure", "nose_job", "--bot-username", "x")
    assert bad.returncode == 2 and "unknown procedure" in bad.stderr


def test_check_command_judges_by_content(tmp_path: Path) -> None:
    fake = tmp_path / "scan.dcm"
    fake.write_bytes(b"MZ\x90\x00 this is not a scan")
    result = run_cli(tmp_path, "check", str(fake), str(dicom_path()), "--json")
    verdicts = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 1
    assert [v["status"] for v in verdicts] == ["rejected", "accepted"]


def test_check_command_summarises_a_folder_like_a_cd(tmp_path: Path) -> None:
    """A CD copied to a folder: its scans summarised, viewer programs skipped, in a child
    process under limits."""
    cd = tmp_path / "cd"
    (cd / "DICOM").mkdir(parents=True)
    (cd / "DICOM" / "IMG0001").write_bytes(dicom_path().read_bytes())
    (cd / "DICOM" / "IMG0002").write_bytes(dicom_path("MR_small.dcm").read_bytes())
    (cd / "VIEWER.EXE").write_bytes(b"MZ\x90\x00" + bytes(512))
    result = run_cli(tmp_path, "check", str(cd), "--json")
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)
    summaries = [f for f in verdict["findings"] if f["code"] == "study_summary"]
    assert sorted(f["params"]["modality"] for f in summaries) == ["CT", "MR"]
    assert verdict["metadata"]["skipped_count"] == 1
