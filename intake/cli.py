"""`care-companion check PATH... [--json]`: the verdict of each file; a folder or a ZIP
expands to its members. Each top-level file is checked in a limited worker process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from intake.runner import OpenPath, check_in_worker, shutdown_pool
from intake.verdict import Verdict


def _folder_verdict(path: str) -> Verdict:
    from intake.archive import check_folder

    files = sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(path, followlinks=False)
        for name in names
        if not os.path.islink(os.path.join(dirpath, name))
    )
    return check_folder(files, root=path)


def _render(path: str, verdict: Verdict) -> list[str]:
    codes = ", ".join(f"{f.code}({f.severity.value}){_params(f.params)}" for f in verdict.findings)
    lines = [f"{path}: {verdict.status.value} [{verdict.kind.value}] {codes}".rstrip()]
    meta = verdict.metadata
    for key in ("page_count", "language", "modality", "study_date", "width", "height"):
        if key in meta and meta[key] is not None:
            lines.append(f"    {key}: {meta[key]}")
    for study in meta.get("studies", []):
        lines.append(
            f"    study: {study['modality'] or '?'}, {study['date'] or '?'}: "
            f"{study['series_count']} series, {study['image_count']} images"
        )
    for member in meta.get("members", []):
        codes = ", ".join(member.get("codes", []))
        status = member.get("status", "?")
        lines.append(f"    - {member['name']}: {status} [{member['kind']}] {codes}".rstrip())
    if meta.get("member_count", 0) > len(meta.get("members", [])):
        lines.append(f"    ... {meta['member_count'] - len(meta['members'])} more members")
    return lines


def _params(params: dict[str, Any]) -> str:
    return " " + json.dumps(params, ensure_ascii=False) if params else ""


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 every file accepted (maybe with notes), 1 some rejected, 2 usage error."""
    parser = argparse.ArgumentParser(prog="care-companion check", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    args = parser.parse_args(argv)
    worst = 0
    try:
        for path in args.paths:
            if os.path.isdir(path):
                verdict = _folder_verdict(path)
            elif os.path.isfile(path):
                verdict = check_in_worker(
                    OpenPath(os.path.abspath(path)),
                    os.path.basename(path),
                    None,
                    timeout_s=args.timeout,
                    cpu_s=int(args.timeout),
                    memory_mb=1024,
                )
            else:
                print(f"{path}: not found", file=sys.stderr)
                worst = 2
                continue
            if not verdict.accepted:
                worst = max(worst, 1)
            if args.json:
                print(json.dumps({"path": path, **verdict.to_dict()}, ensure_ascii=False))
            else:
                print("\n".join(_render(path, verdict)))
    finally:
        shutdown_pool()
    return worst


if __name__ == "__main__":
    sys.exit(main())
