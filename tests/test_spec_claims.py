"""spec/claims.md settles every claim of the project's list with a test that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_one_of_the_32_claims_has_a_verdict_and_an_existing_test_or_is_open_with_a_reason():
    """An open claim (32: it needs second derivatives) names no test but must say why."""
    rows = [line for line in (ROOT / "spec" / "claims.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    numbers = [int(row.split("|")[1]) for row in rows]
    assert numbers == list(range(1, 33))
    for row in rows:
        cells = [c.strip() for c in row.replace("\\|", "¦").split("|")[1:-1]]
        assert cells[2].startswith("**"), f"claim {cells[0]}: no verdict"
        if cells[2].startswith("**open**"):
            assert "reason:" in cells[2] and cells[4] == "—", f"claim {cells[0]}: open, but how"
            continue
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", cells[4])
        if not refs and cells[4].startswith("same test as"):
            continue
        assert refs, f"claim {cells[0]}: no test named"
        for path, name in refs:
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"claim {cells[0]}: {path}::{name}"
