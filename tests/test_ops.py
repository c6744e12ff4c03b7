"""Operator tools: `doctor`, `backup` / `restore` (the restore drill), the migration policy."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlmodel import col, select

from adapters import backup as backup_module
from adapters.audit import verify_chain
from adapters.backup import (
    KEY_NOT_INCLUDED,
    BackupError,
    RestoreResult,
    backup,
    find_pg_tool,
    restore,
)
from adapters.database import create_engine
from adapters.keys import load_or_create_master_key
from adapters.migrate import SchemaTooNewError, alembic_config, upgrade
from adapters.tables import AuditRow, CaseRow, FileMemberRow, FileRow
from bot import doctor
from bot.app import App, build_app, prepare
from bot.settings import Settings, load_settings
from core.events import Event, EventKind
from core.ports import Patient
from tests.emulator import BotApiEmulator
from tests.scenario import PATIENT_NAME, apply_steps, default_steps, walk_to_complete
from tests.services import fresh_postgres_database, services_required
from tests.test_shell_and_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "Warfarin-5521 daily; allergic to Quetzalcoatlin"  # never printed, never in clear


def need_pg_tools() -> None:
    """pg_dump and pg_restore, as tests/services.py treats the server: skip, or fail in CI."""
    missing = [tool for tool in ("pg_dump", "pg_restore") if find_pg_tool(tool) is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (PATH, /usr/lib/postgresql/*/bin)"
    if services_required():
        pytest.fail(message + " and REQUIRE_SERVICES=1")
    pytest.skip(message)


async def open_app(data_dir: Path, database_url: str, **settings: object) -> App:
    configured = Settings(data_dir=data_dir, database_url=database_url, **settings)  # type: ignore[arg-type]
    await asyncio.to_thread(prepare, configured)
    return build_app(configured)


async def set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE alembic_version SET version_num = :r"), {"r": revision}
        )
    await engine.dispose()


# ------------------------------------------------------------------------------ doctor


@pytest.fixture
async def healthy(
    database_url: str, tmp_path: Path, emulator: BotApiEmulator, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Settings]:
    """Migrated, one case, the vault made, the Bot API emulator answering."""
    app = await open_app(
        tmp_path / "data",
        database_url,
        bot_token=emulator.token,
        telegram_api_base_url=emulator.base_url,
    )
    try:
        async with app.store.transaction() as tx:
            await tx.create_case(Patient(4242, 4242, "en"), "en")
    finally:
        await app.close()
    # The disk check has its own test; this machine's free space is not what is tested here.
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(doctor, "MIN_FREE_FRACTION", 0.0)
    yield app.settings


async def checks(settings: Settings, **changes: object) -> dict[str, doctor.Check]:
    configured = settings.model_copy(update=changes)
    return {check.name: check async for check in doctor.run_checks(configured)}


def statuses(found: dict[str, doctor.Check]) -> dict[str, str]:
    return {name: check.status for name, check in found.items()}


async def test_doctor_passes_a_healthy_setup(healthy: Settings) -> None:
    found = await checks(healthy)
    assert set(statuses(found).values()) == {"ok"}, "\n".join(map(str, found.values()))
    assert "care_companion_test_bot" in found["bot api"].reason
    assert "none set" in found["webhook"].reason


async def test_doctor_fails_a_bad_database_url(healthy: Settings) -> None:
    found = await checks(healthy, database_url="nonsense")
    assert found["database"].status == "FAIL" and "DATABASE_URL" in found["database"].reason
    assert found["case key"].status == "skip"


async def test_doctor_fails_an_unreachable_postgresql(healthy: Settings) -> None:
    found = await checks(healthy, database_url="postgresql://cc:s3cret@127.0.0.1:1/cc")
    reason = found["database"].reason
    assert found["database"].status == "FAIL" and "cannot reach" in reason
    assert "s3cret" not in reason and "127.0.0.1:1" in reason


async def test_doctor_fails_a_missing_master_key(healthy: Settings) -> None:
    healthy.key_file.unlink()
    found = await checks(healthy)
    assert found["master key"].status == "FAIL" and "does not exist" in found["master key"].reason
    assert found["case key"].status == "skip"
    assert not healthy.key_file.exists()  # the doctor never makes a key


async def test_doctor_fails_a_master_key_that_opens_no_case(healthy: Settings) -> None:
    healthy.key_file.unlink()
    load_or_create_master_key(healthy.key_file)  # a valid key, but not the one in use
    found = await checks(healthy)
    assert found["master key"].status == "ok"
    assert found["case key"].status == "FAIL" and "MASTER_KEY_FILE" in found["case key"].reason


async def test_doctor_fails_a_schema_behind_and_a_schema_too_new(healthy: Settings) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(healthy.db_url), "-1")
    behind = await checks(healthy)
    assert behind["database"].status == "FAIL" and "behind" in behind["database"].reason
    await asyncio.to_thread(upgrade, healthy.db_url)
    await set_revision(healthy.db_url, "9999_from_the_future")
    newer = await checks(healthy)
    assert newer["database"].status == "FAIL"
    assert "9999_from_the_future is newer than this version" in newer["database"].reason


async def test_doctor_fails_an_unreachable_bot_api(healthy: Settings) -> None:
    found = await checks(healthy, telegram_api_base_url="http://127.0.0.1:1")
    assert found["bot api"].status == "FAIL" and "127.0.0.1:1" in found["bot api"].reason
    assert healthy.bot_token is not None and healthy.bot_token not in found["bot api"].reason
    assert found["webhook"].status == "skip"
    without_token = await checks(healthy, bot_token=None)
    assert without_token["bot api"].status == "skip"


async def test_doctor_fails_a_webhook_that_polling_cannot_use(
    healthy: Settings, emulator: BotApiEmulator
) -> None:
    emulator.webhook_url = "https://hooks.example.org/telegram/s3cret-path"
    found = await checks(healthy)
    assert found["webhook"].status == "FAIL" and "WEB_BASE_URL" in found["webhook"].reason
    assert "hooks.example.org" in found["webhook"].reason
    assert "s3cret" not in found["webhook"].reason
    same_host = await checks(healthy, web_base_url="https://hooks.example.org")
    assert same_host["webhook"].status == "ok"
    elsewhere = await checks(healthy, web_base_url="https://cc.example.com")
    assert (
        elsewhere["webhook"].status == "FAIL"
        and "not to WEB_BASE_URL" in elsewhere["webhook"].reason
    )


async def test_doctor_fails_low_disk_and_an_unwritable_vault(
    healthy: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(doctor, "MIN_FREE_BYTES", 1 << 60)
    vault = healthy.data_dir / "vault"
    shutil.rmtree(vault)
    vault.write_bytes(b"")  # a file where the folder should be (root ignores chmod)
    found = await checks(healthy)
    assert found["disk"].status == "FAIL" and "at least 1 GiB" in found["disk"].reason
    assert found["vault"].status == "FAIL" and "cannot write" in found["vault"].reason


def test_doctor_command_reports_a_bad_setting_as_a_failed_check(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "doctor", env={"LOG_LEVEL": "LOUD"})
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "FAIL  settings: setting LOG_LEVEL is invalid: "
        "Value error, expected DEBUG, INFO, WARNING or ERROR"
    ]


def test_the_shipped_env_example_loads_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A newcomer copies .env.example to .env: its empty `NAME=` lines mean "not set"."""
    example = Path(__file__).resolve().parent.parent / ".env.example"
    shutil.copy(example, tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    for name in ("BOT_TOKEN", "DATABASE_URL", "COORDINATOR_CHAT_ID", "COORDINATOR_IDS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.bot_token is None and settings.coordinator_chat_id is None
    assert settings.coordinator_ids == () and settings.telegram_local_path_map is None
    assert settings.db_url.startswith("sqlite:///") and settings.reminder_days == (1, 3, 7)


# ------------------------------------------------------------------ backup and restore


@pytest.fixture
async def app(database_url: str, tmp_path: Path) -> AsyncIterator[App]:
    if not database_url.startswith("sqlite"):
        need_pg_tools()
    application = await open_app(tmp_path / "data", database_url)
    yield application
    await application.close()


@pytest.fixture
def empty_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """Where a restore goes: a new SQLite path or a new, empty PostgreSQL database."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'restored' / 'cc.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


def with_key_of(source: Settings, data_dir: Path) -> Path:
    """A new DATA_DIR holding only a copy of *source*'s master key (0600)."""
    data_dir.mkdir(mode=0o700)
    shutil.copy2(source.key_file, data_dir / "master.key")
    return data_dir


def _with_key(model: type[FileRow] | type[FileMemberRow]):  # type: ignore[no-untyped-def]
    return select(model.blob_id, model.case_id, CaseRow.wrapped_key).join(
        CaseRow, col(CaseRow.id) == col(model.case_id)
    )


async def plaintexts(app: App) -> dict[str, bytes]:
    """Every stored file (uploads and ZIP members), decrypted, by blob id."""
    async with app.store.session() as session:
        rows = [
            *(await session.exec(_with_key(FileRow))).all(),
            *(await session.exec(_with_key(FileMemberRow))).all(),
        ]
    found = {}
    for blob_id, case_id, wrapped in rows:
        key = app.store.keys.case_key(case_id, bytes(wrapped))
        with app.vault.reader(blob_id, key) as reader:
            found[blob_id] = reader.read()
    return found


async def load(app: App, chat_id: int):  # type: ignore[no-untyped-def]
    async with app.store.transaction() as tx:
        return await tx.load_case(chat_id)


async def restore_elsewhere(
    app: App, database_url: str, tmp_path: Path, said: list[str]
) -> tuple[Path, RestoreResult]:
    """tmp_path/backup restored into a new DATA_DIR holding the app's key, and that dir."""
    restored_dir = with_key_of(app.settings, tmp_path / "restored")
    result = await restore(
        database_url,
        restored_dir / "vault",
        restored_dir / "master.key",
        tmp_path / "backup",
        said.append,
    )
    return restored_dir, result


async def test_restore_drill(app: App, empty_database: str, tmp_path: Path) -> None:
    """Back up while the app serves and a patient uploads; restore elsewhere with the same
    key: every case decrypts, every file is byte-identical, verify is clean."""
    complete, partial, meanwhile = (Patient(n, n, "en") for n in (5001, 5002, 5003))
    await walk_to_complete(app, complete, tmp_path, 1, answer=ANSWER)
    await apply_steps(app, partial, default_steps(tmp_path, 100)[:8], 100)
    said: list[str] = []
    await asyncio.gather(
        backup(
            app.settings.db_url, app.settings.data_dir / "vault", tmp_path / "backup", said.append
        ),
        apply_steps(app, meanwhile, default_steps(tmp_path, 200)[:8], 200),
    )
    assert said[-1] == KEY_NOT_INCLUDED

    for path in [tmp_path / "backup", *(tmp_path / "backup").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    master, _ = load_or_create_master_key(app.settings.key_file, create=False)
    for path in (tmp_path / "backup").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert master not in content and master.hex().encode() not in content, path

    said.clear()
    restored_dir, result = await restore_elsewhere(app, empty_database, tmp_path, said)
    assert result.report.ok, result.report.format()
    assert result.report.files_checked == result.blobs >= 4  # 2 PDFs, a scan, a photo, ...
    output = "\n".join(said) + result.report.format()
    for secret in (PATIENT_NAME, ANSWER, "referral", "Passport"):
        assert secret not in output

    copy = build_app(Settings(data_dir=restored_dir, database_url=empty_database))
    try:
        for patient in (complete, partial):
            assert await load(copy, patient.chat_id) == await load(app, patient.chat_id)
        assert (await load(copy, complete.chat_id)).patient_name == PATIENT_NAME
        restored_files = await plaintexts(copy)
        original_files = await plaintexts(app)
        assert restored_files and all(
            original_files[blob] == data for blob, data in restored_files.items()
        )
    finally:
        await copy.close()


async def test_a_case_erased_while_the_backup_runs_stays_erased_after_a_restore(
    app: App, empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is copied first; a patient then erases the case, its blobs going before
    the blobs are copied. The backup names the case; the restore erases it again and
    finishes the erasure: nothing of it comes back, and every restored file checks out."""
    kept, leaving = Patient(5101, 5101, "en"), Patient(5102, 5102, "en")
    await walk_to_complete(app, kept, tmp_path, 1)
    last = await walk_to_complete(app, leaving, tmp_path, 100)
    leaving_case = await load(app, leaving.chat_id)
    assert leaving_case is not None
    loop = asyncio.get_running_loop()
    dump_database = backup_module._dump_database

    async def erase() -> None:
        await app.service.handle(leaving, Event(EventKind.DELETE_REQUEST), last)
        await app.service.handle(leaving, Event(EventKind.DELETE_CONFIRM), last + 1)

    def dump_then_erase(database_url: str, dest: Path) -> str:
        copied = dump_database(database_url, dest)
        asyncio.run_coroutine_threadsafe(erase(), loop).result(timeout=60)
        return copied

    monkeypatch.setattr(backup_module, "_dump_database", dump_then_erase)
    said: list[str] = []
    vault = app.settings.data_dir / "vault"
    await backup(app.settings.db_url, vault, tmp_path / "backup", said.append)
    assert await load(app, leaving.chat_id) is None  # erased meanwhile, blobs and all
    assert "1 case(s) were erased while the backup ran: restore erases them too" in said
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["erased_during"] == [leaving_case.id]

    said.clear()
    restored_dir, result = await restore_elsewhere(app, empty_database, tmp_path, said)
    assert result.report.ok, result.report.format()
    assert result.erased == 1 and result.blobs >= 3
    assert "erased 1 case(s) again: they were erased while the backup ran" in said
    copy = build_app(Settings(data_dir=restored_dir, database_url=empty_database))
    try:
        assert await load(copy, leaving.chat_id) is None
        assert await load(copy, kept.chat_id) == await load(app, kept.chat_id)
        assert set(await plaintexts(copy)) == set(copy.vault.iter_blob_ids())
        async with copy.store.session() as session:
            query = select(AuditRow).where(AuditRow.action == "case.erase")
            erasure = (await session.exec(query)).one()
        assert (erasure.actor, erasure.case_id) == ("operator", leaving_case.id)
        assert erasure.detail == "erased while the backup ran"
        assert await verify_chain(copy.store) == []
    finally:
        await copy.close()


async def test_backup_and_restore_refuse_what_they_must(tmp_path: Path) -> None:
    app = await open_app(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'cc.db'}")
    try:
        await walk_to_complete(app, Patient(7, 7, "en"), tmp_path, 1)
        vault = app.settings.data_dir / "vault"
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        with pytest.raises(BackupError, match="not an empty folder"):
            await backup(app.settings.db_url, vault, tmp_path / "full", lambda _: None)
        await backup(app.settings.db_url, vault, tmp_path / "backup", lambda _: None)
        # Into the DATA_DIR that holds the data: refused.
        with pytest.raises(BackupError, match="already exists"):
            await restore(app.settings.db_url, vault, app.settings.key_file, tmp_path / "backup")
    finally:
        await app.close()

    target = tmp_path / "restored"
    url = f"sqlite:///{target / 'cc.db'}"

    async def restore_into_target() -> object:
        return await restore(
            url, target / "vault", target / "master.key", tmp_path / "backup", lambda _: None
        )

    with pytest.raises(BackupError, match="does not exist"):  # no master key there yet
        await restore_into_target()
    with_key_of(app.settings, target)
    blob = sorted((tmp_path / "backup" / "vault" / "blobs").rglob("*/*"))[0]
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    name = blob.relative_to(tmp_path / "backup").as_posix()
    with pytest.raises(BackupError, match=f"{name} does not match its checksum"):
        await restore_into_target()
    blob.write_bytes(original)
    (tmp_path / "backup" / "stray.txt").write_text("added later")
    with pytest.raises(BackupError, match=r"stray\.txt is in the backup but not in its manifest"):
        await restore_into_target()
    (tmp_path / "backup" / "stray.txt").unlink()
    manifest_path = tmp_path / "backup" / "manifest.json"
    manifest = manifest_path.read_text()
    listed = json.loads(manifest)
    assert listed["erased_during"] == []
    manifest_path.write_text(json.dumps({**listed, "erased_during": ["../../etc"]}))
    with pytest.raises(BackupError, match="lists erased cases that are not case ids"):
        await restore_into_target()
    manifest_path.write_text(manifest)
    assert sorted(os.listdir(target)) == ["master.key"]  # nothing copied by a refused restore
    result = await restore_into_target()
    assert result.report.ok, result.report.format()


async def test_backup_restore_commands_print_no_patient_data(
    tmp_path: Path, emulator: BotApiEmulator
) -> None:
    app = await open_app(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'care-companion.db'}")
    try:
        await walk_to_complete(app, Patient(8, 8, "en"), tmp_path, 1, answer=ANSWER)
    finally:
        await app.close()
    telegram = {"BOT_TOKEN": emulator.token, "TELEGRAM_API_BASE_URL": emulator.base_url}
    doctor_run = await asyncio.to_thread(run_cli, tmp_path, "doctor", env=telegram)
    assert doctor_run.returncode == 0, doctor_run.stdout
    made = await asyncio.to_thread(run_cli, tmp_path, "backup", str(tmp_path / "backup"))
    assert made.returncode == 0, made.stderr
    assert KEY_NOT_INCLUDED in made.stdout
    restored = with_key_of(app.settings, tmp_path / "restored")
    back = await asyncio.to_thread(
        run_cli, tmp_path, "restore", str(tmp_path / "backup"), env={"DATA_DIR": str(restored)}
    )
    assert back.returncode == 0, back.stdout + back.stderr
    assert "restore complete" in back.stdout and "0 problem(s)" in back.stdout
    again = await asyncio.to_thread(
        run_cli, tmp_path, "restore", str(tmp_path / "backup"), env={"DATA_DIR": str(restored)}
    )
    assert again.returncode == 1 and "already exists" in again.stderr
    for run in (doctor_run, made, back, again):
        for secret in (PATIENT_NAME, ANSWER, "referral", "Passport"):
            assert secret not in run.stdout + run.stderr


# ---------------------------------------------------------------------------- migrations


async def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'data' / 'care-companion.db'}"
    (tmp_path / "data").mkdir()
    await asyncio.to_thread(upgrade, url)
    await set_revision(url, "0999_newer")
    with pytest.raises(SchemaTooNewError, match="0999_newer is newer than this version"):
        await asyncio.to_thread(upgrade, url)
    result = await asyncio.to_thread(run_cli, tmp_path, "migrate")
    assert result.returncode == 1
    assert (
        "database schema 0999_newer is newer than this version of care-companion knows; "
        "upgrade the code" in result.stderr
    )


VERSIONS = ROOT / "adapters" / "migrations" / "versions"
# Migrations that may do what the policy forbids, each with why. The initial schema made
# the first tables: no older instance existed to lose anything.
ALLOWED = {"0001_initial_schema.py": "the initial schema"}
DROPS = {"drop_column", "drop_table", "drop_constraint", "rename_table"}


def destructive_steps(source: str) -> list[str]:
    """What in upgrade() would break an instance still running the previous version."""
    tree = ast.parse(source)
    upgrade_fn = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "upgrade"
    )
    # A new table may have NOT NULL columns: no older code writes to it.
    in_new_tables = {
        id(inner)
        for node in ast.walk(upgrade_fn)
        if isinstance(node, ast.Call) and _called(node) == "create_table"
        for inner in ast.walk(node)
    }
    found: list[tuple[int, str]] = []
    for node in ast.walk(upgrade_fn):
        if not isinstance(node, ast.Call) or id(node) in in_new_tables:
            continue
        name, kwargs = _called(node), {k.arg: k.value for k in node.keywords}
        nullable = kwargs.get("nullable")
        not_null = isinstance(nullable, ast.Constant) and nullable.value is False
        step = (node.lineno, f"{name} on line {node.lineno}")
        if name in DROPS:
            found.append(step)
        elif name == "alter_column" and (not_null or "new_column_name" in kwargs):
            found.append(step)  # old code writes NULL there, or uses the old name
        elif name == "Column" and not_null and "server_default" not in kwargs:
            found.append((step[0], f"{step[1]}: NOT NULL without a server_default"))
        elif name == "execute" and any(
            word in ast.unparse(node).upper() for word in ("DROP ", "RENAME ", "SET NOT NULL")
        ):
            found.append(step)
    return [text for _, text in sorted(found)]  # ast.walk goes breadth first


def _called(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_every_migration_is_additive() -> None:
    """`care-companion migrate` runs while the previous version still serves: only add."""
    files = sorted(VERSIONS.glob("*.py"))
    assert set(ALLOWED) <= {path.name for path in files}, "a stale entry in ALLOWED"
    offenders = {
        path.name: steps
        for path in files
        if path.name not in ALLOWED and (steps := destructive_steps(path.read_text()))
    }
    assert offenders == {}


def test_the_additive_check_catches_destructive_steps() -> None:
    source = """
def upgrade():
    op.create_table("t", sa.Column("id", sa.Integer(), nullable=False))
    op.add_column("a", sa.Column("ok", sa.Text(), nullable=True))
    op.add_column("a", sa.Column("ok2", sa.Integer(), server_default="0", nullable=False))
    op.drop_column("a", "b")
    with op.batch_alter_table("a") as batch_op:
        batch_op.drop_table("c")
        batch_op.alter_column("d", nullable=False)
        batch_op.alter_column("e", new_column_name="f")
    op.rename_table("g", "h")
    op.add_column("a", sa.Column("i", sa.Integer(), nullable=False))
    op.execute("ALTER TABLE a DROP COLUMN j")

def downgrade():
    op.drop_table("t")
"""
    found = destructive_steps(source)
    assert [step.split(" ")[0] for step in found] == [
        "drop_column",
        "drop_table",
        "alter_column",
        "alter_column",
        "rename_table",
        "Column",
        "execute",
    ]
