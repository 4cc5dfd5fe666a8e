"""Checks on a built site: links and anchors resolve, no asset comes from the network, no code cell ends with a
definition's bare header, the files match a fresh build, required pages exist."""

from __future__ import annotations

import ast
import filecmp
import posixpath
import re
import textwrap
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

# Tags whose URL attribute loads something into the page (as opposed to a link the reader may follow).
ASSET_ATTRIBUTES = {"link": "href", "script": "src", "img": "src", "iframe": "src", "source": "src",
                    "video": "src", "audio": "src", "embed": "src", "object": "data", "track": "src"}
_REMOTE = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)['"]?\s*\)|@import\s+['"]([^'"]+)['"]""")


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.links: list[str] = []
        self.assets: list[str] = []
        self.styles: list[str] = []
        self.description: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "meta" and values.get("name") == "description":
            self.description = values.get("content", "")
        if "id" in values:
            self.ids.append(values["id"])
        if tag == "a" and "name" in values:
            self.ids.append(values["name"])
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        attribute = ASSET_ATTRIBUTES.get(tag)
        if attribute and attribute in values:
            self.assets.append(values[attribute])
        if "style" in values:
            self.styles.append(values["style"])


def _parse(path: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def check_site(site: Path) -> list[str]:
    """Every problem found in the HTML and CSS files under `site`."""
    problems: list[str] = []
    pages = {path.relative_to(site).as_posix(): path for path in sorted(site.rglob("*.html"))
             if "_generator" not in path.relative_to(site).parts}
    parsed = {rel: _parse(path) for rel, path in pages.items()}
    for rel, page in parsed.items():
        if page.description is not None and not page.description.strip():
            problems.append(f"{rel}: empty meta description (give the source a `summary` in its front matter)")
        duplicates = sorted({i for i in page.ids if page.ids.count(i) > 1})
        if duplicates:
            problems.append(f"{rel}: duplicate ids {duplicates}")
        for url in page.assets:
            problems.extend(_check_url(site, rel, url, parsed, asset=True))
        for url in page.links:
            problems.extend(_check_url(site, rel, url, parsed, asset=False))
        for style in page.styles:
            problems.extend(_check_css_text(site, rel, style))
        text = pages[rel].read_text(encoding="utf-8")
        if "katex-error" in text:
            problems.append(f"{rel}: contains a KaTeX error")
        if "\ue000" in text:
            problems.append(f"{rel}: contains unrendered math")
        problems.extend(f"{rel}: {problem}" for problem in check_code_cells(text))
    for path in sorted(site.rglob("*.css")):
        rel = path.relative_to(site).as_posix()
        if "_generator" not in rel.split("/"):
            problems.extend(_check_css_text(site, rel, path.read_text(encoding="utf-8")))
    return problems


_CODE_CELL = re.compile(r'<section class="section[^"]*" id="([^"]*)">(?:(?!</section>).)*?<div class="code">(.*?)</div>'
                        r'</section>', re.S)
_DEFINITION = re.compile(r"^([ \t]*)(?:async[ \t]+def|def|class)\b")


def code_cells(html: str) -> list[tuple[str, list[str]]]:
    """The code column of a page: each section's anchor and code lines, in page order."""
    return [(anchor, unescape(re.sub(r"<[^>]+>", "", cell)).splitlines())
            for anchor, cell in _CODE_CELL.findall(html)]


def bare_header(lines: list[str]) -> tuple[str, int] | None:
    """`(first line, indent)` of the `def`/`class` header that ends `lines` with no body under it, if there is one
    (a header that spans lines counts: `lines` parse only with a body added)."""
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    starts = [number for number, line in enumerate(lines) if _DEFINITION.match(line)]
    if not starts:
        return None
    header = lines[starts[-1]:]
    indent = len(_DEFINITION.match(header[0]).group(1).expandtabs())
    text = textwrap.dedent("\n".join(header))
    if _parses(text) or not _parses(text + "\n    pass"):
        return None
    return header[0].strip(), indent


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def check_code_cells(html: str) -> list[str]:
    """A code cell that ends with a `def`/`class` header whose body is in no later cell (such as a body that is only
    the docstring, which moved to the notes) looks cut off: the generator shows `...` under it."""
    cells = code_cells(html)
    problems = []
    for number, (anchor, lines) in enumerate(cells):
        found = bare_header(lines)
        if found is None:
            continue
        header, indent = found
        after = next((line for _, later in cells[number + 1:] for line in later if line.strip()), None)
        if after is None or len(after) - len(after.lstrip()) <= indent:
            problems.append(f"#{anchor}: code ends with the bare header `{header}` and nothing under it")
    return problems


def _check_css_text(site: Path, rel: str, css: str) -> list[str]:
    problems = []
    for match in _CSS_URL.finditer(css):
        url = (match.group(1) or match.group(2)).strip()
        if url.startswith("data:"):
            continue
        problems.extend(_check_url(site, rel, url, {}, asset=True))
    return problems


def _check_url(site: Path, rel: str, url: str, parsed: dict[str, _PageParser], asset: bool) -> list[str]:
    if _REMOTE.match(url):
        if asset:
            return [f"{rel}: remote asset {url}"]
        return []
    path, _, fragment = url.partition("#")
    path = unquote(path.split("?", 1)[0])
    target = rel if not path else posixpath.normpath(posixpath.join(posixpath.dirname(rel), path))
    if target.startswith("../") or target == "..":
        return [f"{rel}: link {url} leaves the docs folder"]
    if path.endswith("/") or (site / target).is_dir():
        target = posixpath.join(target, "index.html")
    if not (site / target).is_file():
        return [f"{rel}: broken link {url} ({target} does not exist)"]
    if fragment and target.endswith(".html"):
        page = parsed.get(target) or _parse(site / target)
        if unquote(fragment) not in page.ids:
            return [f"{rel}: broken anchor {url} (no id {fragment!r} in {target})"]
    return []


def compare_trees(built: Path, committed: Path, ignore: set[str]) -> list[str]:
    """Files that differ between a fresh build and the committed docs (names under `ignore` are skipped)."""
    def files(root: Path) -> set[str]:
        return {path.relative_to(root).as_posix() for path in root.rglob("*")
                if path.is_file() and path.relative_to(root).parts[0] not in ignore}

    new, old = files(built), files(committed)
    problems = [f"missing page or file: {name} (rebuild the docs)" for name in sorted(new - old)]
    problems += [f"stale file: {name} is no longer generated (rebuild the docs)" for name in sorted(old - new)]
    problems += [f"stale: {name} differs from a fresh build (rebuild the docs)" for name in sorted(new & old)
                 if not filecmp.cmp(built / name, committed / name, shallow=False)]
    return problems


def check_required(site: Path, required: list[str]) -> list[str]:
    return [f"required page missing: {name}" for name in required if not (site / name).is_file()]
