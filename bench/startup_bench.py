"""Start-up benchmark: `python bench/startup_bench.py [--base REV] [--rounds N]`.

Time from exec to ready of the real bot process (`python -m bot run`, long polling) against
the Bot API emulator: from the moment the process is started to its first getUpdates, the
moment it can serve patients. This tree and the tree at git revision REV (default the merge
base with `main`, extracted with `git archive` and run on this venv and the compiled catalogs)
are started alternately, each round one start of each, on a data folder that already holds a
database at its head revision (a restart: what the crash harness and a deploy do), plus one
first start on an empty folder (database created, migrated, master key written).

The ratio is taken within each round and the median over the rounds printed, so load from
elsewhere on the machine moves both sides of a ratio alike. A warm-up start of each tree
first writes its bytecode caches where Python may (not where PYTHONDONTWRITEBYTECODE is
set); this tree gets its bytecode from `make bytecode`, as `make setup` leaves it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.revision import extract_revision  # noqa: E402
from tests.botproc import BotProcess  # noqa: E402
from tests.emulator import BotApiEmulator  # noqa: E402

READY_TIMEOUT_S = 120.0


async def time_to_ready(emu: BotApiEmulator, tree: Path, workdir: Path) -> float:
    """Seconds from starting the bot (from `tree`) to its first getUpdates; then stopped."""
    bot = BotProcess(emu, workdir, extra_env={"PYTHONPATH": str(tree)})
    mark = len(emu.calls)
    started = time.monotonic()
    bot.start()
    try:
        await emu.wait_for_call("getUpdates", timeout=READY_TIMEOUT_S, since=mark)
        return time.monotonic() - started
    except TimeoutError:
        raise SystemExit(f"{tree}: not ready in {READY_TIMEOUT_S}s\n{bot.log()[-3000:]}") from None
    finally:
        bot.stop()


def merge_base() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


async def run(trees: dict[str, Path], base: str, rounds: int, work: Path) -> None:
    async with BotApiEmulator() as emu:
        # Warm-up: bytecode caches written, each tree's database created at its head.
        first = {name: await time_to_ready(emu, tree, work / name) for name, tree in trees.items()}
        times: dict[str, list[float]] = {name: [] for name in trees}
        ratios = []
        for index in range(rounds):
            # Alternate which goes first, so neither always follows the other's exit.
            order = list(trees) if index % 2 == 0 else list(reversed(trees))
            for name in order:
                times[name].append(await time_to_ready(emu, trees[name], work / name))
            ratios.append(times["this"][-1] / times["base"][-1])
            print(
                f"round {index + 1}: base {times['base'][-1]:.2f} s, "
                f"this {times['this'][-1]:.2f} s, ratio {ratios[-1]:.2f}",
                flush=True,
            )
        fresh = {
            name: await time_to_ready(emu, tree, work / f"{name}-fresh")
            for name, tree in trees.items()
        }
    print(
        f"\nbase = {base[:12]}, {rounds} rounds, seconds from exec to first getUpdates, "
        f"PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}"
    )
    for name in trees:
        print(
            f"  {name:<5} restart median {statistics.median(times[name]):.2f} s "
            f"(min {min(times[name]):.2f}), first start {first[name]:.2f} s, "
            f"on an empty folder {fresh[name]:.2f} s"
        )
    print(f"  ratio this/base, restart: median {statistics.median(ratios):.2f}")
    print(f"  ratio this/base, empty folder: {fresh['this'] / fresh['base']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision to compare with (default: merge base)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = args.base or merge_base()
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    try:
        trees = {"base": extract_revision(base, work / "base-tree"), "this": ROOT}
        subprocess.run(["make", "-s", "-C", str(ROOT), "bytecode"], check=True)
        for name in trees:  # each tree's data folders: restarted, and empty for the last start
            (work / name).mkdir()
            (work / f"{name}-fresh").mkdir()
        asyncio.run(run(trees, base, args.rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
