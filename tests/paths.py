"""Where the checkout is: tests read the repository's own files (docs, infra, the demo model)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
