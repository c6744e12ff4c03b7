"""A git revision's tree beside this one, for benches that compare before and after."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def extract_revision(revision: str, target: Path) -> Path:
    """The repository's tree at `revision` in `target`, with this tree's compiled catalogs
    (they are built, not committed)."""
    target.mkdir()
    with subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", revision], stdout=subprocess.PIPE
    ) as archive:
        subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.returncode:
        raise SystemExit(f"git archive {revision} failed")
    for catalog in (ROOT / "locales").rglob("*.mo"):
        shutil.copy(catalog, target / catalog.relative_to(ROOT))
    return target
