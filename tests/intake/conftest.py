"""Shared fixtures of the intake tests: the generated hostile corpus, built once a session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).parent)
sys.path.insert(0, HERE)
# The runner's workers unpickle the test openers (module `workload`): let them import it.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)

import corpus  # noqa: E402 - the helper module lives beside this file

from intake import limits  # noqa: E402
from intake.runner import shutdown_pool  # noqa: E402


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every hostile sample, by name."""
    return corpus.write_all(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session", autouse=True)
def _stop_workers():
    """Workers outlive a test; stop them at the end of the session."""
    yield
    shutdown_pool()


@pytest.fixture
def unhurried_ocr(monkeypatch: pytest.MonkeyPatch) -> None:
    """OCR given all the time it needs. Its time limits are wall-clock ones: on a busy machine
    the readings run out of time and the verdict falls back to the fast screen, so a test of
    what the verdict says must not depend on the load (the limits' own behaviour is tested
    apart, in test_legibility.py)."""
    monkeypatch.setattr(limits, "OCR_BUDGET_S", 600.0)
    monkeypatch.setattr(limits, "OCR_TIMEOUT_S", 300.0)
