"""Generator configuration: read `config.yaml`, resolve its paths, find the repository URL."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Config:
    """Everything a build needs to know besides the sources themselves."""

    root: Path
    package: str
    output: Path
    translations: Path
    repository_url: str
    branch: str = "main"
    site_title: str = "labml_nn"
    colab: dict[str, str] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)
    required_pages: list[str] = field(default_factory=list)
    avoid_terms: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def source_dir(self) -> Path:
        return self.root / self.package

    def source_url(self, rel_path: str) -> str:
        """URL of a source file (`rel_path` is relative to the package folder) on the repository's web page."""
        return f"{self.repository_url}/blob/{self.branch}/{self.package}/{rel_path}"

    def colab_url(self, page_dir: str) -> str | None:
        """The Colab link for pages in `page_dir` (relative to the package), or `None` if they get no badge."""
        for prefix, notebook in sorted(self.colab.items()):
            if page_dir == prefix or page_dir.startswith(prefix + "/"):
                path = self.repository_url.split("://", 1)[-1].split("/", 1)[-1]
                return f"https://colab.research.google.com/github/{path}/blob/{self.branch}/{notebook}"
        return None


def setup_py_url(setup_py: Path) -> str | None:
    """The literal `url=` keyword of the `setup(...)` call in `setup_py`, if there is one."""
    if not setup_py.exists():
        return None
    tree = ast.parse(setup_py.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "url" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value).rstrip("/")
    return None


def load_config(path: Path, **overrides: str | None) -> Config:
    """Read the YAML configuration at `path`; keyword arguments that are not `None` replace its paths."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    root = (path.parent / data.get("root", ".")).resolve()
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    url = setup_py_url(root / "setup.py") or str(data["repository_url"]).rstrip("/")
    return Config(
        root=root,
        package=data["package"],
        output=(root / data["output"]).resolve(),
        translations=(root / data["translations"]).resolve(),
        repository_url=url,
        branch=data.get("branch", "main"),
        site_title=data.get("site_title", data["package"]),
        colab=dict(data.get("colab") or {}),
        languages=dict(data.get("languages") or {}),
        required_pages=list(data.get("required_pages") or []),
        avoid_terms={lang: dict(terms) for lang, terms in (data.get("avoid_terms") or {}).items()},
    )
