"""Operator views of cases for the CLI: `cases list`, `cases show`, `cases invite`."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import col, select

from adapters.store import SqlStore
from adapters.tables import CaseRow, FileRow, ItemRow
from core.checklist import Checklist


async def list_cases(store: SqlStore) -> list[dict[str, Any]]:
    async with store.session() as session:
        rows = (await session.exec(select(CaseRow).order_by(col(CaseRow.created_at)))).all()
    return [
        {
            "case_id": row.id,
            "state": row.state,
            "procedure": row.checklist_key,
            "current_item": row.current_item,
            "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat(),
            "completed_at": row.completed_at.isoformat() if row.completed_at else None,
        }
        for row in rows
    ]


async def show_case(
    store: SqlStore, case_id: str, checklists: dict[str, Checklist]
) -> dict[str, Any] | None:
    """The case and every item with its files (kind, verdict), and the item asked for now."""
    async with store.session() as session:
        case = await session.get(CaseRow, case_id)
        if case is None:
            return None
        items = {
            row.item_key: row
            for row in (await session.exec(select(ItemRow).where(ItemRow.case_id == case_id))).all()
        }
        files = (
            await session.exec(
                select(FileRow).where(FileRow.case_id == case_id).order_by(col(FileRow.created_at))
            )
        ).all()
    checklist = checklists.get(case.checklist_key or "")
    order = list(checklist.item_keys) if checklist else sorted(items)
    accepted_ids = {ref["file_id"] for row in items.values() for ref in json.loads(row.files_json)}
    item_views = []
    for key in order:
        row = items.get(key)
        item = checklist.item(key) if checklist else None
        item_views.append(
            {
                "key": key,
                "title": item.title if item else key,
                "required": item.required if item else None,
                "status": row.status if row else "pending",
                "has_answer": bool(row and row.answer_enc),
                "rejected_uploads": row.rejected_uploads if row else 0,
                "files": [
                    {
                        "file_id": f.id,
                        "kind": f.kind,
                        "verdict": f.status,
                        "counted": f.id in accepted_ids,
                        "size": f.size,
                        "sha256": f.sha256,
                        "received_at": f.created_at.isoformat(),
                    }
                    for f in files
                    if f.item_key == key
                ],
            }
        )
    return {
        "case_id": case.id,
        "state": case.state,
        "complete": case.state == "complete",
        "procedure": case.checklist_key,
        "locale": case.locale,
        "current_item": case.current_item,
        "consent_version": case.consent_version,
        "consent_at": case.consent_at.isoformat() if case.consent_at else None,
        "completed_at": case.completed_at.isoformat() if case.completed_at else None,
        "completions": case.completions,
        "items": item_views,
    }
