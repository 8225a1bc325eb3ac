"""The repo's own import graph and line counts, read from the source with `ast` (nothing is imported).

`python -m tests.import_graph [--repo CHECKOUT]` prints both for this tree or another checkout (to compare two
commits); tests/test_architecture.py pins the layering rules on the same graph.
"""

import argparse
import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("clip_core", "pipelines", "infra")


def module_name(path: Path, repo: Path = REPO) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(repo: Path = REPO) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (repo / package).rglob("*.py"))


def imported_names(path: Path, repo: Path = REPO) -> set[str]:
    """Every dotted name the file imports, absolute, including imports inside functions: `import a.b` gives
    a.b, `from a import b` gives a.b (a module or a name in a; `graph` tells the two apart)."""
    name = module_name(path, repo)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@functools.cache
def graph(repo: Path = REPO) -> dict[str, set[str]]:
    """Module -> the repo's own modules it imports (external ones left out). `from a import b` counts as
    importing the module a.b when there is one, else the module a. Read once per process: do not change it."""
    files = source_files(repo)
    ours = {module_name(p, repo) for p in files}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in ours:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    result = {}
    for path in files:
        module = module_name(path, repo)
        targets = {resolve(n) for n in imported_names(path, repo)}
        result[module] = {t for t in targets if t and t != module}
    return result


@functools.cache
def external_imports() -> dict[str, set[str]]:
    """Module -> top-level names of the third-party and standard-library modules it imports."""
    return {
        module_name(p): {n.split(".")[0] for n in imported_names(p) if n.split(".")[0] not in PACKAGES}
        for p in source_files()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Line counts and import graph of a checkout of this repository."
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to read (default: this one)")
    repo = parser.parse_args().repo.resolve()
    print("# lines per file")
    for path in source_files(repo):
        print(f"{len(path.read_text().splitlines()):6d}  {path.relative_to(repo)}")
    print("\n# imports between the repo's modules")
    for module, targets in sorted(graph(repo).items()):
        if targets:
            print(f"{module} -> {', '.join(sorted(targets))}")


if __name__ == "__main__":
    main()
