"""SIGKILL crashes of a writer driven through the handler (issue 6 requirement 1), short run.

The harness is ``crash_harness.py`` beside this file (see its docstring for what is
checked after every kill). Here each scenario gets a few kills, seeded; the full
campaign of at least 200 kills runs by one command::

    python tests/reliability/crash_harness.py --kills 200 --seed 1

``QUIPU_CRASH_SEED`` picks another seed for this short run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

import quipu_logging

PACKAGE_PARENT = str(Path(quipu_logging.__file__).resolve().parent.parent)
KILLS_PER_SCENARIO = 5  # one kill per sync policy in every scenario
SEED = int(os.environ.get("QUIPU_CRASH_SEED", "20261204"))


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "crash_harness", Path(__file__).with_name("crash_harness.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _harness()


@pytest.mark.parametrize("scenario", harness.SCENARIOS)
def test_sigkill(scenario: str, tmp_path: Path) -> None:
    """Killed at random moments or inside the scenario's operation: reopens, nothing acknowledged lost."""
    (c,) = harness.campaign(
        KILLS_PER_SCENARIO, SEED, (scenario,), base=tmp_path, package_parent=PACKAGE_PARENT
    )
    assert c.kills == KILLS_PER_SCENARIO
    # the checks ran on real data, not on empty stores
    assert c.checked > 0
