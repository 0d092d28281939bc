"""The code fingerprint: which version of ``transfer/`` produced a cached output.

Every keyed stage output (source model, fine-tune and scratch dirs, feature and tensor
caches, training checkpoints) is keyed on its params and data *and* on this fingerprint,
so after an edit to ``transfer/`` a rerun trains again instead of handing back a model the
old code made. It is the package version plus a SHA-256 over the sorted relative paths
and bytes of every ``.py`` file under ``transfer/`` (or one subpackage of it), computed
once per process. Any edit counts, comments included: retraining on a harmless edit is
cheap next to reusing a model that no longer matches the code.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
DISTRIBUTION = "transfer-pipeline"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def source_digest(root: Path) -> str:
    """SHA-256 over (relative path, bytes) of every ``*.py`` under ``root``, in path order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def code_fingerprint(subpackage: str | None = None) -> str:
    """16 hex digits naming the code of ``transfer/`` (or ``transfer/<subpackage>/``)."""
    root = PACKAGE_ROOT / subpackage if subpackage else PACKAGE_ROOT
    blob = f"{package_version()}\n{source_digest(root)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]
