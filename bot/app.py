"""Wiring: one place that builds the store, vault, service and Telegram loops."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from adapters.database import create_engine, is_sqlite
from adapters.directory import button_secret, sign_button
from adapters.erasure import Eraser
from adapters.ingest import VaultIngest, check_in_worker
from adapters.keyring import KeyRing
from adapters.keys import load_or_create_master_key
from adapters.migrate import upgrade
from adapters.store import SqlStore
from adapters.vault import Vault
from bot.settings import Settings
from checklists import load_all
from core.checklist import Checklist
from core.engine import Context
from core.service import ConversationService, Coordinator, WebUploads
from handlers.render import Translator, available_locales, language_name

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    # Logs carry ids and event names only: never names, captions, file names or answers.
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("aiogram.event").setLevel(logging.WARNING)


@dataclass
class App:
    settings: Settings
    store: SqlStore
    vault: Vault
    translator: Translator
    checklists: dict[str, Checklist]
    locales: tuple[str, ...]
    service: ConversationService
    eraser: Eraser
    ingest: VaultIngest  # also stores the translations coordinators attach

    def context(self) -> Context:
        return Context(
            checklists=self.checklists,
            locales=self.locales,
            language_names={code: language_name(code) for code in self.locales},
            privacy_version=self.settings.privacy_version,
            now=datetime.now(UTC),
            web_uploads=bool(self.settings.web_base_url),
        )

    async def close(self) -> None:
        await self.store.engine.dispose()
        if self.store.read_engine is not self.store.engine:
            await self.store.read_engine.dispose()


def prepare(settings: Settings) -> None:
    """Blocking start-up steps, run before the event loop: folders, key, migrations."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _, created = load_or_create_master_key(settings.key_file)
    if created:
        log.warning(
            "NEW MASTER KEY created at %s. BACK IT UP NOW, apart from the data: "
            "without it no stored record can ever be read again.",
            settings.key_file,
        )
    upgrade(settings.db_url)


def web_uploads(settings: Settings) -> WebUploads | None:
    if not settings.web_base_url:
        return None
    ttl = timedelta(hours=settings.upload_link_hours)
    return WebUploads(settings.web_base_url.rstrip("/"), ttl)


def build_app(settings: Settings) -> App:
    master, _ = load_or_create_master_key(settings.key_file, create=False)
    keys = KeyRing(master)
    read_engine = (
        create_engine(settings.db_url, readonly=True) if is_sqlite(settings.db_url) else None
    )
    store = SqlStore(create_engine(settings.db_url), keys, read_engine)
    vault = Vault(settings.data_dir / "vault")
    vault.cleanup_temp()  # partial writes of a crashed process hold only ciphertext
    translator = Translator()
    locales = available_locales()
    if not locales:
        raise RuntimeError("no compiled catalogs in locales/: run `make setup` (pybabel compile)")
    checklists = load_all()
    ingest = VaultIngest(vault, store, keys, check_in_worker)
    eraser = Eraser(store, vault, settings.exports_dir)
    app_holder: list[App] = []
    service = ConversationService(
        store,
        ingest,
        lambda: app_holder[0].context(),
        Coordinator(
            settings.coordinator_chat_id,
            settings.coordinator_locale,
            functools.partial(sign_button, button_secret(master)),
        ),
        settings.default_locale if settings.default_locale in locales else locales[0],
        eraser,
        delete_uploads=settings.delete_upload_messages,
        web_uploads=web_uploads(settings),
    )
    app = App(settings, store, vault, translator, checklists, locales, service, eraser, ingest)
    app_holder.append(app)
    return app
