"""The wheel works outside the repository, and a shadowed top-level package stops it clearly.

The wheel is built with the README's command ("Install") in a copy of the repository (pip
builds in the source tree, writing build/ and *.egg-info there) and installed with the
README's command into a fresh virtual environment outside the repository, plus
`--no-deps --no-index`: `--system-site-packages` lends it this environment's torch and
onnxruntime, and CI never downloads. From an empty folder, with PYTHONPATH unset, it
checks where every package comes from, then runs `efrap demo` (short: `--iters 30
--num-calib 256`, on the Fashion-MNIST slice of tests/test_readme.py) and the README's
drop-in script (onnxruntime's quantize_static and efrap_onnx's on the stored clean model,
read from the installed wheel).

The layout's four generic top-level names (`pipeline`, `models`, `converters`,
`validators`) are checked by `efrap_onnx.packages`: each test below shadows one and
expects the one-line error naming it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import efrap_onnx
from efrap_onnx.packages import MARKER, PACKAGES, ShadowedPackageError, check_packages
from models.zoo import load_manifest
from pipeline.quantize import calibration_images
from tests.test_readme import (
    COMMANDS,
    PYTHON_BLOCKS,
    WHEEL_BUILD,
    WHEEL_INSTALL,
    edited,
    fashion_mnist_slice,
    python_entry,
    readme,
    repository_copy,
)

ROOT = Path(__file__).resolve().parent.parent
THIS = "tests/test_wheel.py"
WHEEL = "dist/efrap_onnx-0.1.0-py3-none-any.whl"
#: The drop-in's stored model, as the README names it (relative to the repository root).
README_FP = 'FP = "models/zoo/fmnist_small_cnn_clean.onnx"'
#: Prints where each package was imported from, then checks they are efrap-onnx's.
WHERE = ("import sys, efrap_onnx, pipeline, models, converters, validators, models.zoo\n"
         "for m in (efrap_onnx, pipeline, models, converters, validators):\n"
         "    print(m.__name__, m.__file__)\n"
         "print('path', *sys.path, sep='\\n')\n"
         "efrap_onnx.check_packages()\n")


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; its output is kept for the assertion messages."""
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def outside_env(data: Path) -> dict[str, str]:
    """The environment of a user outside the repository: no PYTHONPATH, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(EFRAP_FASHION_MNIST_DIR=str(data), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def readme_drop_in() -> str:
    """The README's drop-in script, shortened as tests/test_readme.py lists it."""
    _, blocks = readme()
    (block,) = [b for b in blocks if python_entry(b).elsewhere == THIS]
    text = block.text
    for old, new in python_entry(block).edits:
        text = edited(text, old, new, f"README.md:{block.line}")
    return text


def test_wheel_outside_repository(tmp_path: Path) -> None:
    """Build, install into a fresh venv, and run the demo and the drop-in from an empty folder."""
    assert [b.marker for b in PYTHON_BLOCKS if b.elsewhere == THIS] == ["efrap_quantize_static(FP"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert f"dist/efrap_onnx-{version}-py3-none-any.whl" == WHEEL and WHEEL in WHEEL_INSTALL
    assert efrap_onnx.__version__ == version
    data = fashion_mnist_slice(tmp_path / "fashion-mnist")
    source = repository_copy(tmp_path / "source")
    python3 = [sys.executable]  # the README's python3: this interpreter
    build = run(python3 + shlex.split(WHEEL_BUILD)[1:], source)
    assert build.returncode == 0, build.stdout + build.stderr
    with zipfile.ZipFile(source / WHEEL) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(f"efrap_onnx-{version}.dist-info/entry_points.txt").decode()
    assert {f"{name}/__init__.py" for name in ("efrap_onnx", *PACKAGES)} <= names
    stored = [name for entry in load_manifest() for name in (entry.file, entry.trigger) if name]
    zoo = {f"models/zoo/{name}" for name in [*stored, "manifest.json"]}
    assert zoo <= names, f"the wheel lacks {sorted(zoo - names)}"
    assert not any(name.startswith(("tests/", "bench/", "docs/")) for name in names)
    assert "efrap = efrap_onnx.cli:main" in entry_points

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    install = run([str(python), *shlex.split(WHEEL_INSTALL)[1:], "--no-deps", "--no-index"], source)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(source)  # nothing of the repository is left to import by accident

    folder = tmp_path / "user"
    folder.mkdir()
    env = outside_env(data)
    where = run([str(python), "-c", WHERE], folder, env)
    assert where.returncode == 0, where.stdout + where.stderr
    site = venv.resolve()
    for line in where.stdout.splitlines():
        name, _, file = line.partition(" ")
        if file:
            assert Path(file).resolve().is_relative_to(site), f"{name} imported from {file}, not the venv"
    # The repository is on no path entry (an editable install's finder, which maps names to
    # it, may be there: the module files above show the venv's copies come first).
    path = [Path(p) for p in where.stdout.split("path\n", 1)[1].splitlines() if os.path.isabs(p)]
    assert not [p for p in path if p.resolve().is_relative_to(ROOT)], path

    # The README's commands tests/test_readme.py leaves to this test: `efrap demo`, short.
    (demo_key,) = [key for key, command in COMMANDS.items() if command.elsewhere == THIS]
    entry = COMMANDS[demo_key]
    words = shlex.split(f"{demo_key} {entry.append}")
    demo = run([str(venv / "bin" / words[0]), *words[1:]], folder, env)
    assert demo.returncode == entry.status, demo.stdout + demo.stderr
    for row in ("full precision", "nearest w8a8", "nearest w4a4", entry.says):
        assert row in demo.stdout

    # The README's drop-in script, its stored model read from the installed wheel.
    script = edited(readme_drop_in(), README_FP,
                    'import models.zoo\nFP = str(models.zoo.MANIFEST.parent / "fmnist_small_cnn_clean.onnx")',
                    "the drop-in")
    (folder / "drop_in.py").write_text(script, encoding="utf-8")
    drop_in = run([str(python), "drop_in.py"], folder, env)
    assert drop_in.returncode == 0, drop_in.stdout + drop_in.stderr
    # Both quantizers' outputs run at opt level all and agree on the calibration images.
    fp = onnx.load(str(ROOT / "models" / "zoo" / "fmnist_small_cnn_clean.onnx"))
    images, _ = calibration_images(fp, "fashion-mnist", n=256, seed=0)
    batch = np.asarray(images[:256])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    top1 = {}
    for name in ("q.onnx", "q2.onnx", "defended.onnx"):
        session = ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        top1[name] = session.run(None, {"input": batch})[0].argmax(axis=1)
    assert (top1["q.onnx"] == top1["q2.onnx"]).mean() >= 0.98


def shadow(folder: Path, name: str, marker: bool = False) -> Path:
    """A package `name` in `folder`: someone else's, or with efrap-onnx's marker line."""
    package = folder / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"{MARKER}\n" if marker else "OTHER = True\n")
    return package / "__init__.py"


def env_with(path: list[Path]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.parametrize("name", PACKAGES)
def test_shadowed_package_stops_the_cli(tmp_path: Path, name: str) -> None:
    """`efrap` prints one line naming the package and both places, and exits 2."""
    other = shadow(tmp_path / "other", name)
    done = run([sys.executable, "-m", "efrap_onnx", "--version"], tmp_path,
               env_with([tmp_path / "other", ROOT]))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"efrap: error: efrap-onnx: the top-level package {name!r} resolves to "
                                  f"{other}, not to efrap-onnx's {ROOT / name / '__init__.py'}")


@pytest.mark.parametrize("code", ["from efrap_onnx import quantize_static", "import pipeline.api"])
def test_shadowed_package_stops_imports(tmp_path: Path, code: str) -> None:
    """The public import path and the pipeline raise ShadowedPackageError, naming the package."""
    shadow(tmp_path, "validators")  # in the current folder, first on sys.path for `python -c`
    done = run([sys.executable, "-c", code], tmp_path, env_with([ROOT]))
    assert done.returncode == 1
    assert "ShadowedPackageError: efrap-onnx: the top-level package 'validators' resolves to" in done.stderr


def test_overwritten_package_lacks_the_marker(tmp_path: Path) -> None:
    """A package in our folder without the marker (another distribution wrote over it) is refused."""
    shutil.copytree(ROOT / "efrap_onnx", tmp_path / "efrap_onnx")
    for name in PACKAGES:
        shadow(tmp_path, name, marker=name != "models")
    code = "from efrap_onnx.packages import check_packages; check_packages()"
    done = run([sys.executable, "-c", code], tmp_path, env_with([tmp_path]))
    assert done.returncode == 1
    assert f"{tmp_path / 'models' / '__init__.py'} is not efrap-onnx's (it lacks the line" in done.stderr
    (tmp_path / "models" / "__init__.py").write_text(f"{MARKER}\n")
    assert run([sys.executable, "-c", code], tmp_path, env_with([tmp_path])).returncode == 0


def test_data_folder_named_models_is_no_shadow(tmp_path: Path) -> None:
    """A `models/` folder without `__init__.py` (a folder of weights) does not hide ours."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "resnet.onnx").write_bytes(b"")
    code = "import efrap_onnx; efrap_onnx.check_packages(); import models.zoo"
    done = run([sys.executable, "-c", code], tmp_path, env_with([ROOT]))
    assert done.returncode == 0, done.stderr


def test_public_names() -> None:
    """Every public name of efrap_onnx loads, from this checkout's packages."""
    check_packages()
    for name in efrap_onnx.__all__:
        assert getattr(efrap_onnx, name) is not None
    assert efrap_onnx.quantize_static.__module__ == "pipeline.api"
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        _ = efrap_onnx.nonexistent
    assert issubclass(ShadowedPackageError, ImportError)
