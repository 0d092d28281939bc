"""Stage 1: materialise the datasets and pin their version.

In a DVC repo (``.dvc/`` + ``dvc.yaml``) the data comes from ``dvc repro prepare``, so DVC
decides whether anything changed and ``dvc.lock`` holds the md5 of each dataset: that md5
is the data version every MLflow run is tagged with. Outside a DVC repo (or when
``--set data.*`` overrides differ from params.yaml) the core prepares in-process and the
version is the manifest's content hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from tasks.common import stage_task
from transfer import stages
from transfer.config import Params, load_params
from transfer.data import dataset_version
from transfer.errors import TransferError

log = logging.getLogger(__name__)
DATASETS = ("source", "target")


def is_dvc_repo(root: str | Path = ".") -> bool:
    return (Path(root) / ".dvc").is_dir() and (Path(root) / "dvc.yaml").exists()


def dvc_executable() -> str:
    """The ``dvc`` beside the running interpreter (venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def _env_with_venv() -> dict[str, str]:
    # dvc runs stage commands through the shell: put this venv's `transfer` on its PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_dvc(*args: str, root: str | Path = ".") -> str:
    cmd = [dvc_executable(), *args]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=_env_with_venv())
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TransferError(f"`dvc {' '.join(args)}` failed: " + " | ".join(detail))
    return proc.stdout


def dvc_lock_versions(root: str | Path = ".") -> dict[str, str]:
    """md5 of each dataset output of the ``prepare`` stage, from ``dvc.lock``."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    outs = (
        (yaml.safe_load(lock.read_text()) or {})
        .get("stages", {})
        .get("prepare", {})
        .get("outs", [])
    )
    return {
        Path(o["path"]).name: o.get("md5", "") for o in outs if Path(o["path"]).name in DATASETS
    }


def _data_matches_params_file(params: Params, root: Path) -> bool:
    on_disk = load_params(root / "params.yaml")
    return (on_disk.data == params.data  # prepare also reads validate.min_per_class
            and on_disk.validate_.min_per_class == params.validate_.min_per_class)


def version_data(
    params: Params, *, root: str | Path = ".", progress: bool = False
) -> dict[str, Any]:
    """Prepare both datasets and return ``{dataset: {dir, version, dvc_md5}, 'dvc': bool}``."""
    root = Path(root)
    use_dvc = is_dvc_repo(root) and _data_matches_params_file(params, root)
    if is_dvc_repo(root) and not use_dvc:
        log.warning(
            "data.* overrides differ from params.yaml: preparing outside DVC (untracked data)"
        )
    with _prepare_lock(params):
        if use_dvc and not repro_unchanged(root):
            run_dvc("repro", "prepare", root=root)
            _record_repro_state(root)
        else:
            # The core reuses a dataset whose recipe (data params, fonts) is unchanged.
            stages.prepare(params, strict=False, progress=progress)
        md5 = dvc_lock_versions(root) if use_dvc else {}
        result: dict[str, Any] = {"dvc": use_dvc}
        for name, directory in stages.dataset_dirs(params).items():
            result[name] = {
                "dir": str(directory),
                "version": dataset_version(directory),
                "dvc_md5": md5.get(name),
            }
    return result


# ------------------------------------------------------------- "data unchanged" fast path
# `dvc repro prepare` on an unchanged workspace costs seconds (DVC's import, then a stat of
# every dataset file against its state database). The same question, answered the way
# DVC's state database does (a file whose size, mtime and inode are unchanged is taken as
# unchanged) plus the exact bytes of dvc.yaml, dvc.lock and params.yaml, costs a directory
# walk; any difference at all, or no record, runs `dvc repro` as before.
REPRO_STATE = Path(".dvc") / "tmp" / "transfer-prepare-state"


def repro_state(root: str | Path = ".") -> str:
    """A digest of everything `dvc repro prepare` decides from, as of now."""
    root = Path(root)
    digest = hashlib.sha256()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        path = root / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"(missing)") + b"\0")
    spec = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get("prepare", {})
    paths = [*spec.get("deps", []), *(next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", []))]
    for entry in sorted(map(str, paths)):
        digest.update(f"{entry}\0".encode())
        for line in _stat_lines(root / entry, root):
            digest.update(line.encode())
    return digest.hexdigest()


def _stat_lines(path: Path, root: Path) -> Iterator[str]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(Path(d) / f for d, _, names in os.walk(path) for f in names)
    else:
        yield "(missing)\n"
        return
    for file in files:
        stat = file.stat()
        yield f"{file.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ino}\n"


def repro_unchanged(root: str | Path = ".") -> bool:
    """True when nothing `dvc repro prepare` reads or writes changed since it last ran here."""
    record = Path(root) / REPRO_STATE
    return record.exists() and record.read_text() == repro_state(root)


def _record_repro_state(root: Path) -> None:
    record = root / REPRO_STATE
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(repro_state(root))
    tmp.replace(record)


def _prepare_lock(params: Params) -> FileLock:
    """One run at a time prepares and versions the data of a workspace: a second run waits
    (DVC would fail it with "is busy"), then finds the data prepared and goes on."""
    cache = Path(params.data.root) / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache / "prepare.lock"), timeout=3600)


@stage_task("version-data")
def version_data_task(params: Params) -> dict[str, Any]:
    return version_data(params)
