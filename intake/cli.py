"""`care-companion check PATH... [--json]`: the verdict of each file; a folder or a ZIP
expands to its members. Each top-level file is checked in a limited worker process."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Any

from intake.runner import OpenPath, check_in_worker, shutdown_pool
from intake.verdict import Finding, Kind, Severity, Verdict, verdict_from

FOLDER_MEMORY = 2 * 1024**3  # address space for checking a whole folder (a CD's worth)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_verdict(path: str) -> Verdict:
    from intake.archive import check_folder

    files = sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(path, followlinks=False)
        for name in names
        if not os.path.islink(os.path.join(dirpath, name))
    )
    return check_folder(files, root=path)


def _limited_folder_verdict(path: str, timeout: float) -> Verdict:
    """A folder's check in a child process under memory, CPU and wall-clock limits, like
    single files in the worker pool: a hostile member fails the folder, never the caller."""

    def limit() -> None:  # runs in the child, before it starts
        resource.setrlimit(resource.RLIMIT_AS, (FOLDER_MEMORY, FOLDER_MEMORY))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout), int(timeout) + 1))

    try:
        child = subprocess.run(  # noqa: S603  # our own module, the path as one argument
            [sys.executable, "-m", "intake.cli", "--folder-child", path],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,  # the CLI runs no threads, so a fork hook is safe here
            check=False,
            env={**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
        )
    except subprocess.TimeoutExpired:
        return verdict_from(Kind.ZIP, [Finding("check_timeout", Severity.ERROR)])
    if child.returncode != 0 or not child.stdout.strip():
        return verdict_from(Kind.ZIP, [Finding("check_failed", Severity.ERROR)])
    return Verdict.from_dict(json.loads(child.stdout))


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
    parser.add_argument("--folder-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.folder_child:  # inside the limited child of _limited_folder_verdict
        print(json.dumps(_folder_verdict(args.paths[0]).to_dict(), ensure_ascii=False))
        return 0
    worst = 0
    try:
        for path in args.paths:
            if os.path.isdir(path):
                verdict = _limited_folder_verdict(path, args.timeout * 5)
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
            if args.json:  # never a PDF's text sample: it is the record's own words
                shown = {k: v for k, v in verdict.metadata.items() if k != "text_sample"}
                line = {"path": path, **verdict.to_dict(), "metadata": shown}
                print(json.dumps(line, ensure_ascii=False))
            else:
                print("\n".join(_render(path, verdict)))
    finally:
        shutdown_pool()
    return worst


if __name__ == "__main__":
    sys.exit(main())
