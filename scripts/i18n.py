"""`make i18n`: extract, update and compile the catalogs.

Message ids in code are keys (`Text("file.received")`); keys built at run time
(`item_status.*`, `kind.*`, `finding.*`...) are not visible to the extractor, so the
English catalog, which holds the source text of every key, is merged into the template too.
Checklist texts are their own ids (English), extracted by `checklists.extract`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
TEMPLATE = LOCALES / "messages.pot"
SOURCE = LOCALES / "en" / "LC_MESSAGES" / "messages.po"


def pybabel(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "babel.messages.frontend", *args], check=True, cwd=ROOT)


def main() -> int:
    pybabel(
        "extract",
        "-F",
        "babel.cfg",
        "-k",
        "Text",
        "--no-wrap",
        "--sort-by-file",
        "--project",
        "care-companion",
        "-o",
        str(TEMPLATE),
        ".",
    )
    with TEMPLATE.open("rb") as handle:
        template = read_po(handle)
    with SOURCE.open("rb") as handle:
        source = read_po(handle, locale="en")
    for message in source:
        if message.id and message.id not in template:
            template.add(message.id, locations=[("locales/en/LC_MESSAGES/messages.po", 0)])
    missing = sorted(
        str(m.id) for m in template if m.id and " " not in str(m.id) and m.id not in source
    )
    if missing:
        print("keys used in code but missing from the English catalog:", *missing, sep="\n  ")
        return 1
    with TEMPLATE.open("wb") as handle:
        write_po(handle, template, width=0)
    for po in sorted(LOCALES.glob("*/LC_MESSAGES/messages.po")):
        pybabel(
            "update",
            "--no-wrap",
            "-i",
            str(TEMPLATE),
            "-d",
            str(LOCALES),
            "-D",
            "messages",
            "-l",
            po.parent.parent.name,
            "--ignore-obsolete",
        )
    pybabel("compile", "-d", str(LOCALES), "-D", "messages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
