"""The upload bench in a short form (bench/upload_bench.py sends a 1 GiB study, 3 rounds): a
50 MiB study, one round, every path measured and the hand-over done. It checks that the
bench runs and reports every figure it promises, not what the figures are: a shared
machine's speed is no test's business (the bench prints ratios taken side by side)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = (
    "curl -> sink",
    "curl -> durable sink",
    "dd conv=fsync",
    "O_DIRECT writes",
    "page protocol (curl) -> sink",
    "page protocol (curl) -> durable sink",
    "page protocol (curl) -> upload endpoint",
    "the same, its disk writes dropped",
)


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("curl") is None, reason="the bench's baselines need curl")
def test_the_upload_bench_measures_every_path_in_a_short_form(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload_bench.py"), "--quick", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    out = done.stdout

    for path in PATHS:
        line = next((row for row in out.splitlines() if row.startswith(path + " ")), None)
        assert line is not None, (path, out)
        rate = re.search(r"(\d+) MiB/s", line)
        assert rate is not None and int(rate.group(1)) > 0, line
    assert re.search(r"upload endpoint: \d+\.\d\dx curl to the sink \(goal >= 0\.7x\)", out)
    bounds = re.search(
        r"the CPU at the sink's use of the cores (\d+\.\d\d)x .* the endpoint without its disk "
        r"writes (\d+\.\d\d)x \(writing costs it (\d+\.\d\d)x its speed",
        out,
    )
    assert bounds is not None, out
    assert all(float(figure) > 0 for figure in bounds.groups())
    rss = re.search(r"upload server (\d+) MiB idle, (\d+) MiB after the uploads", out)
    assert rss is not None and 0 < int(rss.group(1)) <= int(rss.group(2)), out
    # The hand-over completed: the study went through the intake as one ZIP.
    assert re.search(r"hand-over .*: \d+\.\d\d s = \d+ MiB/s", out), out
    # Nothing left behind in the temporary directory.
    assert not list(tmp_path.iterdir())
