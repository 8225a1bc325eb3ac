"""One pass of the scheduled evaluation: find the checkpoints the suite has not evaluated (complete training
checkpoints and registered model versions), claim each atomically, evaluate it, register it as a version of
the champion model tagged with its metrics, and point the champion alias at the best by the ranking metric.

Claims (see claims.py) live under `{claims}/{suite key}/` and are also the results: a record is `running`
(with its owner and a heartbeat), `done` (metrics, eval run, model version) or `failed` (error, attempts).
- A crashed scheduler's claim is STALE once its heartbeat is older than `claim_timeout_s`; the next pass takes
  it over with a conditional replace, so exactly one taker wins.
- An evaluation that raises RELEASES its claim at once: the record turns `failed` and a later pass retries it,
  up to `max_attempts` evaluations in all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.entrypoint import JobError
from pipelines.formats import checkpoints
from pipelines.scheduled_eval import claims
from pipelines.scheduled_eval.config import ScheduledEvalConfig

SUITE_TAG = "clip_ray.suite"


@dataclass(frozen=True)
class Candidate:
    """A checkpoint to evaluate. `checkpoint_uri` is its identity (claims, tags); `source` is where the
    weights are read from (the same, except for registry versions whose artifacts must be downloaded)."""

    checkpoint_uri: str
    source: str
    model: str | None = None
    training_run_id: str | None = None
    step: int | None = None
    version: tuple[str, str] | None = None  # (registered model, version) when found in the registry


@dataclass
class PassReport:
    suite_key: str
    found: int = 0
    evaluated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # claimed by another scheduler right now
    given_up: list[str] = field(default_factory=list)  # failed max_attempts times
    champion: dict | None = None  # {"version", "checkpoint_uri", "value", "moved"}

    def __str__(self) -> str:
        return (
            f"[scheduled-eval] pass done: {self.found} checkpoints found, {len(self.evaluated)} evaluated, "
            f"{len(self.failed)} failed, {len(self.busy)} busy elsewhere, {len(self.given_up)} given up"
        )


def suite_key(suite_uri: str, suite) -> str:
    """Names a suite by its file stem and the hash of what it evaluates, so that editing the datasets makes
    every checkpoint due again while batch sizes and worker counts do not."""
    stem = suite_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".yaml").removesuffix(".yml")
    dump = suite.model_dump(mode="json")
    evaluated = {k: dump[k] for k in ("datasets", "recall_k", "linear_probe") if k in dump} or dump
    digest = hashlib.sha256(json.dumps(evaluated, sort_keys=True).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{digest}"


def record_uri(config: ScheduledEvalConfig, key: str, checkpoint_uri: str) -> str:
    """One record per (suite, checkpoint): a readable tail of the URI plus a hash of all of it."""
    tail = "_".join(checkpoint_uri.rstrip("/").split("/")[-3:])
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", tail)[-80:]
    digest = hashlib.sha256(checkpoint_uri.encode()).hexdigest()[:16]
    return storage.join(config.claims, key, f"{tail}-{digest}.json")


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints


def training_checkpoints(output_uri: str) -> list[Candidate]:
    """Complete checkpoints of one training output: folders whose checkpoint.json (written last) exists."""
    folders = checkpoints.complete_folders(checkpoints.checkpoints_uri(output_uri))
    return [Candidate(folder, folder, step=step) for step, folder in folders.items()]


def registered_versions(client, names: list[str]) -> list[Candidate]:
    """Every version of the named registered models. A version that names the checkpoint it was made from
    (tag checkpoint_uri) is that checkpoint, so a checkpoint found both ways is evaluated once."""
    found = []
    for name in names:
        for version in _search_versions(client, f"name='{name}'"):
            model = version.tags.get("model")
            if not model and version.run_id:
                try:
                    model = client.get_run(version.run_id).data.params.get("model")
                except Exception:  # the run may be deleted; the config's model still applies
                    model = None
            found.append(
                Candidate(
                    checkpoint_uri=checkpoints.folder_of(
                        version.tags.get("checkpoint_uri") or version.source
                    ),
                    source=version.source,
                    model=model,
                    training_run_id=version.tags.get("training_run_id") or None,
                    step=int(version.tags["step"]) if version.tags.get("step", "").isdigit() else None,
                    version=(name, str(version.version)),
                )
            )
    return found


def _search_versions(client, filter_string: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(filter_string, max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _is_not_found(error: Exception) -> bool:
    return getattr(error, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


# ---------------------------------------------------------------------------------------------------------
# The pass


def run(config: ScheduledEvalConfig) -> PassReport:
    """One pass (a JobError when an evaluation in it failed), or with config.watch a pass every config.watch
    seconds until interrupted, the config read again before each."""
    if config.watch is None:
        report = run_pass(config)
        if report.failed:
            raise JobError(
                f"{len(report.failed)} of the {report.found} checkpoints failed to evaluate "
                f"({', '.join(report.failed)}); their errors are above, and a later pass retries them."
            )
        return report
    passes = 0
    while True:
        try:
            # Read again before every pass but the first, so that a watcher follows edits to the config.
            config = config.reload() if passes else config
            run_pass(config)
        except ConfigError:
            raise
        except Exception:
            # A watcher outlives a store or tracking server that is briefly down.
            traceback.print_exc()
            print(
                f"[scheduled-eval] pass failed; next pass in {config.watch:g}s", file=sys.stderr, flush=True
            )
        passes += 1
        time.sleep(config.watch)


def run_pass(config: ScheduledEvalConfig) -> PassReport:
    """Evaluate every due checkpoint once and move the champion alias; safe to run in many places at once."""
    from mlflow import MlflowClient

    from pipelines.evaluate import load_suite
    from pipelines.tracking import use_tracking_server

    suite = load_suite(config.suite)
    check_metric(config, suite)
    key = suite_key(config.suite, suite)
    claims.check_conditional_writes(config.claims)
    use_tracking_server()  # credentials of the tracking URI into the environment, out of the job's log
    client = MlflowClient()
    _ensure_registered_model(client, config.champion_model)

    candidates: dict[str, Candidate] = {}
    for output in config.training_outputs:
        for candidate in training_checkpoints(output):
            candidates.setdefault(candidate.checkpoint_uri, candidate)
    for candidate in registered_versions(client, [config.champion_model, *config.registered_models]):
        known = candidates.get(candidate.checkpoint_uri)
        if known is None:
            candidates[candidate.checkpoint_uri] = candidate
        elif known.version is None and candidate.version[0] == config.champion_model:
            # The trainer registered this checkpoint already: tag that version rather than add another.
            candidates[candidate.checkpoint_uri] = dataclasses.replace(known, version=candidate.version)
    report = PassReport(key, found=len(candidates))
    print(f"[scheduled-eval] suite {key}: {len(candidates)} checkpoints found", flush=True)

    for candidate in sorted(candidates.values(), key=lambda c: (c.step is None, c.step, c.checkpoint_uri)):
        uri = record_uri(config, key, candidate.checkpoint_uri)
        held = _claim(config, uri, candidate, key, report)
        if held is not None:
            _evaluate_claimed(config, client, suite, key, candidate, uri, *held, report)

    if not (report.evaluated or report.failed):
        others = [f"{len(report.busy)} being evaluated elsewhere"] if report.busy else []
        others += (
            [f"{len(report.given_up)} given up after {config.max_attempts} failures"]
            if report.given_up
            else []
        )
        print(
            f"[scheduled-eval] nothing to do: the {report.found} checkpoints found are evaluated by suite {key}"
            + (f" ({', '.join(others)})" if others else ""),
            flush=True,
        )
    report.champion = update_champion(config, client, key)
    return report


def check_metric(config: ScheduledEvalConfig, suite) -> None:
    """A ranking metric the suite never produces would leave the alias where it is forever: refuse it."""
    family, _, rest = config.metric.partition("/")
    dataset, _, name = rest.partition("/")
    names = [d.name for d in suite.datasets]
    if family not in ("zeroshot", "linearprobe") or dataset not in names or not name:
        raise ConfigError(
            f"metric {config.metric!r} is not one the suite {config.suite} produces; use "
            f"zeroshot/<dataset>/<metric> or linearprobe/<dataset>/<metric> with a dataset of {names}, "
            f"e.g. zeroshot/{names[0]}/acc1."
        )


def _claim(config, uri: str, candidate: Candidate, key: str, report: PassReport) -> tuple | None:
    """(record, version) of a claim this process now holds, or None when the checkpoint is not ours to do."""
    now = time.time()
    fresh = {
        "checkpoint_uri": candidate.checkpoint_uri,
        "suite": key,
        "state": "running",
        "owner": claims.owner_id(),
        "claimed_at": now,
        "heartbeat_at": now,
        "attempts": 1,
    }
    current = claims.read(uri)
    if current is None:
        version = claims.create(uri, fresh)
        if version is None:
            report.busy.append(candidate.checkpoint_uri)
            return None
        return fresh, version

    record, version = current
    if record["state"] == "done":
        return None
    if record["state"] == "running" and now - record.get("heartbeat_at", 0) < config.claim_timeout_s:
        report.busy.append(candidate.checkpoint_uri)
        return None
    if record["state"] == "failed" and record.get("attempts", 0) >= config.max_attempts:
        report.given_up.append(candidate.checkpoint_uri)
        return None
    # A failed record is retried; a running one whose owner stopped beating is taken over.
    if record["state"] == "running":
        print(
            f"[scheduled-eval] taking over the stale claim of {record.get('owner')} on {candidate.checkpoint_uri}",
            flush=True,
        )
    taken = {**fresh, "attempts": record.get("attempts", 0) + 1, "previous_error": record.get("error")}
    new_version = claims.replace(uri, taken, version)
    if new_version is None:
        report.busy.append(candidate.checkpoint_uri)
        return None
    return taken, new_version


def _evaluate_claimed(
    config, client, suite, key, candidate: Candidate, uri: str, record: dict, version: str, report
) -> None:
    print(
        f"[scheduled-eval] evaluating {candidate.checkpoint_uri} (attempt {record['attempts']})", flush=True
    )
    heartbeat = claims.Heartbeat(uri, record, version, every_s=config.claim_timeout_s / 4)
    try:
        with heartbeat:
            evaluation = _evaluate(config, suite, candidate)
            registered = _register(config, client, key, candidate, evaluation)
        result = {
            **heartbeat.record,
            "state": "done",
            "metrics": {k: v for k, v in evaluation.metrics.items() if math.isfinite(v)},
            "eval_run_id": evaluation.run_id,
            "model_version": registered,
            "finished_at": time.time(),
        }
        report.evaluated.append(candidate.checkpoint_uri)
        value = result["metrics"].get(config.metric)
        print(
            f"[scheduled-eval] evaluated {candidate.checkpoint_uri}: {config.metric} = {value} "
            f"(version {registered} of {config.champion_model}, eval run {evaluation.run_id})",
            flush=True,
        )
    except Exception as e:
        # Released at once: a failed record is retried by a later pass until max_attempts.
        message = f"{type(e).__name__}: {e}"
        print(f"[scheduled-eval] evaluation of {candidate.checkpoint_uri} failed: {message}", flush=True)
        traceback.print_exc()
        result = {**heartbeat.record, "state": "failed", "error": message[:2000], "finished_at": time.time()}
        report.failed.append(candidate.checkpoint_uri)
    if heartbeat.lost or claims.replace(uri, result, heartbeat.version) is None:
        print(
            f"[scheduled-eval] warning: the claim on {candidate.checkpoint_uri} was taken over meanwhile",
            flush=True,
        )


def _evaluate(config: ScheduledEvalConfig, suite, candidate: Candidate):
    from pipelines import evaluate

    with tempfile.TemporaryDirectory(prefix="scheduled-eval-") as scratch:
        source = _local_copy_if_needed(candidate.source, scratch)
        info = checkpoints.read_info(source) or {}
        model = config.model or candidate.model or info.get("model")
        if not model:
            raise ValueError(
                f"no architecture is known for {candidate.checkpoint_uri}; set `model` in the scheduled-eval config."
            )
        return evaluate.run(
            evaluate.EvaluateConfig(
                checkpoint=source,
                model=model,
                suite=suite,
                experiment=config.experiment,
                training_run_id=candidate.training_run_id or info.get("mlflow_run_id") or None,
                step=candidate.step if candidate.step is not None else info.get("step"),
            )
        )


def _local_copy_if_needed(source: str, scratch: str) -> str:
    """Registry sources such as runs:/, models:/ or mlflow-artifacts:/ are downloaded; storage URIs are not."""
    if storage.is_s3(source) or "://" not in source and ":/" not in source:
        return source
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch)


# ---------------------------------------------------------------------------------------------------------
# Registry


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except Exception as e:
        if not _is_not_found(e):
            raise
        try:
            client.create_registered_model(
                name, description="CLIP checkpoints evaluated by the scheduled evaluation; alias = best."
            )
        except Exception as race:  # another scheduler created it first
            if getattr(race, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise


def _register(config: ScheduledEvalConfig, client, key: str, candidate: Candidate, evaluation) -> str:
    """The champion model's version for this checkpoint, created when there is none, tagged with the metrics.
    Runs while the claim is held, so each checkpoint gets one version however many schedulers run."""
    tags = {
        "checkpoint_uri": candidate.checkpoint_uri,
        SUITE_TAG: key,
        **{k: str(v) for k, v in evaluation.metrics.items() if math.isfinite(v)},
    }
    if evaluation.parent_run_id:
        tags["training_run_id"] = evaluation.parent_run_id
    if evaluation.step is not None:
        tags["step"] = str(evaluation.step)
    if candidate.version and candidate.version[0] == config.champion_model:
        version = candidate.version[1]
        for name, value in tags.items():
            client.set_model_version_tag(config.champion_model, version, name, value)
    else:
        source, run_id = _registrable_source(client, candidate, evaluation)
        created = client.create_model_version(config.champion_model, source=source, run_id=run_id, tags=tags)
        version = str(created.version)
    return version


def _registrable_source(client, candidate: Candidate, evaluation) -> tuple[str, str | None]:
    """MLflow takes remote sources as they are; a local checkpoint is first logged into the evaluation run
    (the registry refuses local paths outside a run's artifacts)."""
    run_id = evaluation.parent_run_id or evaluation.run_id
    if candidate.version or storage.is_s3(candidate.source):
        return candidate.source, run_id
    if not evaluation.run_id:
        raise ValueError(f"cannot register local checkpoint {candidate.source} without an evaluation run")
    for entry in storage.list_files(candidate.source) or [storage.FileEntry(candidate.source, 0)]:
        if (
            entry.uri.endswith((checkpoints.MARKER_FILE, checkpoints.MODEL_FILE))
            or entry.uri == candidate.source
        ):
            client.log_artifact(evaluation.run_id, entry.uri, "checkpoint")
    return f"{client.get_run(evaluation.run_id).info.artifact_uri}/checkpoint", evaluation.run_id


def update_champion(config: ScheduledEvalConfig, client, key: str) -> dict | None:
    """Point the alias at the best evaluated checkpoint of this suite. Every pass recomputes it from all
    records, so a pass that raced another and set a stale answer is corrected by the next one."""
    scored = []
    for uri in claims.list_records(storage.join(config.claims, key)):
        held = claims.read(uri)
        if held and held[0].get("state") == "done" and config.metric in held[0].get("metrics", {}):
            scored.append(held[0])
    if not scored:
        print(
            f"[scheduled-eval] no evaluated checkpoint has {config.metric} yet; the alias stays where it is"
        )
        return None
    sign = 1 if config.mode == "max" else -1
    # Ties go to the earlier evaluation, so the alias does not flap between equals.
    best = max(scored, key=lambda r: (sign * r["metrics"][config.metric], -r.get("finished_at", 0)))
    value = best["metrics"][config.metric]

    try:
        current = str(client.get_model_version_by_alias(config.champion_model, config.alias).version)
    except Exception as e:
        if not _is_not_found(e):
            raise
        current = None
    current_value = next(
        (r["metrics"][config.metric] for r in scored if str(r.get("model_version")) == current), None
    )
    moved = current != str(best["model_version"]) and (
        current_value is None or sign * value > sign * current_value
    )
    if moved:
        client.set_registered_model_alias(config.champion_model, config.alias, best["model_version"])
    # Not moved: the current champion is the best, or ties with it.
    champion = best if moved else next(r for r in scored if str(r.get("model_version")) == current)
    print(
        f"[scheduled-eval] {config.alias}: {config.champion_model} version {champion['model_version']} "
        f"({champion['checkpoint_uri']}), {config.metric} = {champion['metrics'][config.metric]}"
        + ((f", moved from version {current}" if current else ", set") if moved else ", unchanged"),
        flush=True,
    )
    return {
        "version": str(champion["model_version"]),
        "checkpoint_uri": champion["checkpoint_uri"],
        "value": champion["metrics"][config.metric],
        "moved": moved,
    }
