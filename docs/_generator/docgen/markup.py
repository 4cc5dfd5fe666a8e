"""Markdown to HTML with math left for KaTeX and relative links mapped to where pages are written."""

from __future__ import annotations

import re
from typing import Callable

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from mdit_py_plugins.amsmath import amsmath_plugin
from mdit_py_plugins.dollarmath import dollarmath_plugin
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.util import ClassNotFound

from .katex import MathBatch

# A link mapper turns an href written in a source file into the href to write in the page.
LinkMapper = Callable[[str], str]


def _math_rule(display: bool, wrap: str):
    def rule(self, tokens, idx, options, env):
        token = tokens[idx]
        mark = env["math"].add(token.content, display, env["where"])
        if wrap == "div":
            label = ""
            if token.info:
                label = f' id="eq-{escapeHtml(token.info)}"'
            return f'<div class="math-block"{label}>{mark}</div>\n'
        return mark

    return rule


def _link_rule(attribute: str, mapper: str):
    def rule(self, tokens, idx, options, env):
        token = tokens[idx]
        value = token.attrGet(attribute)
        if value is not None:
            token.attrSet(attribute, env[mapper](value))
        if token.type == "image":
            return self.image(tokens, idx, options, env)
        return self.renderToken(tokens, idx, options, env)

    return rule


def highlight_fence(code: str, lang: str, attrs: str) -> str:
    """Pygments for fenced code in notes; markdown-it keeps its own `<pre><code>` when this returns ""."""
    try:
        lexer = get_lexer_by_name(lang or "text")
    except ClassNotFound:
        lexer = TextLexer()
    body = highlight(code, lexer, HtmlFormatter(nowrap=True)).rstrip("\n")
    return f'<pre class="highlight"><code>{body}</code></pre>\n'


def make_markdown() -> MarkdownIt:
    """CommonMark with raw HTML (for `<a id>` anchors), tables, `$`/`$$` math and `\\begin{align}` blocks."""
    md = MarkdownIt("commonmark", {"html": True, "highlight": highlight_fence}).enable(["table", "strikethrough"])
    dollarmath_plugin(md, double_inline=True)
    amsmath_plugin(md)
    md.add_render_rule("math_inline", _math_rule(False, "span"))
    md.add_render_rule("math_inline_double", _math_rule(True, "span"))
    md.add_render_rule("math_block", _math_rule(True, "div"))
    md.add_render_rule("math_block_label", _math_rule(True, "div"))
    md.add_render_rule("amsmath", _math_rule(True, "div"))
    md.add_render_rule("link_open", _link_rule("href", "links"))
    md.add_render_rule("image", _link_rule("src", "images"))
    return md


_MARKDOWN = make_markdown()


def render_markdown(text: str, math: MathBatch, links: LinkMapper, where: str, images: LinkMapper | None = None) -> str:
    """HTML for `text`; its math goes into `math` and comes back as placeholders. `links` maps the targets of links,
    `images` the sources of images (`links` when not given)."""
    return _MARKDOWN.render(text, {"math": math, "links": links, "images": images or links, "where": where})


def render_inline(text: str, math: MathBatch, links: LinkMapper, where: str) -> str:
    """HTML for one line of markdown, such as a summary, without the paragraph around it."""
    return _MARKDOWN.renderInline(text, {"math": math, "links": links, "images": links, "where": where})


_MATH_SEGMENT = re.compile(r"\$\$.+?\$\$|\$[^$\n]+?\$|\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)


def math_segments(text: str) -> list[str]:
    """The math in a markdown text, in a canonical order, to compare a translation with its original."""
    return sorted(re.sub(r"\s+", " ", match.group(0)).strip() for match in _MATH_SEGMENT.finditer(text))


def plain_text(html: str) -> str:
    """Text of an HTML fragment (for `<title>` and descriptions)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)).strip()
