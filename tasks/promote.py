"""Stage 6: register the fine-tuned model and move the ``champion`` alias through gates.

Gates (all must hold): validation passed; test accuracy >= ``promote.accuracy_floor``;
better than the current champion on the same test images by >= ``promote.min_delta`` and
significantly (exact McNemar p < ``promote.alpha``; first model: floor only); with
``promote.require_beats_scratch``, significantly better than the scratch baseline. A rejected
version is tagged with the reason, quoting the paired difference, its 95% CI and p.

Atomicity: the version is fully logged and registered before any alias moves; aliases
move last, ``previous`` before ``champion``, so a crash at any point leaves ``champion``
on a complete, previously approved model. Concurrent promotions are serialised so two runs
never both compare against the same old champion: a file lock beside the store (one
machine) and, when a Prefect API is configured, a Prefect global concurrency limit of 1
held on the server (any number of machines).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.adapters import tracking
from tasks.common import stage_task
from transfer import stages, stats
from transfer.config import Params
from transfer.errors import TransferError

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass
class Gate:
    name: str
    passed: bool
    detail: str


LOCK_TIMEOUT_S = 600


def _file_lock(params: Params) -> FileLock:
    """Serialises promotions and rollbacks of one model on one local store (runs started
    from any directory). Against a tracking server it only covers runs on this machine."""
    folder = tracking.store_dir(tracking.tracking_uri(params))
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".promote-{params.model_name()}.lock"), timeout=LOCK_TIMEOUT_S)


def concurrency_limit_name(model_name: str) -> str:
    return f"promote-{model_name}"


def prefect_api_url() -> str | None:
    """The configured Prefect API, or None for the temporary local one (``transfer run``
    without ``PREFECT_API_URL``), which no other machine shares."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _ensure_limit(name: str) -> None:
    """A global concurrency limit of 1 slot, created on first use (idempotent)."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another machine created it meanwhile


@contextlib.contextmanager
def _lock(params: Params) -> Iterator[str]:
    """Held while a promotion or rollback reads and moves aliases; yields how it is held.

    The server-side slot is taken first, then the file lock (same order everywhere: no
    deadlock). The slot's lease expires if its holder dies, so a crash frees it."""
    with contextlib.ExitStack() as stack:
        held = "file lock"
        if prefect_api_url():
            from prefect.concurrency.sync import concurrency

            name = concurrency_limit_name(params.model_name())
            _ensure_limit(name)
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True))
            held = f"prefect concurrency limit {name} + file lock"
        stack.enter_context(_file_lock(params))
        yield held


def alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_report(
    params: Params, champion: Any, out_dir: Path
) -> tuple[dict[str, Any] | None, str]:
    """Re-score the champion on today's test holdout so the comparison is paired, like for like."""
    with tracking.downloaded(f"models:/{params.model_name()}/{champion.version}") as model_dir:
        try:
            report = stages.evaluate(params, model_dir, out_dir, name=f"champion_v{champion.version}", plots=False)
        except TransferError as error:  # different class set: cannot compare on this test set
            return None, str(error)
    return report, f"champion v{champion.version} scores {report['accuracy']:.4f} on this test set"


def decide(
    params: Params,
    challenger: dict[str, Any],
    validation_passed: bool,
    gain: dict[str, Any] | None,
    versus_champion: stats.PairedComparison | None,
    champion_note: str,
) -> list[Gate]:
    """The promotion gates. Every comparison is paired on the test holdout: the challenger
    must be better by >= min_delta *and* significantly (exact McNemar p < alpha)."""
    p = params.promote
    accuracy = challenger["accuracy"]
    low, high = challenger["accuracy_ci"]
    gates = [
        Gate("validation", validation_passed,
             "data validation passed" if validation_passed else "data validation failed"),
        Gate("accuracy_floor", accuracy >= p.accuracy_floor,
             f"test accuracy {accuracy:.4f} (95% CI [{low:.3f}, {high:.3f}]) vs floor {p.accuracy_floor}"),
    ]
    if versus_champion is not None:
        better = versus_champion.better(p.alpha, p.min_delta)
        verdict = "beats champion" if better else "kept champion"
        gates.append(Gate("beats_champion", better,
                          f"{verdict}: {versus_champion.describe()} (needs >= {p.min_delta:+.3f}, p < {p.alpha})"))
    else:
        gates.append(Gate("beats_champion", True, f"no comparable champion ({champion_note or 'first model'})"))
    if p.require_beats_scratch and gain is not None:
        gates.append(Gate("beats_scratch", gain["significant"],
                          f"vs scratch: {gain['described']} ({gain['verdict']})"))
    return gates


def _register(params: Params, tuned: dict[str, Any], tags: dict[str, Any]) -> Any:
    from tasks.adapters.pyfunc_model import log_pyfunc_model

    info = log_pyfunc_model(
        tuned["model_dir"], name="model", registered_model_name=params.model_name(),
        run_id=tuned["run_id"], max_batch=params.serve.max_batch, max_image_bytes=params.serve.max_image_bytes,
    )
    client = MlflowClient()
    version = client.get_model_version(
        params.model_name(), str(info.registered_model_version)
    )
    for key, value in tracking.flatten("", tags).items():
        if value is not None:
            client.set_model_version_tag(version.name, version.version, key, str(value))
    return version


def promote_model(
    params: Params,
    data: dict[str, Any],
    source: dict[str, Any],
    tuned: dict[str, Any],
    evaluation: dict[str, Any],
    validation_passed: bool,
    parent_run_id: str,
) -> dict[str, Any]:
    client = tracking.configure(params)
    name = params.model_name()
    challenger = evaluation["transfer"]
    accuracy = challenger["accuracy"]
    scratch_acc = evaluation.get("scratch", {}).get("accuracy")
    gain = evaluation.get("gain")
    tags = {
        "test_accuracy": accuracy,
        "test_accuracy_ci": "[{:.4f}, {:.4f}]".format(*challenger["accuracy_ci"]),
        "scratch_accuracy": scratch_acc,
        "transfer_gain": gain["described"] if gain else None,
        "seed": tuned.get("seed"),
        "temperature": challenger.get("temperature"),
        "strategy": tuned["strategy"],
        "data.source.version": data["source"]["version"],
        "data.target.version": data["target"]["version"],
        "data.source.dvc_md5": data["source"].get("dvc_md5"),
        "data.target.dvc_md5": data["target"].get("dvc_md5"),
        "source_weights_sha256": source.get("weights_sha256"),
        "source_origin": source.get("origin"),
        "git_commit": tracking.git_commit(),
        "pipeline_run_id": parent_run_id,
    }
    with _lock(params) as held:
        version = _register(params, tuned, tags)
        champion = alias_version(client, name, CHAMPION)
        champ_report, note, versus = None, "", None
        if champion is not None:
            champ_report, note = champion_report(params, champion, Path(evaluation["out_dir"]))
        if champ_report is not None:
            versus = stats.compare_paired(challenger["correct"], champ_report["correct"])
        gates = decide(params, challenger, validation_passed, gain, versus, note)
        promoted = all(g.passed for g in gates)
        if promoted:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS, champion.version)
            client.set_registered_model_alias(name, CHAMPION, version.version)
            client.set_model_version_tag(name, version.version, "promoted", "true")
        else:
            reason = "; ".join(g.detail for g in gates if not g.passed)
            client.set_model_version_tag(name, version.version, "rejected", reason)
    decision = {
        "model_name": name,
        "version": version.version,
        "promoted": promoted,
        "reason": "all gates passed" if promoted else reason,
        "previous_champion": champion.version if champion is not None else None,
        "champion_accuracy": champ_report["accuracy"] if champ_report else None,
        "versus_champion": versus.to_json() if versus else None,
        "gates": [asdict(g) for g in gates],
        "serialised_by": held,
    }
    tracking.log_json(client, parent_run_id, decision, "promotion/decision.json")
    tracking.set_tags(
        client, parent_run_id, {"promoted": promoted, "model_version": version.version}
    )
    return decision


def rollback(params: Params) -> dict[str, Any]:
    """Swap ``champion`` and ``previous`` (the last promotion undone, or redone)."""
    client = tracking.configure(params)
    name = params.model_name()
    with _lock(params):
        champion, previous = (
            alias_version(client, name, CHAMPION),
            alias_version(client, name, PREVIOUS),
        )
        if previous is None:
            raise TransferError(f"model {name!r} has no '{PREVIOUS}' version to roll back to")
        client.set_registered_model_alias(name, CHAMPION, previous.version)
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
    return {
        "model_name": name,
        "champion": previous.version,
        "previous": champion.version if champion else None,
    }


promote_task = stage_task("promote")(promote_model)
