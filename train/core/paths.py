"""Where the repository is: relative paths in recipes, the bundled samples and the caches hang off it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
