"""Webhook mode: Telegram POSTs each update to WEB_BASE_URL + WEBHOOK_PATH.

An update is stored in the inbox (encrypted) before the 200 goes back, as the poller stores
it before confirming the offset: a kill after the 200 loses nothing (the inbox processor
handles it after the restart), and a kill before it makes Telegram send it again (a second
copy of a stored update is ignored). Handling and answering are the runtime's, the same as
in polling mode (bot.polling).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from aiogram import Bot
from aiohttp import web

from adapters import metrics
from adapters.store import SqlStore
from adapters.telegram import chat_of
from bot.settings import Settings
from handlers import patient

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 (the header's name)


def webhook_url(settings: Settings) -> str:
    assert settings.web_base_url is not None
    return settings.web_base_url + WEBHOOK_PATH


def missing_settings(settings: Settings) -> list[str]:
    """What webhook mode needs and is not set (its names, for the operator)."""
    return [
        name
        for name, value in (
            ("WEB_BASE_URL", settings.web_base_url),
            ("WEBHOOK_SECRET", settings.webhook_secret),
        )
        if not value
    ]


async def register(bot: Bot, settings: Settings) -> None:
    """Ask Telegram to send updates here. Every instance registers the same URL and secret,
    so it does not matter which starts last; none deletes the webhook on stop, so Telegram
    keeps (and retries) the updates meanwhile."""
    await bot.set_webhook(
        webhook_url(settings),
        secret_token=settings.webhook_secret,
        allowed_updates=list(patient.ALLOWED_UPDATES),
        drop_pending_updates=False,
    )
    log.info("webhook registered at %s", webhook_url(settings))


def receiver(store: SqlStore, wake: asyncio.Event, secret: str) -> web.RouteDef:
    """The route Telegram posts updates to."""
    expected = secret.encode()

    async def receive(request: web.Request) -> web.Response:
        # Checked before the body is even read; compare_digest takes the same time
        # whatever the first wrong character, so the secret cannot be guessed piecemeal.
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            metrics.WEBHOOK_FORGED.inc()
            log.warning("webhook request refused: missing or wrong secret token")
            return web.Response(status=401)
        # Stored as sent; the processor reads it as it reads a polled one. One that aiogram
        # cannot read is then parked (the patient told), rather than refused here: Telegram
        # would retry a refused update for hours, holding back the chat's next ones.
        body = await request.text()
        try:
            payload = json.loads(body)
            update_id, chat_id = int(payload["update_id"]), chat_of(payload)
        except (ValueError, KeyError, TypeError):  # not an update at all
            return web.Response(status=400)
        try:
            await store.store_update(update_id, chat_id, body)
        except Exception as exc:  # database down: no 200, so Telegram sends it again later
            log.warning("webhook update %s not stored (%s)", update_id, type(exc).__name__)
            return web.Response(status=503)
        metrics.UPDATES_RECEIVED.labels("webhook").inc()
        wake.set()
        return web.Response()

    return web.post(WEBHOOK_PATH, receive)
