"""Hostile inputs and user mistakes: one test per case of `tests/hostile_cases.py`.

The promise: a mistake or a hostile input prints ONE error line on stderr
(``efrap CMD: error: ...``) that names the problem, and exits 2; a failed gate exits
1; nothing is written (no output, no temporary file), inputs are never modified; a
figure that cannot be measured is "not measurable" and fails a gate that asks for it,
never 0; no run shows a traceback.

The cases are defined once, in `tests/hostile_cases.py`; `bench/hostile_probe.py`
runs the same cases as real processes and prints the table. Here a case runs through
`pipeline.cli.main.main` in this process, unless it needs a process of its own (a
file-size limit, an ASCII locale, a broken standard output, a FIFO that could block,
a warning that quiet progress would hide).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.cli.args import COUNT_CAPS
from pipeline.cli.main import build_parser
from tests.hostile_cases import CASES, Run, judge, prepare, run_case

#: The cases the issue names, in its words, and the case that holds each.
ISSUE_CASES = {
    "a FIFO named x.png in an imagefolder hangs verify": "imagefolder_fifo",
    "a 1.5 MB npz of deflated zeros takes 1.87 GB with --limit 10": "npz_deflate_bomb",
    "LC_ALL=C with non-ASCII paths gives UnicodeEncodeError": "locale_c_non_ascii_output",
    "LC_ALL=C with a non-ASCII path in an error": "locale_c_non_ascii_error",
    "out/batch.lock as a folder gives IsADirectoryError": "batch_lock_is_folder",
    "verify > /dev/full gives a traceback": "stdout_dev_full",
    "verify | head -c 1 gives a traceback": "stdout_closed_pipe",
    "attack --train-limit 2100 ... raises ValueError (total_steps)": "attack_train_limit_no_batch",
    "efrap export refuses the .pt that efrap attack writes": "export_attack_checkpoint",
    "attack writes a QCB awake in FP with no warning": "attack_fp_asr_warning",
    "a manifest's model inside its own output folder is deleted before it is read":
        "batch_model_in_output_folder",
    "efrap batch results.json --out . overwrites the manifest": "batch_manifest_is_results_json",
    "--mean 104,117,123 without --input-scale 255 is accepted silently":
        "mean_in_0_255_units_without_input_scale",
    "--mean without --std warns 'no preprocessing given'": "mean_without_std",
    "a duplicate key in a gate config": "gate_config_duplicate_key",
    "iterations capped in the CLI": "defend_iters_too_many",
    "iterations capped in a gate config": "gate_defend_iters_too_many",
    "iterations capped in a batch manifest": "batch_iters_too_many",
    "images capped in the CLI": "num_calib_too_many",
    "images capped in a gate config": "gate_verify_limit_too_many",
    "images capped in a batch manifest": "batch_limit_too_many",
    "targets capped in the CLI": "scan_max_targets_two",
    "targets capped in a gate config": "gate_max_targets_two",
    "scan calibration capped in the CLI": "scan_num_calib_four",
    "scan calibration capped in a gate config": "gate_scan_num_calib_four",
    "scan calibration capped in a batch manifest": "batch_num_calib_four_with_scan",
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name: str, tmp_path: Path) -> None:
    result = run_case(name, tmp_path)
    line = result.error_line or result.stderr_first_line
    assert result.ok, f"{name}: {result.problem} (exit {result.exit_code}; stderr {line!r})"


@pytest.mark.parametrize("name", list(CASES))
def test_case_fails_a_run_that_did_nothing(name: str, tmp_path: Path) -> None:
    # A case that would pass a run which wrote nothing and said nothing useful cannot
    # fail, so it tests nothing: each must fail all three of these.
    group, setup, folder, before = prepare(name, tmp_path)
    for code, stderr in ((0, ""), (1, ""), (2, "efrap verify: error: something went wrong\n")):
        result = judge(name, group, setup, before, before, Run(folder, code, "", stderr), 0.0, False)
        assert not result.ok, f"{name} passes a run that exits {code} and does nothing"


def test_issue_cases_are_cases() -> None:
    missing = {words: name for words, name in ISSUE_CASES.items() if name not in CASES}
    assert not missing


def test_every_group_has_cases() -> None:
    # The groups of the issue that listed the broken cases: each has its cases here.
    groups = {group for group, _ in CASES.values()}
    assert {"data loss", "duplicate keys", "numbers and caps", "hangs and memory", "output streams",
            "attack and export", "preprocessing"} <= groups


def test_every_count_option_has_a_cap() -> None:
    # An integer option the caps do not know would take any size, and start work on it.
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    uncapped = []
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            try:
                value = action.type("5")
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                continue
            if isinstance(value, int) and not isinstance(value, bool) \
                    and action.option_strings[-1] not in COUNT_CAPS:
                uncapped.append(f"{command} {action.option_strings[-1]}")
    assert not uncapped
