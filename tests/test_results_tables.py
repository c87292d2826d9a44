"""The defense tables of bench/results.py: floors, goals, winners and DEFENSE.md's summary.

Pure bookkeeping on hand-made rows: no model is quantized here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# bench/ is not an installed package: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results


def _row(model: str, fp: float, **methods: tuple[float, float]) -> dict:
    row: dict = {"model": model, "scheme": "w4a4", "carrier": "weights",
                 "fp": {"cda": fp, "asr": 1.0}}
    for name, (cda, asr) in methods.items():
        row[name] = {"cda": cda, "asr": asr}
    return row


def test_floors_goals_and_winner() -> None:
    row = _row("m", 90.0, adaround=(89.9, 40.0), lac=(88.5, 1.0), release=(88.2, 4.0),
               default=(89.5, 1.5))
    assert results.checks_of(row) == ("met / met", "default")
    # Nothing meets the goals: the lowest ASR among the floors wins; nothing at all: none.
    missed = _row("m", 90.0, adaround=(89.9, 40.0), default=(89.0, 4.5), lac=(87.0, 3.0))
    assert results.checks_of(missed) == ("met / missed", "default")
    assert results.checks_of(_row("m", 90.0, adaround=(80.0, 50.0), default=(85.0, 6.0))) == \
        ("MISSED / missed", "none")


def test_a_tie_in_accuracy_goes_to_the_lower_attack_success() -> None:
    row = _row("m", 91.0, release=(91.28, 0.26), default=(91.28, 0.20))
    assert results.checks_of(row)[1] == "default"


def test_the_unpruned_ablation_is_shown_but_never_wins() -> None:
    row = _row("m", 91.0, unpruned=(91.0, 0.5), default=(90.5, 1.5))
    assert results.checks_of(row) == ("met / met", "default")
    assert "91.00 / 0.50" in results.render([row], "cmd", 0)


def test_qvec_has_a_column_can_win_and_its_lambda_is_said() -> None:
    row = _row("m", 91.0, default=(90.0, 1.5), qvec=(90.6, 1.0))
    row["qvec"]["lambda"] = 1.5
    assert results.checks_of(row) == ("met / met", "qvec")
    text = results.render([row], "cmd", 0)
    assert "| qvec CDA/ASR |" in text and "90.60 / 1.00" in text and "m 1.5." in text
    assert "qvec" not in text.split("Iterations per layer:")[1].split(";")[0]


def test_every_row_has_a_cell_under_every_header() -> None:
    table = [line for line in results.render([_row("m", 91.0, default=(90.5, 1.5))], "cmd", 0).splitlines()
             if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table


def test_defense_summary_reads_every_section_and_counts_held_out_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sections = {
        "zoo": [_row("stored", 90.0, default=(89.8, 1.0), release=(85.0, 0.5))],
        "robust": [_row("surviving", 90.0, default=(89.9, 99.0))],
        "heldout": [_row("h_a", 90.0, default=(89.5, 1.0)), _row("h_b", 90.0, adaround=(90.0, 0.2)),
                    _row("h_c", 90.0, default=(88.5, 3.0))],
    }
    for name, rows in sections.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": rows}))
    monkeypatch.setattr(results, "default_json", lambda section: tmp_path / f"{section}.json")
    text = results.defense_summary()
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    # h_b has no default run: left out. The release cell says so where it was not run.
    assert [line.split(" | ")[0][2:] for line in table] == ["stored", "surviving", "h_a", "h_c"]
    assert "| 85.00 / 0.50 |" in table[0] and "not run" in table[2]
    assert "- Stored zoo: the default meets the floors on 1 and the goals on 1 of 1 models." in text
    assert ("- Held out for the rule's first part only (development data for the pruning): the default "
            "meets the floors on 2 and the goals on 1 of 3 models.") in text
    assert "whole rule" not in text


def test_models_built_after_the_pruning_are_counted_as_held_out_for_the_whole_rule(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = sorted(results.HELD_OUT_WHOLE_RULE)[0]
    rows = [_row(name, 90.0, default=(89.5, 1.0)), _row("h_old", 90.0, default=(89.5, 9.0))]
    (tmp_path / "heldout.json").write_text(json.dumps({"results": rows}))
    monkeypatch.setattr(results, "default_json", lambda section: tmp_path / f"{section}.json")
    text = results.defense_summary()
    assert f"| {name} | w4a4 | held out (whole rule) |" in text
    assert "- Held out for the whole rule: the default meets the floors on 1 and the goals on 1 of 1" in text
    assert "development data for the pruning): the default meets the floors on 0 and the goals on 0 of 1" \
        in text
