"""Crash-and-fault harness, long form: `python bench/kill_bench.py` from the project root.

The real bot process against the Bot API emulator, N simulated patients walking the default
checklist (text, buttons, PDFs, albums, DICOM, photos), SIGKILL at random instants and a
restart, 429/5xx/dropped connections/slow and stalled downloads from the emulator. Prints the
counts (kills, updates, files, alerts, retries, 429s seen) and every invariant that failed;
exits 1 if any did. Options: --kills (default 120), --patients (12), --seed, --keep.
See tests/harness.py for the invariants.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import HarnessConfig, run_harness  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=120)
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=20261105)
    parser.add_argument("--no-faults", action="store_true", help="kills only, no 429/5xx")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and bot log")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kill-bench-"))
    config = HarnessConfig(
        patients=args.patients,
        kills=args.kills,
        seed=args.seed,
        faults=not args.no_faults,
        drain_timeout=420.0,
        workdir=workdir,
        verbose=True,
    )
    print(
        f"kill bench: {args.patients} patients, {args.kills} kills, seed {args.seed} "
        f"(about {args.kills * 11 // 60 + 2} minutes)",
        flush=True,
    )
    report = asyncio.run(run_harness(config))
    print(report.summary())
    if args.keep or not report.ok:
        print(f"data folder and bot log kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
