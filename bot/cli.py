"""The `care-companion` command (also `python -m bot`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.settings import Settings, SettingsError, load_settings

log = logging.getLogger("care_companion")

_HOW_TO_CONNECT = """\
BOT_TOKEN is not set, so the bot cannot connect to Telegram.

  1. In Telegram, open @BotFather, send /newbot and follow the steps.
  2. Put the token it gives you in .env:   BOT_TOKEN=123456789:ABC...
  3. Run the bot again.

To try the conversation offline first, without any token:   care-companion shell
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="care-companion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the bot with long polling")
    sub.add_parser("webhook", help="run the bot behind HTTPS: Telegram posts to WEB_BASE_URL")
    sub.add_parser("shell", help="chat with the bot offline in this terminal")
    sub.add_parser("migrate", help="bring the database schema up to date")
    check = sub.add_parser("check", help="check files as the bot would (folders and ZIPs expand)")
    check.add_argument("paths", nargs="+")
    check.add_argument("--json", action="store_true")
    keys = sub.add_parser("keys", help="master key operations")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    rotate = keys_sub.add_parser(
        "rotate",
        help="re-wrap every case key under a new master key (stop the bot first; resumable)",
    )
    rotate.add_argument("--new-key-file", type=Path, help="use this key instead of generating one")
    rotate.add_argument(
        "--accept-failures", action="store_true", help="swap the key file even if some rows failed"
    )
    sub.add_parser("verify", help="check every stored file's integrity against its record")
    sub.add_parser("doctor", help="check settings, database, key, Bot API, disk; exit 1 on a FAIL")
    backup = sub.add_parser("backup", help="online backup of database and vault (not the key)")
    backup.add_argument("dest", type=Path, help="a new or empty folder")
    restore = sub.add_parser("restore", help="restore a backup into an empty DATA_DIR, verified")
    restore.add_argument("src", type=Path, help="the backup folder")
    audit = sub.add_parser("audit", help="print a case's audit trail (and check the chain)")
    audit.add_argument("case_id")
    cases = sub.add_parser("cases", help="list, show and invite cases")
    cases_sub = cases.add_subparsers(dest="cases_command", required=True)
    listing = cases_sub.add_parser("list")
    listing.add_argument("--json", action="store_true")
    show = cases_sub.add_parser("show")
    show.add_argument("case_id")
    show.add_argument("--json", action="store_true")
    invite = cases_sub.add_parser("invite", help="print a t.me deep link for a new case")
    invite.add_argument("--procedure", required=True)
    invite.add_argument("--bot-username", help="defaults to the bot's own, asked from the Bot API")
    export = sub.add_parser(
        "export", help="build a case's encrypted hand-off bundle (AES-256 ZIP with a manifest)"
    )
    export.add_argument("case_id")
    export.add_argument(
        "--out", type=Path, help="folder for the archive (default DATA_DIR/exports)"
    )
    inbox = sub.add_parser("inbox", help="updates the bot gave up on (parked): list, retry")
    inbox_sub = inbox.add_subparsers(dest="inbox_command", required=True)
    parked = inbox_sub.add_parser("list", help="every parked update, without its content")
    parked.add_argument("--json", action="store_true")
    retry = inbox_sub.add_parser("retry", help="put parked updates back in line (audited)")
    retry.add_argument("update_ids", nargs="*", type=int, metavar="UPDATE_ID")
    retry.add_argument("--all", action="store_true", help="every parked update")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in {"run", "webhook"}:
        return _command(args)
    # A start imports and builds some 300 000 objects that live as long as the bot (aiogram's
    # pydantic schemas above all) and makes next to no garbage: collections meanwhile only
    # walk them again and again, a sixth of the start's CPU time. Off until serve() sets them
    # aside (bot.polling.set_aside_startup_objects turns collection back on), or main returns.
    gc.disable()
    try:
        from bot.aiogram_types import import_aiogram

        import_aiogram()  # before anything imports it the slow way
        return _command(args)
    finally:
        gc.enable()


def _command(args: argparse.Namespace) -> int:
    if args.command == "check":
        from intake.cli import main as check_main

        return check_main([*args.paths, *(["--json"] if args.json else [])])
    if args.command == "doctor":  # reports a bad setting as one of its checks
        from bot.doctor import doctor

        return doctor()
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"care-companion: {exc}", file=sys.stderr)
        return 2
    from bot.app import configure_logging, prepare

    configure_logging(settings.log_level if args.command in {"run", "webhook"} else "WARNING")
    if args.command in {"run", "webhook"} and settings.bot_token is None:
        print(_HOW_TO_CONNECT, file=sys.stderr)
        return 2
    if args.command == "webhook":
        from bot.webhook import missing_settings

        if missing := missing_settings(settings):
            print(f"care-companion: webhook mode needs {', '.join(missing)}", file=sys.stderr)
            return 2
    if args.command in {"backup", "restore"}:  # before prepare: no new key, no new database
        from bot.doctor import backup_or_restore

        return backup_or_restore(args, settings)
    try:
        prepare(settings)
    except Exception as exc:  # one clear line instead of a trace at start-up
        print(f"care-companion: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.command == "migrate":
        print("database schema is up to date")
        return 0
    if args.command == "keys":
        return asyncio.run(_rotate(args, settings))
    return asyncio.run(_async_main(args, settings))


async def _async_main(args: argparse.Namespace, settings: Settings) -> int:
    from bot.app import build_app

    if args.command in {"run", "webhook"}:
        from aiogram.exceptions import TelegramAPIError

        from bot.polling import serve

        try:
            await serve(settings, webhook=args.command == "webhook")
        except TelegramAPIError as exc:
            # The token refused, the Bot API unreachable, setWebhook refused (not HTTPS, a
            # port Telegram does not call...): the operator gets Telegram's own words on one
            # line, not a trace. Its text names settings, never a patient.
            print(f"care-companion: the Bot API refused: {exc}", file=sys.stderr)
            return 1
        return 0
    app = build_app(settings)
    try:
        if args.command == "shell":
            from bot.shell import run_shell

            await run_shell(app)
            return 0
        if args.command == "verify":
            from adapters.keyops import verify_all

            report = await verify_all(app.store, app.vault, app.store.keys)
            print(report.format())
            return 0 if report.ok else 1
        if args.command == "audit":
            from adapters import audit

            print(audit.format_entries(await audit.entries(app.store, args.case_id)))
            problems = await audit.verify_chain(app.store)
            for problem in problems:
                print(f"TAMPERING: {problem}", file=sys.stderr)
            return 1 if problems else 0
        if args.command == "export":
            return await _export(args, app)
        if args.command == "inbox":
            return await _inbox(args, app)
        return await _cases(args, app)
    finally:
        await app.close()


async def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.keyops import rotate_master_key_file
    from adapters.keys import KeyHandlingError

    try:
        result = await rotate_master_key_file(
            settings.key_file,
            settings.db_url,
            args.new_key_file,
            accept_failures=args.accept_failures,
        )
    except KeyHandlingError as exc:
        print(f"care-companion: {exc}", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


async def _export(args: argparse.Namespace, app: object) -> int:
    from adapters.export import ExportError, build_bundle
    from bot.app import App
    from core.replies import Text

    assert isinstance(app, App)
    locale = app.settings.coordinator_locale

    def render(key: str, params: dict[str, object]) -> str:
        return app.translator.text(locale, Text(key, params))

    out = args.out or app.settings.exports_dir
    try:
        bundle = await build_bundle(
            app.store, app.vault, app.checklists, args.case_id, out, render=render, actor="operator"
        )
    except ExportError as exc:
        print(f"care-companion: {exc}", file=sys.stderr)
        return 1
    # The password goes to the hospital apart from the archive (another channel, or later).
    print(f"archive: {bundle.path}")
    print(f"password: {bundle.password}")
    return 0


async def _inbox(args: argparse.Namespace, app: object) -> int:
    from bot.app import App
    from bot.inbox import parked_updates, retry_parked

    assert isinstance(app, App)
    if args.inbox_command == "list":
        parked = await parked_updates(app.store)
        if args.json:
            print(json.dumps(parked, indent=2))
            return 0
        for update in parked:
            print(
                f"{update['update_id']}  {update['received_at']}  {update['attempts']} tries  "
                f"{update['error'] or '-'}  case {update['case_id'] or '-'}"
            )
        if not parked:
            print("no parked updates")
        return 0
    if bool(args.update_ids) == args.all:
        print("care-companion: name the updates to retry, or --all", file=sys.stderr)
        return 2
    retried = await retry_parked(app.store, None if args.all else args.update_ids)
    missing = sorted(set(args.update_ids) - set(retried))
    print(f"{len(retried)} update(s) back in line: a running bot handles them within a second")
    if missing:
        print(f"not parked: {' '.join(map(str, missing))}", file=sys.stderr)
    return 1 if missing else 0


async def _cases(args: argparse.Namespace, app: object) -> int:
    from bot.app import App
    from bot.cases import list_cases, show_case

    assert isinstance(app, App)
    if args.cases_command == "list":
        cases = await list_cases(app.store)
        if args.json:
            print(json.dumps(cases, indent=2))
        else:
            for case in cases:
                print(f"{case['case_id']}  {case['state']:<10}  {case['procedure'] or '-'}")
        return 0
    if args.cases_command == "show":
        view = await show_case(app.store, args.case_id, app.checklists)
        if view is None:
            print(f"care-companion: no case {args.case_id}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(view, indent=2))
        else:
            print(f"case {view['case_id']}: {view['state']} ({view['procedure']})")
            for item in view["items"]:
                marker = "->" if item["key"] == view["current_item"] else "  "
                print(
                    f"{marker} {item['key']:<16} {item['status']:<10} {len(item['files'])} file(s)"
                )
        return 0
    # invite
    if args.procedure not in app.checklists:
        known = ", ".join(sorted(app.checklists))
        print(
            f"care-companion: unknown procedure {args.procedure!r}; known: {known}", file=sys.stderr
        )
        return 2
    username = args.bot_username
    if username is None:
        if app.settings.bot_token is None:
            print("care-companion: set BOT_TOKEN or pass --bot-username", file=sys.stderr)
            return 2
        from bot.polling import make_bot

        bot = make_bot(app.settings)
        try:
            username = (await bot.get_me()).username
        finally:
            await bot.session.close()
    code = await app.store.create_invite(args.procedure)
    print(f"https://t.me/{username}?start={code}")
    return 0
