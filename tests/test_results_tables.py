"""The acceptance rule that docs/DEFENSE.md and docs/RESULTS.md report (validators/acceptance.py).

Pure bookkeeping on hand-made rows: no model is quantized here. The last test runs
`bench/results.py --merge` as a script on a hand-made run (tests import no bench module,
tests/test_no_bench_imports.py) to see the rule's verdicts reach the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from validators import acceptance
from validators.acceptance import FLOORS, GOALS, tally, verdict, winner

ROOT = Path(__file__).resolve().parents[1]


def _row(model: str, fp: float, **methods: tuple[float, float]) -> dict:
    row: dict = {"model": model, "scheme": "w4a4", "carrier": "weights",
                 "fp": {"cda": fp, "asr": 1.0}}
    for name, (cda, asr) in methods.items():
        row[name] = {"cda": cda, "asr": asr}
    return row


def test_the_thresholds_are_the_documented_ones() -> None:
    assert (FLOORS.max_asr, FLOORS.max_cda_drop, GOALS.max_asr, GOALS.max_cda_drop) == (5.0, 2.0, 2.0, 1.0)
    # Both limits are inclusive.
    assert GOALS.met(90.0, 89.0, 2.0) and not GOALS.met(90.0, 88.99, 2.0) and not GOALS.met(90.0, 89.0, 2.01)


def test_floors_goals_and_winner() -> None:
    row = _row("m", 90.0, adaround=(89.9, 40.0), lac=(88.5, 1.0), release=(88.2, 4.0),
               default=(89.5, 1.5))
    assert (verdict(row), winner(row)) == ("met / met", "default")
    # Nothing meets the goals: the lowest ASR among the floors wins; nothing at all: none.
    missed = _row("m", 90.0, adaround=(89.9, 40.0), default=(89.0, 4.5), lac=(87.0, 3.0))
    assert (verdict(missed), winner(missed)) == ("met / missed", "default")
    failed = _row("m", 90.0, adaround=(80.0, 50.0), default=(85.0, 6.0))
    assert (verdict(failed), winner(failed)) == ("MISSED / missed", "none")


def test_a_row_without_the_default_or_any_defense() -> None:
    row = _row("m", 90.0, adaround=(89.9, 1.0))
    assert (verdict(row), winner(row)) == ("not run", "adaround")
    assert (verdict(_row("m", 90.0)), winner(_row("m", 90.0))) == ("not run", "-")


def test_a_tie_in_accuracy_goes_to_the_lower_attack_success() -> None:
    row = _row("m", 91.0, release=(91.28, 0.26), default=(91.28, 0.20))
    assert winner(row) == "default"


def test_the_unpruned_ablation_and_nearest_never_win() -> None:
    row = _row("m", 91.0, nearest=(91.0, 0.1), unpruned=(91.0, 0.5), fast=(91.0, 0.4),
               default=(90.5, 1.5))
    assert (verdict(row), winner(row)) == ("met / met", "default")
    assert not {"nearest", "unpruned", "fast"} & set(acceptance.CANDIDATES)


def test_qvec_can_win() -> None:
    row = _row("m", 91.0, default=(90.0, 1.5), qvec=(90.6, 1.0))
    assert (verdict(row), winner(row)) == ("met / met", "qvec")


def test_tally_counts_the_default_only() -> None:
    rows = [_row("a", 90.0, default=(89.5, 1.0)), _row("b", 90.0, adaround=(90.0, 0.2)),
            _row("c", 90.0, default=(88.5, 3.0)), _row("d", 90.0, default=(80.0, 0.0))]
    assert tally(rows) == (2, 1)
    assert tally(rows, "adaround") == (1, 1)


def test_the_bench_table_shows_every_column_and_the_rule(tmp_path: Path) -> None:
    row = _row("m", 91.0, unpruned=(91.0, 0.5), default=(90.5, 1.5), qvec=(90.6, 1.0))
    row["qvec"]["lambda"] = 1.5
    run = {"command": "cmd", "section": "heldout", "seed": 0, "limit": None, "results": [row],
           "versions": {}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    doc = tmp_path / "doc.md"
    subprocess.run([sys.executable, str(ROOT / "bench/results.py"), "--merge", str(tmp_path / "run.json"),
                    "--json", str(tmp_path / "out.json"), "--doc", str(doc)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    text = doc.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table
    assert "| qvec CDA/ASR |" in text and "| 91.00 / 0.50 |" in text and "90.60 / 1.00" in text
    assert table[-1].endswith("| met / met | qvec |")
    assert "m 1.5." in text and "qvec" not in text.split("Iterations per layer:")[1].split(";")[0]
    assert "meets the floors on 1 and the goals on 1 of 1 models" in text
    assert json.loads((tmp_path / "out.json").read_text())["results"] == [row]
