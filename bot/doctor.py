"""Operator tools: `care-companion doctor`, and the command side of `backup` and `restore`.

The doctor only looks: it creates no key, migrates nothing and writes nothing but a probe
file it removes at once, so it is safe to run next to a serving bot. Every line is plain
English with paths, ids and counts only, never anything of a patient.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlmodel import col, select

from adapters.database import create_engine, is_sqlite
from adapters.keys import (
    KeyHandlingError,
    load_or_create_master_key,
    master_key_id,
    unwrap_key,
)
from adapters.migrate import (
    SchemaTooNewError,
    current_revision,
    head_revision,
    refuse_unknown,
)
from adapters.tables import CaseRow
from bot.settings import Settings, SettingsError, load_settings

OK, FAIL, SKIP = "ok", "FAIL", "skip"
MIN_FREE_BYTES = 1 << 30  # below 1 GiB or 5% free, uploads and the database soon fail
MIN_FREE_FRACTION = 0.05
DATABASE_TIMEOUT_S = 10.0
API_TIMEOUT_S = 5


@dataclass(frozen=True)
class Check:
    status: str  # OK, FAIL or SKIP
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.reason}"


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except ArgumentError:
        return None


def _why(exc: BaseException, *secrets: str | None) -> str:
    """An exception as one short line, with any secret (password, token) blanked out."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer in time"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- checks


def _is_file(path: str | None) -> bool:
    return bool(path) and Path(str(path)).is_file()


async def _database(url: str) -> Check:
    name = "database"
    try:
        parsed = make_url(url)
    except ArgumentError:
        return Check(FAIL, name, "DATABASE_URL is not sqlite:///PATH or postgresql://...")
    shown = parsed.render_as_string(hide_password=True)
    # SQLite would create a missing file on connect: say what is missing instead.
    if is_sqlite(url) and not _is_file(parsed.database):
        return Check(FAIL, name, f"no database at {parsed.database}: run care-companion migrate")
    try:
        revision = await asyncio.wait_for(current_revision(url), DATABASE_TIMEOUT_S)
        refuse_unknown(revision)
    except SchemaTooNewError as exc:
        return Check(FAIL, name, str(exc))
    except Exception as exc:  # any way of not connecting is this check's answer
        return Check(FAIL, name, f"cannot reach {shown}: {_why(exc, parsed.password)}")
    head = head_revision()
    if revision is None:
        return Check(FAIL, name, f"{shown} has no schema yet: run care-companion migrate")
    if revision != head:
        return Check(
            FAIL,
            name,
            f"schema {revision} is behind this code's {head}: run care-companion migrate",
        )
    return Check(OK, name, f"{shown} reachable, schema at head {head}")


def _master_key(key_file: Path) -> tuple[Check, bytes | None]:
    name = "master key"
    try:
        master, _ = load_or_create_master_key(key_file, create=False)
    except KeyHandlingError as exc:  # missing, malformed or readable by others: its own words
        return Check(FAIL, name, str(exc)), None
    mode = stat.S_IMODE(key_file.stat().st_mode)
    return Check(OK, name, f"{key_file} mode {mode:04o}, key id {master_key_id(master)}"), master


async def _case_key(url: str, master: bytes) -> Check:
    """The master key must open real data: try it on one case that is not erased."""
    name = "case key"
    engine = create_engine(url, readonly=True)
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    select(CaseRow.id, CaseRow.wrapped_key)
                    .where(col(CaseRow.wrapped_key) != b"")
                    .limit(1)
                )
            ).first()
    finally:
        await engine.dispose()
    if row is None:
        return Check(SKIP, name, "no case yet to try the master key on")
    case_id, wrapped = row
    try:
        unwrap_key(master, bytes(wrapped), case_id)
    except KeyHandlingError as exc:
        return Check(FAIL, name, f"case {case_id}: {exc}; is MASTER_KEY_FILE the right key?")
    return Check(OK, name, f"the master key unwraps the key of case {case_id}")


async def _telegram(settings: Settings) -> list[Check]:
    """getMe, then getWebhookInfo, each with a short timeout."""
    token = settings.bot_token
    if token is None:
        return [Check(SKIP, "bot api", "BOT_TOKEN is not set"), Check(SKIP, "webhook", "no token")]
    from bot.polling import make_bot

    base = settings.telegram_api_base_url
    bot = make_bot(settings)
    try:
        try:
            me = await bot.get_me(request_timeout=API_TIMEOUT_S)
        except Exception as exc:  # unreachable, refused token, timeout: all a FAIL here
            return [
                Check(FAIL, "bot api", f"{base} getMe failed: {_why(exc, token)}"),
                Check(SKIP, "webhook", "the Bot API did not answer"),
            ]
        api = Check(OK, "bot api", f"{base} answers: the bot is @{me.username} (id {me.id})")
        try:
            info = await bot.get_webhook_info(request_timeout=API_TIMEOUT_S)
        except Exception as exc:
            return [api, Check(FAIL, "webhook", f"getWebhookInfo failed: {_why(exc, token)}")]
    finally:
        await bot.session.close()
    # WEB_BASE_URL comes with the webhook mode; older settings do not have it.
    return [api, _webhook(info.url, getattr(settings, "web_base_url", None))]


def _webhook(url: str, web_base_url: str | None) -> Check:
    name = "webhook"
    if not url:
        return Check(OK, name, "none set: updates come by long polling")
    host = urlsplit(url).hostname  # the path may hold a secret: never printed
    if not web_base_url:
        return Check(
            FAIL,
            name,
            f"a webhook is set (to {host}) but WEB_BASE_URL is not: Telegram sends updates "
            "there and polling gets none; is an instance serving in webhook mode? (`run` "
            "removes the webhook when it starts)",
        )
    if host != urlsplit(web_base_url).hostname:
        return Check(FAIL, name, f"the webhook goes to {host}, not to WEB_BASE_URL's host")
    return Check(OK, name, f"set, to {host} (WEB_BASE_URL)")


def _disk(data_dir: Path) -> Check:
    name = "disk"
    if not data_dir.is_dir():
        return Check(FAIL, name, f"DATA_DIR {data_dir} does not exist: run care-companion migrate")
    try:
        usage = shutil.disk_usage(data_dir)
    except OSError as exc:
        return Check(FAIL, name, f"DATA_DIR {data_dir}: {_why(exc)}")
    free = f"{usage.free / (1 << 30):.1f} GiB ({usage.free / usage.total:.0%}) free in {data_dir}"
    if usage.free < MIN_FREE_BYTES or usage.free < MIN_FREE_FRACTION * usage.total:
        return Check(FAIL, name, f"only {free}: keep at least 1 GiB and 5% free")
    return Check(OK, name, free)


def _vault(data_dir: Path) -> Check:
    name = "vault"
    vault = data_dir / "vault"
    # Before the first start there is no vault yet: then DATA_DIR, where it will be made.
    target = vault if vault.exists() else data_dir
    if not target.exists():
        return Check(SKIP, name, f"DATA_DIR {data_dir} does not exist")
    try:
        with tempfile.TemporaryFile(dir=target) as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as exc:
        return Check(FAIL, name, f"cannot write in {target}: {_why(exc)}")
    if target is vault:
        return Check(OK, name, f"{vault} writable")
    return Check(OK, name, f"{vault} not made yet (the bot makes it at start); DATA_DIR writable")


async def run_checks(settings: Settings) -> AsyncIterator[Check]:
    """Every check after the settings, in order, each as soon as it is known."""
    database = await _database(settings.db_url)
    yield database
    key_check, master = _master_key(settings.key_file)
    yield key_check
    if master is None:
        yield Check(SKIP, "case key", "no usable master key")
    elif database.status != OK:
        yield Check(SKIP, "case key", "the database is not usable")
    else:
        yield await _case_key(settings.db_url, master)
    for check in await _telegram(settings):
        yield check
    yield _disk(settings.data_dir)
    yield _vault(settings.data_dir)


async def _print_checks(settings: Settings) -> int:
    failed = 0
    async for check in run_checks(settings):
        print(check, flush=True)
        failed += check.status == FAIL
    print(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0


def doctor() -> int:
    """`care-companion doctor`: one line per check; exit 1 when any fails."""
    try:
        settings = load_settings()
    except SettingsError as exc:  # nothing else can be checked without settings
        print(Check(FAIL, "settings", str(exc)))
        return 1
    print(Check(OK, "settings", "every setting loads"), flush=True)
    return asyncio.run(_print_checks(settings))


# --------------------------------------------------------------------- backup, restore


def backup_or_restore(args: argparse.Namespace, settings: Settings) -> int:
    """`care-companion backup DEST` and `care-companion restore SRC` (see adapters.backup)."""
    from adapters.backup import BackupError, backup, restore

    vault = settings.data_dir / "vault"
    try:
        if args.command == "backup":
            asyncio.run(backup(settings.db_url, vault, args.dest))
            return 0
        result = asyncio.run(restore(settings.db_url, vault, settings.key_file, args.src))
    except (BackupError, SchemaTooNewError) as exc:
        print(f"care-companion: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line (a database down...) instead of a trace
        reason = _why(exc, _password(settings.db_url))
        print(f"care-companion: {args.command} failed: {reason}", file=sys.stderr)
        return 1
    print(result.report.format())
    if not result.report.ok:
        return 1
    print("restore complete: every record checks out; the bot can start")
    return 0
