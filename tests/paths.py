"""Where the repository's folders are, for tests at any depth of tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
BROWSER_ARTIFACTS = REPO / "test-artifacts" / "browser"
