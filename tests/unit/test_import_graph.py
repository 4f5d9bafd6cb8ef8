"""The packages' import graph: the contract at the bottom, no cycle between producers and workers.

``schemas`` (the contract, the plans format) imports neither ``producers`` nor
``stream_processors``; ``producers`` (what gateways embed) never imports ``stream_processors``;
``stream_processors`` reads ``producers`` through its public names only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Module file -> every module it imports (absolute names), lazy imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("schemas", ("producers", "stream_processors")), ("producers", ("stream_processors",))],
)
def test_a_lower_package_never_imports_a_higher_one(package: str, forbidden: tuple[str]) -> None:
    bad = {
        module: sorted(n for n in names if n.split(".")[0] in forbidden)
        for module, names in imported_modules(package).items()
    }
    assert not {m: n for m, n in bad.items() if n}


def test_stream_processors_read_producers_through_their_public_names() -> None:
    bad = {
        module: sorted(n for n in names if n.startswith("producers._"))
        for module, names in imported_modules("stream_processors").items()
    }
    assert not {m: n for m, n in bad.items() if n}


def test_importing_producers_and_reading_subscriptions_loads_no_worker_code(
    tmp_path: Path,
) -> None:
    subs = tmp_path / "subs.yaml"
    subs.write_text(
        "- {user_id: u, org_id: o, billing_anchor: '2026-01-01T00:00:00Z',\n"
        "   plans: [{plan_id: free, effective_at: '2026-01-01T00:00:00Z'}]}\n",
        encoding="utf-8",
    )
    code = (
        "import sys\n"
        "from producers import load_subscriptions\n"
        "from schemas.plans import load_plans\n"
        f"load_subscriptions({str(subs)!r}, plans=load_plans())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'stream_processors'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert run.stdout.strip() == "[]"
