"""The layering the code keeps, checked on its import graph (tests/import_graph.py reads it from the source):
clip_core is plain PyTorch, shared plumbing imports no job, and no job reaches into another job's modules."""

import pytest

from tests.import_graph import external_imports, graph

JOBS = ("ingest", "train", "evaluate", "scheduled_eval", "demo")
SERVICE_CLIENTS = {"ray", "mlflow", "boto3", "botocore", "s3fs", "aiobotocore"}


def job_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in JOBS else None


def edges() -> list[tuple[str, str]]:
    return [(module, target) for module, targets in sorted(graph().items()) for target in sorted(targets)]


def test_the_graph_sees_the_modules_and_their_imports():
    imports = graph()
    assert {"clip_core.model", "pipelines.storage", "pipelines.ingest.job", "infra.local"} <= set(imports)
    assert "pipelines.storage" in imports["pipelines.ingest.job"]


def test_clip_core_imports_only_itself_and_no_service_client():
    external = external_imports()
    for module, targets in graph().items():
        if module.startswith("clip_core"):
            assert all(t.startswith("clip_core") for t in targets), (module, targets)
            assert not external[module] & SERVICE_CLIENTS, module


def test_shared_plumbing_and_infra_import_no_job():
    for module, target in edges():
        if job_of(module) is None and not module.startswith("clip_core"):
            assert job_of(target) is None, f"{module} imports the job module {target}"


@pytest.mark.parametrize("job", JOBS)
def test_a_job_uses_another_job_only_through_its_package(job):
    """A job may call another job's public API (`pipelines.evaluate`), never its internal modules."""
    for module, target in edges():
        other = job_of(target)
        if job_of(module) == job and other not in (None, job):
            assert target == f"pipelines.{other}", f"{module} reaches into {target}"


def test_modules_import_each_other_without_cycles():
    imports = graph()
    finished: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join((*path[path.index(module) :], module)))
        if module not in finished:
            for target in sorted(imports.get(module, ())):
                visit(target, (*path, module))
            finished.add(module)

    for module in sorted(imports):
        visit(module, ())
