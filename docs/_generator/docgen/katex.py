"""Render all math of a build with one call to node and the pinned KaTeX package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR_DIR = Path(__file__).resolve().parent.parent
KATEX_DIR = GENERATOR_DIR / "node_modules" / "katex"
INSTALL_HINT = "run `npm ci --prefix docs/_generator` (see docs/_generator/README.md)"


class KatexMissing(RuntimeError):
    """node or the pinned KaTeX package is not installed."""


@dataclass
class MathItem:
    tex: str
    display: bool
    where: str  # page (and section) for error messages


@dataclass
class MathBatch:
    """Expressions collected while pages are rendered; `placeholder` marks where each one's HTML goes."""

    items: list[MathItem] = field(default_factory=list)

    def add(self, tex: str, display: bool, where: str) -> str:
        self.items.append(MathItem(tex.strip(), display, where))
        return placeholder(len(self.items) - 1)


def placeholder(index: int) -> str:
    # Private-use characters: they cannot come from markdown rendering, which escapes nothing to them.
    return f"\ue000{index}\ue001"


_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def katex_available() -> str | None:
    """`None` when KaTeX can run, otherwise why not."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (KATEX_DIR / "package.json").exists():
        return f"KaTeX is not installed in {KATEX_DIR.parent}: {INSTALL_HINT}"
    return None


def katex_version() -> str:
    return json.loads((KATEX_DIR / "package.json").read_text(encoding="utf-8"))["version"]


@dataclass
class Rendered:
    html: list[str]
    errors: list[str]
    warnings: list[str]


def render_batch(batch: MathBatch) -> Rendered:
    """Render every expression of `batch` in one node process."""
    problem = katex_available()
    if problem:
        raise KatexMissing(problem)
    payload = json.dumps([{"tex": item.tex, "display": item.display} for item in batch.items])
    result = subprocess.run(["node", str(GENERATOR_DIR / "katex_render.js")], input=payload, capture_output=True,
                            text=True, encoding="utf-8", cwd=GENERATOR_DIR, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"KaTeX rendering failed:\n{result.stderr}")
    results = json.loads(result.stdout)["results"]
    errors, warnings = [], []
    for item, out in zip(batch.items, results):
        if "error" in out:
            errors.append(f"{item.where}: KaTeX error in ${item.tex}$: {out['error']}")
        warnings.extend(f"{item.where}: KaTeX warning in ${item.tex}$: {w}" for w in out["warnings"])
    return Rendered([out["html"] for out in results], errors, warnings)


def fill_placeholders(text: str, html: list[str]) -> str:
    """Put rendered math where its placeholders are."""
    return _PLACEHOLDER.sub(lambda match: html[int(match.group(1))], text)
