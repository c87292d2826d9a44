"""Writing outputs safely: never over an input, never a half-written file, never a device node.

Every command declares the paths it reads and the paths it writes, and
`check_outputs` refuses, before any work is done, an output that is an input (the
model, its external-data files, a trigger, scheme or data file), a file inside an
input folder (even a new one: it would change what the folder holds), another
output, something other than a regular file (a folder, /dev/null, /dev/full), a
path ending in a separator (``nodir/`` names a folder, not a file), a name too long
for the file system, or a folder that is missing or not writable.
`atomic_write` then writes through a temporary file in the same folder and renames
it into place: a failed or killed run leaves the old file untouched, an existing
file keeps its permissions, and the temporary file is removed on every exit path
Python sees; one left by a killed run (its process gone) is removed the next time a
file is written in that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pipeline.base.errors import EfrapError

TMP_PREFIX = ".efrap-tmp-"
TMP_SUFFIX = ".tmp"
#: Longest file name most file systems accept, in bytes.
NAME_MAX = 255

PathLike = str | os.PathLike[str]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file (the same resolved path, or one inode through a link)."""
    return _same(Path(a), Path(b))


def inside(path: PathLike, folder: PathLike) -> bool:
    """Whether `path` lies somewhere below `folder` (both resolved, links followed)."""
    return _inside(Path(path), Path(folder))


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    folder = folder.resolve()
    return folder in path.resolve().parents


def check_output(path: PathLike, what: str = "output") -> Path:
    """Refuse an output path that cannot be written as a regular file; returns it as a Path."""
    raw = os.fspath(path)
    out = Path(raw)
    if not out.name or out.name in (".", "..") or raw.endswith(os.sep) \
            or (os.altsep is not None and raw.endswith(os.altsep)):
        raise EfrapError(f"{raw}: {what} must name a file, not a folder")
    # fsencode: a name that came from undecodable bytes (a non-UTF-8 locale) holds
    # surrogates, which plain str.encode() cannot encode.
    if len(os.fsencode(out.name)) > NAME_MAX:
        raise EfrapError(f"{out.name[:40]}...: {what} file name is longer than {NAME_MAX} bytes")
    folder = out.parent
    if not folder.is_dir():
        raise EfrapError(f"{out}: folder {folder} does not exist")
    if out.exists() or out.is_symlink():
        try:
            mode = out.stat().st_mode
        except OSError as exc:
            raise EfrapError(f"{out}: cannot use as {what} ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise EfrapError(f"{out}: {what} is {kind}; name a new or regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EfrapError(f"{out}: folder {folder} is not writable")
    return out


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """Refuse outputs that would destroy an input or each other (see the module docstring).

    Args:
        outputs: What each output is called on the command line (``-o``, ``--json``) ->
            its path, or None when not asked for.
        inputs: Every file or folder the command reads (None entries are ignored).

    Raises:
        EfrapError: the first clash, naming both paths.
    """
    sources = [Path(p) for p in inputs if p is not None]
    seen: dict[str, Path] = {}
    for option, raw in outputs.items():
        if raw is None:
            continue
        out = check_output(raw, option)
        for src in sources:
            if _same(out, src):
                raise EfrapError(f"{out}: {option} would overwrite the input {src}; choose another path")
            if src.is_dir() and _inside(out, src):
                raise EfrapError(f"{out}: {option} would write inside the input folder {src}")
        for other_option, other in seen.items():
            if _same(out, other):
                raise EfrapError(f"{out}: {option} and {other_option} name the same file")
        seen[option] = out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove temporary files that killed runs left in `folder`; returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"):
        pid_text = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue
    return removed


def atomic_write(path: PathLike, writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)`, then rename the temporary file to `path`.

    The temporary file lives in the output's folder under a short name (so a
    255-byte output name still fits); an existing output keeps its permission bits
    (and owner, where allowed).

    Raises:
        EfrapError: the path is not writable, or writing fails (disk full, read-only
            folder, ...); nothing is left behind.
    """
    out = check_output(path)
    folder = out.parent
    remove_stale_temporaries(folder)
    try:
        old = out.stat() if out.exists() else None
    except OSError:
        old = None
    if old is not None:
        mode = stat.S_IMODE(old.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        writer(str(tmp))
        os.chmod(tmp, mode)
        if old is not None and os.geteuid() == 0:
            os.chown(tmp, old.st_uid, old.st_gid)
        os.replace(tmp, out)
    except OSError as exc:
        raise EfrapError(f"{out}: cannot write ({exc.strerror or type(exc).__name__})") from None
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, _write)


def json_ready(value: object) -> object:
    """`value` with every non-finite float replaced by None ("not measurable").

    JSON has no NaN or Infinity; a report must stay valid JSON.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def json_text(data: object) -> str:
    """Stable JSON text (sorted keys, indented, non-finite numbers as null)."""
    return json.dumps(json_ready(data), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(data: object, path: PathLike) -> None:
    """Write JSON atomically, with sorted keys for stable bytes."""
    write_bytes(path, json_text(data).encode())


def write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 text atomically (a file name from undecodable bytes is written escaped)."""
    write_bytes(path, text.encode("utf-8", "backslashreplace"))


def check_output_folder(path: PathLike, what: str) -> Path:
    """Refuse an output folder that is a symbolic link or something other than a folder.

    Files written into a symlinked folder land wherever the link points, which the
    command line does not show; the real folder must be named.

    Raises:
        EfrapError: the path is a link, a file or another non-folder, or its parent is missing.
    """
    root = Path(path)
    if root.is_symlink():
        raise EfrapError(f"{root}: {what} is a symbolic link; name the folder it points to")
    if root.exists() and not root.is_dir():
        raise EfrapError(f"{root}: {what} must be a folder")
    if not root.parent.is_dir():
        raise EfrapError(f"{root}: folder {root.parent} does not exist")
    return root


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_work_folder(folder: PathLike, inputs: Iterable[PathLike | None], marker: str, what: str) -> Path:
    """Refuse a folder of this program's own work files (a resume checkpoint, the self-check's
    candidates) that is, holds or lies inside an input, or is something else.

    Args:
        folder: The folder (it need not exist).
        inputs: The run's inputs.
        marker: The file that marks a non-empty folder as this program's.
        what: What the folder is, for messages ("checkpoint").

    Raises:
        EfrapError: an input is the folder or lies inside it, the folder lies inside an
            input folder, or the path exists and is not such a folder.
    """
    path = Path(folder)
    for raw in inputs:
        if raw is None:
            continue
        src = Path(raw)
        if same_file(path, src) or inside(src, path):
            raise EfrapError(f"{path}: the {what} folder would hold the input {src}; choose another output")
        if src.is_dir() and inside(path, src):
            raise EfrapError(f"{path}: the {what} folder would be inside the input folder {src}")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise EfrapError(f"{path}: exists and is not a {what} folder; remove it or choose another output")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise EfrapError(f"{path}: a folder that is not a {what} of this program is in the way; remove it "
                         "or choose another output")
    return path
