"""HTML for one page: breadcrumbs, links, and the note/code rows."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from string import Template

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from .source import Document

TEMPLATE = Template((Path(__file__).resolve().parent.parent / "templates" / "page.html").read_text(encoding="utf-8"))
PYGMENTS_STYLE = "friendly"

# Words of the page frame, per language.
LABELS = {
    "en": {"home": "home", "crumbs": "Breadcrumbs", "source": "View source", "contents": "Contents",
           "in_folder": "In this folder", "section": "Link to this section", "colab": "Open in Colab",
           "generated": "Generated from", "language": "English", "switch": "Read in",
           "pager": "Previous and next page", "previous": "Previous", "next": "Next", "english_only": "(English)"},
    "ko": {"home": "홈", "crumbs": "위치", "source": "소스 코드 보기", "contents": "목차",
           "in_folder": "이 폴더의 페이지", "section": "이 구역으로 가는 링크", "colab": "Colab에서 열기",
           "generated": "원본 소스:", "language": "한국어", "switch": "다른 언어:",
           "pager": "이전 페이지와 다음 페이지", "previous": "이전", "next": "다음", "english_only": "(English)"},
}


def labels(lang: str) -> dict[str, str]:
    return LABELS.get(lang, LABELS["en"])


@dataclass
class Page:
    """A page to write: where it comes from and where it goes (paths use `/`)."""

    source: str  # relative to the package, e.g. `transformers/feedback/__init__.py`
    out: str  # relative to the output folder, e.g. `ko/transformers/feedback/index.html`
    doc: Document
    lang: str = "en"

    @property
    def base(self) -> str:
        """The English page's output path: links in notes are written relative to it."""
        return self.out.split("/", 1)[1] if self.lang != "en" else self.out

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.source)

    @property
    def title(self) -> str:
        if self.doc.front_matter.get("title"):
            return str(self.doc.front_matter["title"])
        if self.doc.language == "markdown" and self.doc.sections:
            heading = re.match(r"#+\s+(.+)", self.doc.sections[0].note)
            if heading:
                # The heading's text, without the target of a link around it.
                return re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).strip()
        return default_title(self.source)

    @property
    def summary(self) -> str:
        return str(self.doc.front_matter.get("summary") or "")


def default_title(source: str) -> str:
    name = posixpath.basename(source)
    if name == "__init__.py":
        return posixpath.basename(posixpath.dirname(source)) or "Home"
    return name.rsplit(".", 1)[0]


def output_path(source: str) -> str:
    """Where the English page of a source file goes: `__init__.py` is its folder's `index.html`."""
    folder, name = posixpath.split(source)
    stem = "index" if name == "__init__.py" else name.rsplit(".", 1)[0]
    if name.lower().endswith(".md"):
        stem = stem.lower()
    return posixpath.join(folder, stem + ".html")


def relative(target: str, page_out: str) -> str:
    """The href from the page at `page_out` to the output file `target`."""
    return posixpath.relpath(target, posixpath.dirname(page_out) or ".")


def highlight_code(lines: list[str]) -> str:
    if not lines:
        return ""
    code = highlight("\n".join(lines), PythonLexer(stripnl=False), HtmlFormatter(nowrap=True))
    return f'<pre class="highlight"><code>{code.rstrip()}</code></pre>'


def pygments_css() -> str:
    return HtmlFormatter(style=PYGMENTS_STYLE).get_style_defs(".highlight") + "\n"


@dataclass
class Row:
    """A rendered section: `note_html` may still hold math placeholders."""

    anchor: str
    names: list[str]
    note_html: str
    code: list[str]
    note_lang: str | None = None  # set when the note is not in the page's language
    wide: bool = False  # a note across the whole width (contents)


def render_rows(rows: list[Row], lang: str, prose: bool) -> str:
    out = []
    used = {row.anchor for row in rows}
    for row in rows:
        # A name defined twice (a property and its setter) keeps its first section.
        fresh = [name for name in row.names if name not in used]
        used.update(fresh)
        names = "".join(f'<span class="name-anchor" id="{escape(name)}"></span>' for name in fresh)
        note_lang = f' lang="{row.note_lang}"' if row.note_lang else ""
        link = f'<a class="section-link" href="#{row.anchor}" title="{labels(lang)["section"]}">#</a>'
        code = "" if prose else f'<div class="code">{highlight_code(row.code)}</div>'
        wide = " wide" if row.wide else ""
        out.append(f'<section class="section{wide}" id="{row.anchor}">'
                   f'<div class="docs"{note_lang}>{names}{link}\n{row.note_html}</div>{code}</section>')
    return "\n".join(out)


def _pager(links: str, where: str, lang: str) -> str:
    return f'<nav class="pager pager-{where}" aria-label="{labels(lang)["pager"]}">{links}</nav>' if links else ""


def render_page(*, page: Page, title: str, description: str, breadcrumbs: str, page_links: str, pager: str,
                body: str, footer: str, prose: bool) -> str:
    """The whole page; `pager` (the previous and next links) goes above and below the sections."""
    return TEMPLATE.substitute(
        lang=page.lang,
        title=escape(title),
        description=escape(description),
        assets=relative("assets", page.out),
        body_class="prose" if prose else "annotated",
        crumbs_label=labels(page.lang)["crumbs"],
        breadcrumbs=breadcrumbs,
        page_links=page_links,
        pager_top=_pager(pager, "top", page.lang),
        pager_bottom=_pager(pager, "bottom", page.lang),
        sections=body,
        footer=footer,
    )
