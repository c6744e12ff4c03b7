"""Settings from the environment or `.env` (every one documented in .env.example)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_TOKEN = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{1,100}$")


class SettingsError(ValueError):
    """One clear line naming the setting that is missing or malformed."""


class Settings(BaseSettings):
    # env_ignore_empty: .env.example ships `NAME=` lines to fill in; an empty one means
    # "not set" (the default applies), not a malformed value.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=False, env_ignore_empty=True
    )

    bot_token: str | None = None
    telegram_api_base_url: str = "https://api.telegram.org"
    telegram_api_local: bool = False
    # "server_prefix=local_prefix": where the local Bot API server's files appear to us
    telegram_local_path_map: str | None = None
    database_url: str | None = None
    data_dir: Path = Path("data")
    master_key_file: Path | None = None
    coordinator_chat_id: int | None = None
    coordinator_ids: Annotated[tuple[int, ...], NoDecode] = ()
    default_locale: str = "en"
    coordinator_locale: str = "en"
    privacy_version: str = "2026-11"
    retention_days: int = Field(default=365, ge=1, le=36500)
    delete_upload_messages: bool = False
    log_level: str = "INFO"
    # Reminders for missing required items: days after the patient last did something,
    # sent between these local hours (the patient's time zone is guessed from their
    # language unless PATIENT_TIMEZONE is set, see core.reminders).
    reminder_days: Annotated[tuple[int, ...], NoDecode] = (1, 3, 7)
    reminder_hours: str = "9-20"
    patient_timezone: str | None = None
    # The upload page (WEB_BASE_URL): how long a link works, and the most a case may hold.
    upload_link_hours: int = Field(default=24, ge=1, le=24 * 30)
    upload_max_case_bytes: int = Field(default=4 * 1024**3, ge=1024**2)
    # The upload page's chunk (one request body each): lower it only for a proxy whose body
    # limit is smaller than 16 MiB; bounds as adapters.uploads.MIN/MAX_PART_SIZE.
    upload_part_bytes: int = Field(default=16 * 1024**2, ge=16 * 1024, le=64 * 1024**2)
    # The web server (bot/web.py): probes, metrics, the webhook. WEB_BASE_URL is the public
    # https address the reverse proxy serves; WEB_HOST:WEB_PORT is where this process listens
    # behind it. Without WEB_PORT, `run` opens no port and `webhook` listens on 8080.
    web_base_url: str | None = None
    web_host: str = "127.0.0.1"
    web_port: int | None = Field(default=None, ge=1, le=65535)
    # The reverse proxies in front (addresses or networks): from them, the upload page's
    # per-address limits take the patient's address from X-Forwarded-For (bot/upload.py).
    # By default a proxy on this machine: only it can reach WEB_HOST=127.0.0.1.
    web_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ("127.0.0.1/32", "::1/128")
    # Telegram sends it back with every webhook call; a call without it is refused (401).
    webhook_secret: str | None = None
    # Redis shared by the instances of a cluster; /readyz pings it when set.
    redis_url: str | None = None

    @field_validator("reminder_days", mode="before")
    @classmethod
    def _split_days(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        return value

    @field_validator("reminder_hours")
    @classmethod
    def _hours_shape(cls, value: str) -> str:
        match = re.fullmatch(r"(\d{1,2})-(\d{1,2})", value.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]) <= 24:
            raise ValueError("expected FROM-TO local hours such as 9-20")
        return value.strip()

    @field_validator("coordinator_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        return value

    @field_validator("bot_token")
    @classmethod
    def _token_shape(cls, value: str | None) -> str | None:
        if value is not None and not _TOKEN.match(value.strip()):
            raise ValueError("expected the form 123456789:ABC-def... from @BotFather")
        return value.strip() if value else None

    @field_validator("telegram_api_base_url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http(s) URL such as https://api.telegram.org")
        return value.rstrip("/")

    @field_validator("telegram_local_path_map")
    @classmethod
    def _map_shape(cls, value: str | None) -> str | None:
        if value and "=" not in value:
            raise ValueError("expected SERVER_PREFIX=LOCAL_PREFIX")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @field_validator("web_base_url")
    @classmethod
    def _base_url_shape(cls, value: str | None) -> str | None:
        if value and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected the public address, such as https://bot.example.org")
        return value.rstrip("/") if value else None

    @field_validator("web_trusted_proxies", mode="before")
    @classmethod
    def _proxy_networks(cls, value: Any) -> Any:
        parts = value.split(",") if isinstance(value, str) else value
        networks = []
        for part in parts:
            if part := str(part).strip():
                try:
                    networks.append(str(ipaddress.ip_network(part, strict=False)))
                except ValueError:
                    raise ValueError(
                        f"{part!r}: expected addresses or networks such as 127.0.0.1,10.0.0.0/8"
                    ) from None
        return tuple(networks)

    @field_validator("webhook_secret")
    @classmethod
    def _secret_shape(cls, value: str | None) -> str | None:
        # Telegram allows 1-256 of these characters; fewer than 16 would be guessable.
        if value and not re.fullmatch(r"[A-Za-z0-9_-]{16,256}", value):
            raise ValueError("expected 16 to 256 letters, digits, _ or - (openssl rand -hex 32)")
        return value or None

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> Settings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'care-companion.db').resolve()}"
        if self.master_key_file is None:
            self.master_key_file = self.data_dir / "master.key"
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def key_file(self) -> Path:
        assert self.master_key_file is not None
        return self.master_key_file

    @property
    def exports_dir(self) -> Path:
        """Where hand-off bundles are written (and deleted when their case is erased)."""
        return self.data_dir / "exports"

    @property
    def local_path_map(self) -> tuple[str, str] | None:
        if not self.telegram_local_path_map:
            return None
        server, _, local = self.telegram_local_path_map.partition("=")
        return server, local


def load_settings(**overrides: Any) -> Settings:
    """Settings, or SettingsError with one line naming the first bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise SettingsError(f"setting {name} is invalid: {first['msg']}") from None
