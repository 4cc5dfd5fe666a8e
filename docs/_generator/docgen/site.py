"""Build the whole site into a folder: parse every source, render pages, render all math at once, copy assets."""

from __future__ import annotations

import posixpath
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from html import escape
from pathlib import Path
from urllib.parse import unquote

import yaml

from . import katex
from .config import Config
from .markup import render_inline, render_markdown
from .render import Page, Row, labels, output_path, pygments_css, relative, render_page, render_rows
from .source import parse_source
from .translate import Report, assemble, load_entries, translate, units

GENERATOR_DIR = Path(__file__).resolve().parent.parent
ASSET_FILES = ["style.css", "colab-badge.svg"]
# Where the images that notes show are copied, under their path in the repository.
FIGURES = "assets/figures"
IMAGE_TYPES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
_SCHEME = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")


@dataclass
class BuildResult:
    pages: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)


def find_sources(config: Config) -> list[str]:
    """Python and markdown files of the package, relative to it, sorted."""
    found = []
    for path in sorted(config.source_dir.rglob("*")):
        rel = path.relative_to(config.source_dir).as_posix()
        if path.is_file() and path.suffix in (".py", ".md") and not any(
                part.startswith((".", "__pycache__")) for part in rel.split("/")):
            found.append(rel)
    return found


def short_title(title: str, source: str) -> str:
    """`title` without a trailing `(name)` or `(name.ext)` that repeats the file name of `source`."""
    name = posixpath.basename(source)
    names = "|".join(re.escape(part) for part in (name, name.rsplit(".", 1)[0]))
    return re.sub(rf"\s*\((?:{names})\)\s*$", "", title, flags=re.IGNORECASE) or title


def _is_external(href: str) -> bool:
    return href.startswith(("#", "//", "mailto:")) or "://" in href.split("#", 1)[0]


class Site:
    """All pages of one build; renders each with links resolved against the others."""

    def __init__(self, config: Config):
        self.config = config
        self.result = BuildResult()
        self.math = katex.MathBatch()
        self.pages: list[Page] = []
        self.translations: dict[str, tuple[list[str | None], str, str]] = {}
        self.images: dict[str, Path] = {}  # output path of each image the notes show: its file in the repository
        for source in find_sources(config):
            text = (config.source_dir / source).read_text(encoding="utf-8")
            try:
                doc = parse_source(source, text)
            except (SyntaxError, ValueError) as error:
                self.result.errors.append(f"{config.package}/{source}: cannot parse: {error}")
                continue
            self.pages.append(Page(source, output_path(source), doc))
        english = list(self.pages)
        for lang in config.languages:
            folder = config.translations / lang
            wanted = {f"{page.source}.yaml": page for page in english}
            for path in sorted(folder.rglob("*.yaml")) if folder.exists() else []:
                page = wanted.get(path.relative_to(folder).as_posix())
                if page is None:
                    self.result.warnings.append(f"{path.relative_to(config.root)}: translation of a source file "
                                                "that does not exist")
                    continue
                translated = Page(page.source, f"{lang}/{page.out}", page.doc, lang)
                try:
                    self._translate(translated, path)
                except (yaml.YAMLError, ValueError) as error:
                    self.result.errors.append(f"{path.relative_to(config.root)}: cannot read: {error}")
                    continue
                self.pages.append(translated)
        self.by_out = {page.out: page for page in self.pages}

    def _translate(self, page: Page, path: Path) -> None:
        texts = units(page.title, page.summary, page.doc.sections)
        result, report = translate(texts, load_entries(path, page.lang), page.out,
                                   self.config.avoid_terms.get(page.lang))
        self.result.reports.append(report)
        title = result[0] or page.title
        summary = result[1] if result[1] is not None else page.summary
        self.translations[page.out] = (assemble(page.doc.sections, texts, result), title, summary)

    def title(self, page: Page) -> str:
        if page.out in self.translations:
            return self.translations[page.out][1]
        if page.source == "__init__.py" and "title" not in page.doc.front_matter:
            return self.config.site_title
        return page.title

    def summary(self, page: Page) -> str:
        return self.translations[page.out][2] if page.out in self.translations else page.summary

    def link_mapper(self, page: Page):
        """Links in notes are written relative to the English page; a translated page points at the translated
        edition of the target when there is one, and at the English page otherwise."""

        def mapper(href: str) -> str:
            if page.lang == "en" or _is_external(href):
                return href
            path, hash_mark, fragment = href.partition("#")
            target = posixpath.normpath(posixpath.join(posixpath.dirname(page.base), path))
            if f"{page.lang}/{target}" in self.by_out:
                target = f"{page.lang}/{target}"
            return relative(target, page.out) + hash_mark + fragment

        return mapper

    def image_mapper(self, page: Page, where: str):
        """Images in notes are files in the repository, written relative to the source file: each is copied to
        `assets/figures/<its path in the repository>` and the page points at the copy. A missing file, or one
        outside the repository or not an image, is an error."""

        def mapper(src: str) -> str:
            if _SCHEME.match(src) or src.startswith("#"):
                return src  # remote images fail the check as remote assets
            path = (self.config.source_dir / page.folder / unquote(src.split("#", 1)[0].split("?", 1)[0])).resolve()
            root = self.config.root.resolve()
            if not path.is_relative_to(root) or path.suffix.lower() not in IMAGE_TYPES:
                self.result.errors.append(f"{where}: image {src} is not an image file in the repository")
                return src
            if not path.is_file():
                self.result.errors.append(f"{where}: missing image {src} ({path.relative_to(root).as_posix()} "
                                          "does not exist)")
                return src
            out = f"{FIGURES}/{path.relative_to(root).as_posix()}"
            self.images[out] = path
            return relative(out, page.out)

        return mapper

    def edition(self, out: str, lang: str) -> str:
        """The page for English output path `out` in `lang`, or the English one."""
        return f"{lang}/{out}" if lang != "en" and f"{lang}/{out}" in self.by_out else out

    def breadcrumbs(self, page: Page) -> str:
        words = labels(page.lang)
        crumbs = [(words["home"], self.edition("index.html", page.lang))]
        parts = page.folder.split("/") if page.folder else []
        for depth in range(len(parts)):
            crumbs.append((parts[depth], self.edition("/".join(parts[:depth + 1]) + "/index.html", page.lang)))
        if posixpath.basename(page.source) != "__init__.py":
            crumbs.append((posixpath.basename(page.base).rsplit(".", 1)[0], page.out))
        out = []
        for number, (text, target) in enumerate(crumbs):
            if target == page.out or number == len(crumbs) - 1:
                out.append(f'<span class="crumb current" aria-current="page">{escape(text)}</span>')
            elif target in self.by_out or target.split("/", 1)[-1] in self.by_out:
                out.append(f'<a class="crumb" href="{relative(target, page.out)}">{escape(text)}</a>')
            else:
                out.append(f'<span class="crumb">{escape(text)}</span>')
        return '<span class="sep">›</span>'.join(out)

    def page_links(self, page: Page) -> str:
        words = labels(page.lang)
        links = [f'<a class="source-link" href="{escape(self.config.source_url(page.source))}">{words["source"]}</a>']
        editions = [("en", page.base)] + [(lang, f"{lang}/{page.base}") for lang in self.config.languages]
        for lang, out in editions:
            if lang != page.lang and out in self.by_out:
                name = "English" if lang == "en" else self.config.languages[lang]
                links.append(f'<a class="lang-switch" hreflang="{lang}" lang="{lang}" '
                             f'href="{relative(out, page.out)}">{escape(name)}</a>')
        colab = self.config.colab_url(page.folder)
        if colab:
            badge = relative("assets/colab-badge.svg", page.out)
            links.append(f'<a class="colab" href="{escape(colab)}"><img src="{badge}" alt="{words["colab"]}"'
                         ' width="117" height="20"></a>')
        return "\n".join(links)

    def entries(self, folder: str) -> list[tuple[str, Page | None]]:
        """The English pages and the subfolders directly in `folder`, as `(name, page)`, in the reading order that the
        folder's `__init__.py` gives in its front matter (`contents:`), the rest after (pages, then subfolders, by
        name). A subfolder's name ends with `/` and its page is its index (`None` if it has none)."""
        english = [p for p in self.pages if p.lang == "en"]
        index_out = posixpath.join(folder, "index.html")
        entries: dict[str, Page | None] = {posixpath.basename(other.source): other for other in english
                                           if other.folder == folder and other.out != index_out}
        prefix = folder + "/" if folder else ""
        for name in sorted({p.folder[len(prefix):].split("/")[0] for p in english
                            if p.folder != folder and p.folder.startswith(prefix)}):
            entries[name + "/"] = self.by_out.get(prefix + name + "/index.html")
        folder_index = self.by_out.get(index_out)
        order = list(folder_index.doc.front_matter.get("contents") or []) if folder_index else []
        unknown = [name for name in order if name not in entries]
        if unknown:
            raise ValueError(f"{folder or '.'}/__init__.py lists contents that do not exist: {unknown}")
        return [(name, entries[name]) for name in order + [name for name in entries if name not in order]]

    @cached_property
    def reading_order(self) -> list[str]:
        """English output paths in the order of the home page's table of contents: the home page, then each entry
        followed by what its folder holds."""
        order = ["index.html"] if "index.html" in self.by_out else []

        def walk(folder: str) -> None:
            for name, other in self.entries(folder):
                if other is not None:
                    order.append(other.out)
                if name.endswith("/"):
                    walk(posixpath.join(folder, name[:-1]))

        walk("")
        return order

    def listing(self, page: Page, folder: str) -> str:
        """Nested list of the pages under `folder` in reading order (see `entries`): English pages, or their
        translations where they exist."""
        items = []
        for name, other in self.entries(folder):
            if not name.endswith("/"):
                items.append(self._item(page, other))
                continue
            head = self._item(page, other).removesuffix("</li>") if other else f"<li><span>{escape(name)}</span>"
            items.append(head + self.listing(page, posixpath.join(folder, name[:-1])) + "</li>")
        return f"<ul>{''.join(items)}</ul>" if items else ""

    def link_title(self, page: Page, target: Page, short: bool = False) -> str:
        """HTML of `target`'s title as a link text on `page`; `short`: without a trailing `(readme)` or
        `(readme.md)` that names its own file (the contents show the file name apart, the previous/next links do not,
        so they keep it to tell a readme from its folder's page)."""
        title = short_title(self.title(target), target.source) if short else self.title(target)
        return render_inline(title, self.math, lambda href: href, f"{page.out} (links)")

    def english_only(self, page: Page, target: Page) -> str:
        """The mark after a link from a translated page to a page that has no translation."""
        if target.lang == page.lang:
            return ""
        return f' <span class="only-en">{escape(labels(page.lang)["english_only"])}</span>'

    def _item(self, page: Page, other: Page) -> str:
        """One entry of the contents: the title (linked), the file name apart, the other editions or the mark of an
        untranslated page, and the summary."""
        target = self.by_out[self.edition(other.out, page.lang)]
        where = f"{page.out} (contents)"
        # On the element of each text, not on the `<li>`: the entries nested in it may be in the page's language
        lang = f' lang="{target.lang}"' if target.lang != page.lang else ""
        summary = self.summary(target)
        extra = f' <span class="summary"{lang}>— {render_inline(summary, self.math, lambda href: href, where)}</span>' \
            if summary else ""
        name = posixpath.basename(other.source)
        if name == "__init__.py":
            name = posixpath.basename(other.folder) + "/"
        editions = "".join(
            f' <a class="edition" lang="{code}" hreflang="{code}" href="{relative(f"{code}/{other.out}", page.out)}">'
            f'{escape(language)}</a>' for code, language in self.config.languages.items()
            if page.lang == "en" and f"{code}/{other.out}" in self.by_out)
        return (f'<li><a href="{relative(target.out, page.out)}"{lang}>{self.link_title(page, target, short=True)}</a>'
                f' <span class="file">{escape(name)}</span>{self.english_only(page, target)}{editions}{extra}</li>')

    def neighbours(self, page: Page) -> tuple[Page | None, Page | None]:
        """The pages before and after `page` in the reading order, in its language where they have an edition."""
        order = self.reading_order
        if page.base not in order:
            return None, None
        number = order.index(page.base)
        around = (order[number - 1] if number > 0 else None, order[number + 1] if number + 1 < len(order) else None)
        return tuple(self.by_out[self.edition(out, page.lang)] if out else None for out in around)

    def pager(self, page: Page) -> str:
        """Links to the previous and next pages of the reading order (the same links go at the top and the bottom)."""
        words = labels(page.lang)
        links = []
        # The words "Previous" and "Next" apart from the arrows, to leave them out where space is short
        directions = (f'← <span class="pager-word">{words["previous"]}</span>',
                      f'<span class="pager-word">{words["next"]}</span> →')
        for rel, target, direction in zip(("prev", "next"), self.neighbours(page), directions):
            if target is None:
                continue
            lang = f' lang="{target.lang}"' if target.lang != page.lang else ""
            links.append(f'<a class="pager-{rel}" rel="{rel}" href="{relative(target.out, page.out)}">'
                         f'<span class="pager-dir">{direction}</span> '
                         f'<span class="pager-title"{lang}>{self.link_title(page, target)}</span>'
                         f'{self.english_only(page, target)}</a>')
        return "".join(links)

    def render(self, page: Page) -> str:
        words = labels(page.lang)
        notes = self.translations.get(page.out, ([None] * len(page.doc.sections),))[0]
        # Markdown pages, and sources without code (a package's `__init__.py` that only explains), read as prose
        prose = page.doc.language == "markdown" or not any(section.has_code() for section in page.doc.sections)
        rows = []
        for number, (section, note) in enumerate(zip(page.doc.sections, notes)):
            where = f"{page.out}#section-{number}"
            html = render_markdown(note if note is not None else section.note, self.math, self.link_mapper(page), where,
                                   self.image_mapper(page, where))
            fallback = "en" if page.lang != "en" and note is None and section.note else None
            rows.append(Row(f"section-{number}", section.names, html, section.code, fallback))
        if page.source == "__init__.py" and not any(section.note for section in page.doc.sections):
            rows.insert(0, Row("title", [], f"<h1>{escape(self.title(page))}</h1>", [], wide=True))
        if posixpath.basename(page.source) == "__init__.py":
            listing = self.listing(page, page.folder)
            if listing:
                heading = words["contents"] if not page.folder else words["in_folder"]
                rows.append(Row("contents", [], f'<nav class="toc"><h2>{heading}</h2>{listing}</nav>', [], wide=True))
        source = f"{self.config.package}/{page.source}"
        footer = f'{words["generated"]} <a href="{escape(self.config.source_url(page.source))}">{escape(source)}</a>'
        return render_page(page=page, title=self.title(page), description=self.summary(page),
                           breadcrumbs=self.breadcrumbs(page), page_links=self.page_links(page), pager=self.pager(page),
                           body=render_rows(rows, page.lang, prose), footer=footer, prose=prose)


def build(config: Config, out_dir: Path) -> BuildResult:
    """Write every page and asset into `out_dir` (which should be empty)."""
    site = Site(config)
    html = {page.out: site.render(page) for page in site.pages}
    rendered = katex.render_batch(site.math)
    site.result.errors.extend(rendered.errors)
    site.result.warnings.extend(rendered.warnings)
    for report in site.result.reports:
        site.result.errors.extend(f"{report.where}: {message}" for message in report.math_errors)
    for out, text in sorted(html.items()):
        path = out_dir / out
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(katex.fill_placeholders(text, rendered.html), encoding="utf-8")
        site.result.pages.append(out)
    _copy_assets(out_dir / "assets")
    for out, source in sorted(site.images.items()):
        (out_dir / out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out_dir / out)
    (out_dir / ".nojekyll").write_text("", encoding="utf-8")
    return site.result


def _copy_assets(assets: Path) -> None:
    assets.mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        shutil.copyfile(GENERATOR_DIR / "assets" / name, assets / name)
    (assets / "pygments.css").write_text(pygments_css(), encoding="utf-8")
    dist = katex.KATEX_DIR / "dist"
    (assets / "katex").mkdir(exist_ok=True)
    shutil.copyfile(dist / "katex.min.css", assets / "katex" / "katex.min.css")
    shutil.copyfile(katex.KATEX_DIR / "LICENSE", assets / "katex" / "LICENSE")
    shutil.copytree(dist / "fonts", assets / "katex" / "fonts", dirs_exist_ok=True)
