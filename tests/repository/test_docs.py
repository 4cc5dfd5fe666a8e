"""Tests of the annotated-docs generator (docs/_generator) on a small fixture package (tests/docs/fixtures)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "docs" / "_generator"
FIXTURES = Path(__file__).resolve().parent / "docs" / "fixtures"
sys.path.insert(0, str(GENERATOR))

from docgen.check import check_code_cells, check_site  # noqa: E402
from docgen.config import load_config  # noqa: E402
from docgen.katex import katex_available  # noqa: E402
from docgen.site import short_title  # noqa: E402
from docgen.source import parse_python, section_keys  # noqa: E402

KATEX_PROBLEM = katex_available()
needs_katex = pytest.mark.skipif(KATEX_PROBLEM is not None, reason=f"KaTeX cannot run: {KATEX_PROBLEM}")


def run_build(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR / "build.py"), *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", check=False)


def copy_fixture(tmp_path: Path) -> Path:
    """A private copy of the fixture project, to change sources and translations."""
    project = tmp_path / "project"
    shutil.copytree(FIXTURES, project, ignore=shutil.ignore_patterns("out", "__pycache__"))
    return project


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if KATEX_PROBLEM is not None:
        pytest.skip(f"KaTeX cannot run: {KATEX_PROBLEM}")
    out = tmp_path_factory.mktemp("site")
    result = run_build("--config", FIXTURES / "config.yaml", "--output", out)
    assert result.returncode == 0, result.stderr
    return out


def docs_text(html: str) -> str:
    """The notes of a page as text a reader sees: no code cells, no code spans, no MathML annotations."""
    notes = "".join(re.findall(r'<div class="docs"[^>]*>(.*?)</div>(?:<div class="code">|</section>)', html, re.S))
    notes = re.sub(r"<annotation[^>]*>.*?</annotation>", "", notes, flags=re.S)
    notes = re.sub(r"<pre.*?</pre>|<code>.*?</code>", "", notes, flags=re.S)
    return re.sub(r"<[^>]+>", "", notes)


# Parsing: no node needed.

def test_sections_follow_docstrings_comments_and_lone_hash_lines():
    doc = parse_python((FIXTURES / "pkg" / "sub" / "model.py").read_text(encoding="utf-8"))
    assert doc.front_matter == {"title": "Attention module", "summary": "The module that the sample package documents."}
    notes = [section.note for section in doc.sections]
    assert notes[0].startswith("# Attention module")
    assert doc.sections[0].code[0] == "import math"
    by_name = {section.names[0]: section for section in doc.sections if section.names}
    assert by_name["Attention"].code == ["class Attention(nn.Module):"]
    assert by_name["Attention"].note.startswith("## Attention")
    # The docstring leaves the code; the header stays.
    init = by_name["Attention.__init__"]
    assert init.code == ["    def __init__(self, d_model: int, d_k: int):", "        super().__init__()"]
    assert not any('"""' in line for section in doc.sections for line in section.code)
    # A comment block is the note of the code below it; the raw anchor stays in the markdown.
    scores = next(section for section in doc.sections if '<a id="scores"></a>' in section.note)
    assert scores.code[0].strip().startswith("scores = torch.einsum")
    # A lone `#` starts a section with no note; trailing comments stay in the code.
    lone = next(section for section in doc.sections if section.code and "softmax(dim=1)" in section.code[0])
    assert lone.note == ""
    assert "# softmax over $j$" in lone.code[0]
    # A non-raw docstring is read as Python reads it (`\\le` is `\le`).
    assert by_name["causal_mask"].note.endswith(r"$j \le i$.")
    assert section_keys(doc.sections)[:3] == ["module+0", "Attention", "Attention.__init__"]


def test_comment_block_above_a_definition_joins_its_docstring():
    doc = parse_python('"""Module."""\nx = 1\n\n\n# Why we need it\n@staticmethod\ndef f():\n    """What it does."""\n'
                       "    return 1\n")
    section = next(section for section in doc.sections if section.names == ["f"])
    assert section.note == "Why we need it\n\nWhat it does."
    assert section.code == ["@staticmethod", "def f():", "    return 1"]


def test_an_example_marked_beside_goes_to_the_code_column():
    doc = parse_python('"""\n# Title\n\nIntro.\n\n## Using it\n\nHow.\n\n```python beside\nx = f(1)\ny = g(x)\n```\n\n'
                       'After.\n"""\nimport os\n')
    assert [(s.note, s.code) for s in doc.sections] == [
        ("# Title\n\nIntro.", ["import os"]), ("## Using it\n\nHow.", ["x = f(1)", "y = g(x)"]), ("After.", [])]


def test_repository_url_comes_from_the_config_or_setup_py(tmp_path: Path):
    project = copy_fixture(tmp_path)
    config = load_config(project / "config.yaml")
    assert config.source_url("sub/model.py") == "https://github.com/example/sample/blob/main/pkg/sub/model.py"
    assert config.colab_url("sub") == \
        "https://colab.research.google.com/github/example/sample/blob/main/notebooks/sample.ipynb"
    assert config.colab_url("") is None and config.colab_url("subway") is None
    (project / "setup.py").write_text('import setuptools\nsetuptools.setup(name="x", url="https://github.com/o/r/")\n',
                                      encoding="utf-8")
    assert load_config(project / "config.yaml").colab_url("sub/deeper") == \
        "https://colab.research.google.com/github/o/r/blob/main/notebooks/sample.ipynb"


def test_one_line_definitions_keep_their_code():
    doc = parse_python('def f(): "Doc on the header line."\n\n\nclass A: pass\n')
    assert [line for section in doc.sections for line in section.code] == \
        ['def f(): "Doc on the header line."', "class A: pass"]
    assert [section.names for section in doc.sections] == [["f"], ["A"]]


def test_undocumented_definitions_get_their_own_section_and_key():
    # `g` has neither docstring nor comment: it still starts a section, so its anchor is its own code, and the
    # keys of the sections after it do not change when code is added above it
    source = '"""Module."""\nx = 1\n\n\n# Note of f\ndef f():\n    return 1\n\n\ndef g():\n    return 2\n\n\n' \
             '# After g\ny = g()\n'
    doc = parse_python(source)
    g = next(section for section in doc.sections if "g" in section.names)
    assert g.names == ["g"] and g.code[0] == "def g():" and g.note == ""
    f = next(section for section in doc.sections if "f" in section.names)
    assert f.note == "Note of f" and f.code == ["def f():", "    return 1"]
    keys = section_keys(doc.sections)
    assert keys == ["module+0", "f", "g", "g+1"]
    more = parse_python(source.replace("x = 1\n", "x = 1\nz = 2\n\n\ndef h():\n    return 3\n"))
    assert section_keys(more.sections)[-3:] == ["f", "g", "g+1"]


def test_a_body_that_is_only_a_docstring_shows_an_ellipsis():
    doc = parse_python((FIXTURES / "pkg" / "sub" / "hooks.py").read_text(encoding="utf-8"))
    code = {section.names[0]: section.code for section in doc.sections if section.names}
    assert code["Marker"] == ["class Marker:", "    ..."]
    assert code["no_op"] == ["def no_op(x: int,", "          y: int) -> None:", "    ..."]
    assert code["Base.run"] == ["    def run(self) -> None:", "        ..."]
    # A class with more than its docstring: its body is the next section, not `...`
    assert code["Base"] == ["class Base:"]


def _code_page(*cells: str) -> str:
    """A page with one section per code cell, as the generator writes them."""
    return "".join(f'<section class="section" id="section-{number}"><div class="docs"></div><div class="code">'
                   f'<pre class="highlight"><code>{cell}</code></pre></div></section>'
                   for number, cell in enumerate(cells))


def test_check_fails_on_a_definition_header_with_nothing_under_it(tmp_path: Path):
    problems = check_code_cells(_code_page("x = 1", "<span>def</span> f(self) -&gt; None:", "y = 2"))
    assert problems == ["#section-1: code ends with the bare header `def f(self) -> None:` and nothing under it"]
    (tmp_path / "page.html").write_text(_code_page("class _NoCtx:"), encoding="utf-8")
    assert check_site(tmp_path) == ["page.html: #section-0: code ends with the bare header `class _NoCtx:` and nothing "
                                    "under it"]
    assert check_code_cells(_code_page("class A:", "    def f(\n            x):")) == \
        ["#section-1: code ends with the bare header `def f(` and nothing under it"]
    # A header whose body is in the next section, a body of `...`, a one-line definition: all fine
    assert check_code_cells(_code_page("class A:", "    def f(self):\n        ...", "    x = 1\ndef g(): pass")) == []
    # Where a section ends inside an expression, the cell is no header
    assert check_code_cells(_code_page("def f(\n    x = [", "    1]):\n    return x")) == []


def test_contents_titles_do_not_repeat_the_file_name():
    assert short_title("Feedback Transformer (readme)", "transformers/feedback/readme.md") == "Feedback Transformer"
    assert short_title("피드백 트랜스포머 (readme.md)", "a/readme.md") == "피드백 트랜스포머"
    assert short_title("Notes (draft)", "a/readme.md") == "Notes (draft)"
    assert short_title("(readme)", "readme.md") == "(readme)"


# Generated pages.

@needs_katex
def test_math_is_rendered_at_build_time(site: Path):
    for page in ["sub/index.html", "sub/model.html", "sub/readme.html", "ko/sub/model.html"]:
        html = (site / page).read_text(encoding="utf-8")
        assert 'class="katex"' in html
        text = docs_text(html)
        assert "$" not in text, f"raw $ left in {page}"
        assert "\\begin" not in text and "\\frac" not in text, f"raw TeX left in {page}"
    index = (site / "sub" / "index.html").read_text(encoding="utf-8")
    assert index.count('class="katex-display"') == 2  # $$...$$ and \begin{align}
    assert "<script" not in index  # no JavaScript needed for math
    # An escaped underscore inside math reaches KaTeX untouched (markdown would have eaten the backslash).
    assert r"<annotation encoding=\"application/x-tex\">a\_b</annotation>".replace("\\\"", '"') in index


@needs_katex
def test_anchors_breadcrumbs_source_link_and_colab_badge(site: Path):
    html = (site / "sub" / "model.html").read_text(encoding="utf-8")
    for anchor in ["section-0", "section-1", "Attention", "Attention.forward", "causal_mask", "scores"]:
        assert f'id="{anchor}"' in html
    assert html.count('id="Attention.d_k"') == 1  # the property, not its setter too
    assert '<a class="crumb" href="../index.html">home</a>' in html
    assert 'href="https://github.com/example/sample/blob/main/pkg/sub/model.py"' in html
    assert "https://colab.research.google.com/github/example/sample/blob/main/notebooks/sample.ipynb" in html
    assert 'src="../assets/colab-badge.svg"' in html
    assert "colab.research.google.com" not in (site / "index.html").read_text(encoding="utf-8")
    # The root index is a table of contents of every page.
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in ["sub/index.html", "sub/model.html", "sub/readme.html"]:
        assert f'href="{page}"' in index


@needs_katex
def test_code_is_highlighted(site: Path):
    html = (site / "sub" / "model.html").read_text(encoding="utf-8")
    assert '<span class="k">class</span><span class="w"> </span><span class="nc">Attention</span>' in html
    assert ".highlight .k" in (site / "assets" / "pygments.css").read_text(encoding="utf-8")


@needs_katex
def test_korean_page(site: Path):
    html = (site / "ko" / "sub" / "model.html").read_text(encoding="utf-8")
    assert html.startswith('<!DOCTYPE html>\n<html lang="ko">')
    assert "<title>어텐션 모듈</title>" in html and "키 크기가" in html
    # Code is not translated; an untranslated or stale section falls back to English, marked as such.
    assert '<span class="k">class</span><span class="w"> </span><span class="nc">Attention</span>' in html
    assert '<div class="docs" lang="en">' in html and "is the size of keys and queries" in html
    # A note translated in part: the English part keeps its language.
    first = html.split('id="section-1"')[0]
    assert "어텐션 모듈</h1>" in first and '<div lang="en">\n<h2>Shapes</h2>' in first
    # Language switch both ways; links to pages without a Korean edition go to the English page.
    assert 'href="../../sub/model.html">English</a>' in html
    assert 'href="../ko/sub/model.html">한국어</a>' in (site / "sub" / "model.html").read_text(encoding="utf-8")
    assert '<a class="crumb" href="../../sub/index.html">sub</a>' in html
    assert 'href="#scores"' in html


@needs_katex
def test_built_site_passes_the_link_and_asset_checks(site: Path):
    assert check_site(site) == []


@needs_katex
def test_contents_follow_the_reading_order_and_code_free_pages_are_prose(site: Path):
    # `sub/__init__.py` lists readme.md before model.py (alphabetically model.py comes first)
    index = (site / "sub" / "index.html").read_text(encoding="utf-8")
    assert index.index('href="readme.html"') < index.index('href="model.html"')
    # A package page with no code is one readable column, like a markdown page
    assert 'class="prose"' in (site / "index.html").read_text(encoding="utf-8")
    assert 'class="annotated"' in (site / "sub" / "model.html").read_text(encoding="utf-8")


def test_empty_meta_description_fails_the_check(tmp_path: Path):
    page = tmp_path / "page.html"
    page.write_text('<html><head><meta name="description" content=""></head><body></body></html>', encoding="utf-8")
    assert any("empty meta description" in problem for problem in check_site(tmp_path))


# Check mode.

@needs_katex
def test_check_passes_on_a_fresh_build_and_catches_broken_links(tmp_path: Path):
    out = tmp_path / "out"
    config = FIXTURES / "config.yaml"
    assert run_build("--config", config, "--output", out).returncode == 0
    assert run_build("--config", config, "--output", out, "--check").returncode == 0
    page = out / "sub" / "model.html"
    original = page.read_text(encoding="utf-8")
    for broken, message in [('<a href="nowhere.html">x</a>', "broken link nowhere.html"),
                            ('<a href="index.html#no-such-id">x</a>', "broken anchor index.html#no-such-id"),
                            ('<img src="https://example.com/x.png">', "remote asset https://example.com/x.png")]:
        page.write_text(original.replace("</main>", broken + "</main>"), encoding="utf-8")
        result = run_build("--config", config, "--output", out, "--check")
        assert result.returncode == 1
        assert message in result.stderr
        assert "differs from a fresh build" in result.stderr
    page.unlink()
    result = run_build("--config", config, "--output", out, "--check")
    assert result.returncode == 1 and "missing page or file: sub/model.html" in result.stderr


@needs_katex
def test_katex_errors_fail_the_check(tmp_path: Path):
    project = copy_fixture(tmp_path)
    source = project / "pkg" / "sub" / "readme.md"
    source.write_text(source.read_text(encoding="utf-8") + "\nBroken: $\\frac{a$\n", encoding="utf-8")
    result = run_build("--config", project / "config.yaml", "--check")
    assert result.returncode == 1
    assert "KaTeX error in $\\frac{a$" in result.stderr


@needs_katex
def test_changed_english_is_reported_for_translations(tmp_path: Path):
    project = copy_fixture(tmp_path)
    out = project / "out"
    result = run_build("--config", project / "config.yaml")
    assert result.returncode == 0
    assert "`Attention.__init__` changed since translation" in result.stderr
    untranslated = "module+0#1, Attention.__init__+2, Attention.d_k, Attention.d_k(2), Attention.forward"
    assert f"not translated, shown in English: {untranslated}" in result.stderr
    assert run_build("--config", project / "config.yaml", "--check").returncode == 0
    assert run_build("--config", project / "config.yaml", "--check", "--strict-translations").returncode == 1
    # Edit an English note that has a fresh translation: the Korean page shows English for it and says why.
    model = project / "pkg" / "sub" / "model.py"
    model.write_text(model.read_text(encoding="utf-8").replace("A single head", "One head"), encoding="utf-8")
    result = run_build("--config", project / "config.yaml")
    assert "`Attention` changed since translation" in result.stderr
    assert "키 크기가" not in (out / "ko" / "sub" / "model.html").read_text(encoding="utf-8")
    # The template keeps fresh translations and moves the stale one aside.
    result = run_build("--config", project / "config.yaml", "--translation-template", "ko", "sub/model.py")
    assert "ko: 어텐션 모듈" in result.stdout and "previous_ko: |-\n    ## 어텐션" in result.stdout


@needs_katex
def test_translation_must_keep_the_math(tmp_path: Path):
    project = copy_fixture(tmp_path)
    path = project / "translations" / "ko" / "sub" / "model.py.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("ko: 프로젝션 $W_q$", "ko: 프로젝션 $W_Q$"),
                    encoding="utf-8")
    result = run_build("--config", project / "config.yaml")
    assert result.returncode == 1 and "changes its math" in result.stderr


@needs_katex
def test_translation_must_use_the_glossary_terms(tmp_path: Path):
    project = copy_fixture(tmp_path)
    path = project / "translations" / "ko" / "sub" / "model.py.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("ko: 어텐션 모듈", "ko: 변압기 모듈"), encoding="utf-8")
    result = run_build("--config", project / "config.yaml")
    assert result.returncode == 1 and "uses '변압기'; the term is '트랜스포머'" in result.stderr


@needs_katex
def test_committed_docs_are_current():
    """The repository's docs/ is what the generator makes from the sources (same as CI's `build.py --check`)."""
    result = run_build("--check")
    assert result.returncode == 0, result.stderr


@needs_katex
def test_contents_entries_show_the_title_and_the_file_name_apart(site: Path):
    index = (site / "index.html").read_text(encoding="utf-8")
    assert '<a href="sub/hooks.html">Hooks</a> <span class="file">hooks.py</span>' in index
    assert index.count("hooks.py") == 1
    assert '<a href="sub/index.html">Scaled dot-product attention</a> <span class="file">sub/</span>' in index


@needs_katex
def test_korean_contents_mark_pages_that_have_no_translation(site: Path):
    index = (site / "ko" / "index.html").read_text(encoding="utf-8")
    assert '<a href="sub/model.html">어텐션 모듈</a> <span class="file">model.py</span> <span class="summary">' in index
    for page, title, name in [("sub/hooks.html", "Hooks", "hooks.py"),
                              ("sub/index.html", "Scaled dot-product attention", "sub/")]:
        assert (f'<a href="../{page}" lang="en">{title}</a> <span class="file">{name}</span> '
                '<span class="only-en">(English)</span>') in index
    assert "(English)" not in (site / "index.html").read_text(encoding="utf-8")


def _pager(html: str) -> list[str]:
    """The previous/next links of a page, `rel href` each, top ones then bottom ones."""
    navs = re.findall(r'<nav class="pager pager-(top|bottom)"[^>]*>(.*?)</nav>', html, re.S)
    assert [where for where, _ in navs] == ["top", "bottom"]
    return [f"{rel} {href}" for _, links in navs for rel, href in re.findall(r'rel="(\w+)" href="([^"]+)"', links)]


@needs_katex
def test_previous_and_next_links_follow_the_contents(site: Path):
    # Reading order: home, sub/ (its index), then sub/__init__.py's `contents`, then the rest of sub/
    assert _pager((site / "index.html").read_text(encoding="utf-8")) == ["next sub/index.html"] * 2
    assert _pager((site / "sub" / "readme.html").read_text(encoding="utf-8")) == \
        ["prev index.html", "next model.html"] * 2
    assert _pager((site / "sub" / "hooks.html").read_text(encoding="utf-8")) == ["prev model.html"] * 2
    # A translated page links to translated pages where they exist, to English ones (marked) otherwise
    korean = (site / "ko" / "sub" / "model.html").read_text(encoding="utf-8")
    assert _pager(korean) == ["prev ../../sub/readme.html", "next ../../sub/hooks.html"] * 2
    assert '<span class="pager-title" lang="en">Hooks (hooks.py)</span> <span class="only-en">(English)</span></a>' \
        in korean
    assert _pager((site / "ko" / "index.html").read_text(encoding="utf-8")) == ["next ../sub/index.html"] * 2


@needs_katex
def test_images_in_notes_are_copied_into_the_docs(site: Path):
    html = (site / "sub" / "hooks.html").read_text(encoding="utf-8")
    assert '<img src="../assets/figures/figures/plot.png" alt="A wide plot" />' in html
    assert '<img src="../assets/figures/pkg/sub/diagram.png" alt="A small diagram" />' in html
    assert (site / "assets" / "figures" / "figures" / "plot.png").read_bytes() == \
        (FIXTURES / "figures" / "plot.png").read_bytes()
    assert (site / "assets" / "figures" / "pkg" / "sub" / "diagram.png").is_file()
    assert "max-width: 100%" in re.search(r"\.docs img \{[^}]*\}", (site / "assets" / "style.css").read_text(
        encoding="utf-8")).group(0)


@needs_katex
def test_check_fails_on_a_missing_or_stale_image(tmp_path: Path):
    project = copy_fixture(tmp_path)
    config = project / "config.yaml"
    assert run_build("--config", config).returncode == 0
    copy = project / "out" / "assets" / "figures" / "figures" / "plot.png"
    copy.write_bytes(copy.read_bytes() + b"changed")
    result = run_build("--config", config, "--check")
    assert result.returncode == 1 and "stale: assets/figures/figures/plot.png differs" in result.stderr
    (project / "figures" / "plot.png").unlink()
    result = run_build("--config", config, "--check")
    assert result.returncode == 1
    assert "sub/hooks.html#section-0: missing image ../../figures/plot.png (figures/plot.png does not exist)" \
        in result.stderr
    # An image outside the repository is refused too
    hooks = project / "pkg" / "sub" / "hooks.py"
    hooks.write_text(hooks.read_text(encoding="utf-8").replace("../../figures/plot.png", "../../../../x.png"),
                     encoding="utf-8")
    assert "not an image file in the repository" in run_build("--config", config).stderr
