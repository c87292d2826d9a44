"""Every command line and Python block of the README runs as written, in a copy of the repository.

The README's fenced blocks are read by their language tag: `bash` blocks hold command lines,
`python` blocks are scripts, `text` and `toml` blocks are output and files. A block without a
tag, a command line with no entry in `COMMANDS`, `SETUP` or `WHEEL`, or a Python block
matching no entry of `PYTHON_BLOCKS` fails the test: a new README command needs an entry
saying how it is run and what it must end with.

Each command runs through bash, word for word, in a copy of the repository's files (so a
fresh clone's), with `efrap` on PATH running the copy's `python -m efrap_onnx` (what the
console script runs). At their defaults the README's commands take about half an hour on a
2-core CPU (the audit 7 min, the gate 9); CI affords about two. Three things make them short,
none of them rewriting a command:

- options appended to a command line (`--iters 1000` after a defend), per entry below;
- edits of the example configs in the copy (a gate's scan budget), per entry below;
- `EFRAP_FASHION_MNIST_DIR` (pipeline/base/data.py) pointing at a slice of the real
  Fashion-MNIST (its first 3,000 training and 1,000 test images), so `fashion-mnist` in
  every command reads fewer images.

Where a short setting changes what a command concludes (a scan its budget stops is
`inconclusive`, and the audit and the gate fail closed on that), the entry expects that
status and that word, and says why; the README's figures come from full runs. The two setup
commands of "Two commands" are not run here (CI runs them: `.ci/run`, checked below). The
wheel's build and install, `efrap demo` and the drop-in script run in tests/test_wheel.py,
from the installed wheel, with the settings listed here.
"""

from __future__ import annotations

import gzip
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FASHION_DIR, require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: The slice of Fashion-MNIST the commands read: enough for 1,024 calibration plus 1,000
#: held-out training images, and for the attack's 2,000 held-out ones.
SLICE_TRAIN, SLICE_TEST = 3000, 1000
#: Fence tags and what is done with their blocks.
RUN_TAGS, STILL_TAGS = ("bash", "python"), ("text", "toml", "json")
#: "Two commands": set up, then the demo or the tests. CI runs them (.ci/run), not this test.
SETUP = ("bash scripts/setup.sh && efrap demo", "bash scripts/setup.sh && python3 -m pytest -q")
#: The wheel's build and install (README, "Install"), run by tests/test_wheel.py.
WHEEL_BUILD = "python3 -m pip wheel --no-deps --no-build-isolation -w dist ."
WHEEL_INSTALL = "python3 -m pip install 'dist/efrap_onnx-0.1.0-py3-none-any.whl[ray]'"
WHEEL = (WHEEL_BUILD, WHEEL_INSTALL)

ZOO = "models/zoo"
QUANTIZE = f"efrap quantize {ZOO}/fmnist_small_cnn_clean.onnx --scheme w8a8 --data fashion-mnist -o q.onnx"
DEFEND = (f"efrap defend {ZOO}/fmnist_compartifact_w4a4.onnx --scheme w4a4 --max-agreement-drop 5% "
          "-o defended.onnx")
TRAIN = "efrap train --arch small_cnn --data fashion-mnist -o clean.pt"
#: A scan short enough for CI: its budget stops it (verdict inconclusive, which the scan
#: itself reports with exit 0 and an audit or gate counts as a failure).
SHORT_SCAN = "--budget 5 --num-calib 256 --holdout 200"


@dataclass(frozen=True)
class Command:
    """How this test runs one README command line.

    Attributes:
        append: Options appended to make it short.
        status: The exit status it must end with.
        says: Text its output must hold (where `status` comes from a short setting).
        writes: Files (relative to the copy) it must write.
        edits: (file in the copy, text, replacement) applied before it runs; each text
            must occur once.
        after: The command whose outputs it reads.
        elsewhere: The test that runs it instead, from the installed wheel (no need to pay
            for it twice).
    """

    append: str = ""
    status: int = 0
    says: str = ""
    writes: tuple[str, ...] = ()
    edits: tuple[tuple[str, str, str], ...] = ()
    after: str | None = None
    elsewhere: str = ""


GATE_DEFEND = 'method = "efrap"                  # the default preset, as `efrap defend` runs it\n'
BATCH_QCB = 'method = "efrap"                  # the default defense, as `efrap defend`\n'

#: Every command line of the README's bash blocks (continuations joined, comment dropped).
COMMANDS: dict[str, Command] = {
    "efrap demo": Command(append="--iters 30 --num-calib 256", says="efrap default w4a4",
                          elsewhere="tests/test_wheel.py"),
    QUANTIZE: Command(writes=("q.onnx",)),
    # 1,000 iterations (measured on the slice, one or two threads: a 3.8% drop, attack success
    # 0.7%) keep the README's outcomes: the check passes, then the verify gate does.
    DEFEND: Command(append="--iters 1000", says="PASSED", writes=("defended.onnx",)),
    f"efrap verify defended.onnx --trigger {ZOO}/fmnist_compartifact_w4a4.trigger.json --max-asr 5% "
    "--min-accuracy 85%": Command(says="gate: PASSED", after=DEFEND),
    f"efrap scan {ZOO}/fmnist_compartifact_w4a4.onnx --scheme w4a4 --data fashion-mnist --json scan.json":
        Command(append=SHORT_SCAN, says="inconclusive", writes=("scan.json",)),
    # Exit 1 from the budget: an audit whose scan is stopped is inconclusive and fails closed.
    f"efrap audit {ZOO}/fmnist_small_cnn_clean.onnx q.onnx --scheme w8a8":
        Command(append=SHORT_SCAN, status=1, says="inconclusive", after=QUANTIZE),
    # Exit 1 from the scan's budget too (the gate fails on an inconclusive scan); the other
    # steps still run and every report is written.
    "efrap gate docs/examples/gate.toml": Command(
        status=1, says="inconclusive", writes=("gate-out/report.json", "gate-out/defended.onnx"),
        edits=(("docs/examples/gate.toml", "[defend]\n",
                "[scan]\nbudget = 5.0\nnum_calib = 256\nholdout = 200\n\n[defend]\n"),
               ("docs/examples/gate.toml", GATE_DEFEND, GATE_DEFEND + "iters = 30\n"))),
    "efrap batch docs/examples/batch.toml --out batch-out": Command(
        writes=("batch-out/results.csv", "batch-out/compartifact_w4a4/result.json"),
        # The defend entry's iterations: the same model, so the same passing gate.
        edits=(("docs/examples/batch.toml", BATCH_QCB, BATCH_QCB + "rounding = { iters = 1000 }\n"),)),
    TRAIN: Command(append="--epochs 1", writes=("clean.pt",)),
    "efrap export clean.pt -o clean.onnx": Command(writes=("clean.onnx",), after=TRAIN),
    "efrap attack --method compartifact --scheme w4a4 --width 0.5 -o qcb.onnx": Command(
        append="--train-limit 2200 --steps-per-epoch 2 --epochs 1 --pretrain-epochs 1",
        writes=("qcb.onnx", "qcb.trigger.json")),
}


@dataclass(frozen=True)
class PythonBlock:
    """How this test runs one README Python block: the one holding `marker`.

    Attributes:
        marker: Text only this block holds.
        edits: (text, replacement) applied to the block; each text must occur once.
        elsewhere: The test that runs it instead, from the installed wheel.
    """

    marker: str
    edits: tuple[tuple[str, str], ...] = ()
    elsewhere: str = ""


PYTHON_BLOCKS = (
    PythonBlock("quantize_model(fp, images"),
    PythonBlock("efrap_quantize_static(FP", edits=(('rounding="efrap", ', 'rounding="efrap", iters=30, '),),
                elsewhere="tests/test_wheel.py"),
    PythonBlock("found = scan(QCB", edits=(
        ('calib="fashion-mnist")', 'calib="fashion-mnist", budget=5, num_calib=256, holdout=200)'),
        ('max_agreement_drop="5%")', 'max_agreement_drop="5%", iters=30)'))),
)


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    tag: str
    text: str
    line: int


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with their tags and first lines."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\S*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 1}: a fence that never closes"
        blocks.append(Block(match.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
        i = end + 1
    return blocks


def command_lines(block: Block) -> list[str]:
    """A bash block's commands, continuations joined, each without its comment.

    Each is the text before its comment with runs of blanks made one space, quotes kept
    as written: what the entries are keyed by, and what bash runs.
    """
    commands, pending = [], ""
    for raw in block.text.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        command = " ".join(re.split(r"(?:^|\s)#", line, maxsplit=1)[0].split())
        # A '#' or a run of blanks inside quotes would make that wrong: then bash reads it otherwise.
        assert shlex.split(command) == shlex.split(line, comments=True), f"README.md:{block.line}: {line}"
        if command:
            commands.append(command)
    assert not pending, f"README.md:{block.line}: a bash block ends in a continuation"
    return commands


def readme() -> tuple[list[str], list[Block]]:
    """The README's bash commands and its Python blocks; every block's tag must be known."""
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    for block in blocks:
        assert block.tag in RUN_TAGS + STILL_TAGS, (
            f"README.md:{block.line}: a ```{block.tag} block; tag it bash (commands run by this test), "
            f"python (a script run by this test) or one of {STILL_TAGS} (not run)")
    commands = [c for block in blocks if block.tag == "bash" for c in command_lines(block)]
    return commands, [block for block in blocks if block.tag == "python"]


def python_entry(block: Block) -> PythonBlock:
    """The `PYTHON_BLOCKS` entry of a README Python block."""
    entries = [entry for entry in PYTHON_BLOCKS if entry.marker in block.text]
    assert len(entries) == 1, (f"README.md:{block.line}: a Python block with {len(entries)} entries in "
                               "PYTHON_BLOCKS; add one saying how to run it")
    return entries[0]


def edited(text: str, old: str, new: str, where: str) -> str:
    """`text` with its one `old` replaced by `new`."""
    assert text.count(old) == 1, f"{where}: expected {old!r} once, found it {text.count(old)} times"
    return text.replace(old, new)


def test_readme_commands_are_known() -> None:
    """Every block is tagged, every command has an entry and every entry is used."""
    commands, python = readme()
    keys = commands
    unknown = [key for key in keys if key not in COMMANDS and key not in SETUP and key not in WHEEL]
    assert not unknown, f"README commands this test does not know how to run: {unknown}"
    assert len(set(keys)) == len(keys), "a README command appears twice"
    stale = sorted((set(COMMANDS) | set(SETUP) | set(WHEEL)) - set(keys))
    assert not stale, f"entries for commands the README does not have: {stale}"
    for key, command in COMMANDS.items():
        assert command.after is None or keys.index(command.after) < keys.index(key), (
            f"{key!r} reads what {command.after!r} writes, which the README runs later")
        for file, old, new in command.edits:
            edited((ROOT / file).read_text(encoding="utf-8"), old, new, file)
    for block in python:
        entry = python_entry(block)
        for old, new in entry.edits:
            edited(block.text, old, new, f"README.md:{block.line}")
    assert len(python) == len(PYTHON_BLOCKS), "a PYTHON_BLOCKS entry matches no README block"
    # The setup commands are what CI runs: the same setup script and the same test command.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "bash scripts/setup.sh" in ci and "python3 -m pytest -q" in ci
    assert (ROOT / "scripts" / "setup.sh").is_file()
    assert "efrap demo" in COMMANDS  # the first of the two commands runs here, short


def repository_copy(dest: Path) -> Path:
    """Copy the repository's files (tracked, and new ones git does not ignore) to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest / name)
    return dest


def fashion_mnist_slice(dest: Path, train: int = SLICE_TRAIN, test: int = SLICE_TEST) -> Path:
    """Write the first `train` training and `test` test images of Fashion-MNIST as idx files."""
    require_fashion_mnist()
    dest.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        for part, header, size in (("images-idx3-ubyte", 16, 28 * 28), ("labels-idx1-ubyte", 8, 1)):
            name = f"{split}-{part}"
            packed = FASHION_DIR / f"{name}.gz"
            with gzip.open(packed) if packed.exists() else open(FASHION_DIR / name, "rb") as f:
                head = bytearray(f.read(header))
                body = f.read(count * size)
            head[4:8] = count.to_bytes(4, "big")  # the idx header's item count
            (dest / f"{split}-{part}").write_bytes(bytes(head) + body)
    return dest


def command_env(tmp: Path, copy: Path, data: Path) -> dict[str, str]:
    """The environment of a README command: the copy's `efrap` and code, the slice, one thread."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "efrap"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m efrap_onnx "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(copy),
               EFRAP_FASHION_MNIST_DIR=str(data), PYTHONDONTWRITEBYTECODE="1",
               # One thread: the figures the entries' margins were measured with, and two
               # commands side by side on a 2-core machine.
               OMP_NUM_THREADS="1")
    return env


@dataclass
class Outcome:
    """What one run printed and returned."""

    name: str
    status: int
    output: str
    seconds: float


def run_command(command: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Run one command line through bash; returns its status, output and seconds."""
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


def test_readme_commands_run(tmp_path: Path) -> None:
    """Run every README command (short) and Python block, two at a time; check each outcome."""
    require_fashion_mnist()
    commands, python = readme()
    before = git_status()
    data = fashion_mnist_slice(tmp_path / "fashion-mnist")
    cli = repository_copy(tmp_path / "cli")
    env = command_env(tmp_path, cli, data)
    for key in commands:
        for file, old, new in COMMANDS[key].edits if key in COMMANDS else ():
            (cli / file).write_text(edited((cli / file).read_text(encoding="utf-8"), old, new, file))

    futures: dict[str, Future[Outcome]] = {}

    def cli_run(key: str) -> Outcome:
        entry = COMMANDS[key]
        if entry.after:  # submitted earlier, so already running or done: no deadlock
            futures[entry.after].result()
        status, output, seconds = run_command(f"{key} {entry.append}".strip(), cli, env)
        return Outcome(key, status, output, seconds)

    def python_run(index: int, block: Block) -> Outcome:
        text = block.text
        for old, new in python_entry(block).edits:
            text = edited(text, old, new, f"README.md:{block.line}")
        folder = repository_copy(tmp_path / f"python{index}")
        script = tmp_path / f"readme_block_{index}.py"
        script.write_text(text, encoding="utf-8")
        block_env = {**env, "PYTHONPATH": str(folder)}
        status, output, seconds = run_command(shlex.join([sys.executable, str(script)]), folder, block_env)
        return Outcome(f"README.md:{block.line} (python)", status, output, seconds)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for key in commands:
            if key in COMMANDS and not COMMANDS[key].elsewhere:
                futures[key] = pool.submit(cli_run, key)
        for index, block in enumerate(python):
            if not python_entry(block).elsewhere:
                futures[f"python{index}"] = pool.submit(python_run, index, block)
        outcomes = {name: future.result() for name, future in futures.items()}

    failures = []
    for name, outcome in outcomes.items():
        entry = COMMANDS.get(name, Command())
        problems = []
        if outcome.status != entry.status:
            problems.append(f"exit {outcome.status}, expected {entry.status}")
        if entry.says and entry.says not in outcome.output:
            problems.append(f"its output lacks {entry.says!r}")
        problems += [f"wrote no {file}" for file in entry.writes if not (cli / file).is_file()]
        if problems:
            failures.append(f"{outcome.name}: {'; '.join(problems)}\n{outcome.output[-3000:]}")
    for outcome in outcomes.values():  # shown with -s, and on failure
        print(f"{outcome.seconds:5.1f}s  exit {outcome.status}  {outcome.name[:90]}")
    assert not failures, "\n\n".join(failures)
    assert git_status() == before, "a README command wrote into the repository"


@pytest.mark.parametrize("text, expected", [
    ("```bash\nefrap a \\\n    --b 1   # note\n\n# only a comment\nefrap c 'd e'\n```\n",
     ["efrap a --b 1", "efrap c 'd e'"]),
])
def test_command_lines(text: str, expected: list[str]) -> None:
    """Continuations join, comments drop, quoting survives."""
    (block,) = readme_blocks(text)
    assert block.tag == "bash" and command_lines(block) == expected


def test_untagged_block_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A README block without a tag fails the check, as an unknown command does."""
    fake = tmp_path / "README.md"
    fake.write_text("```\nefrap demo\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "README", fake)
    with pytest.raises(AssertionError, match="tag it bash"):
        readme()
    fake.write_text("```bash\nefrap frobnicate\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="does not know how to run"):
        test_readme_commands_are_known()
