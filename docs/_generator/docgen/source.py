"""Split a source file into sections: a note (markdown) beside the code it explains.

Rules for Python files, all read from the source text (nothing is imported):

* The module docstring is YAML front matter between `---` lines, then markdown: the first note.
* A class or function docstring becomes the note beside the `def`/`class` lines (decorators included); the
  docstring itself leaves the code column. A comment block right above the definition joins that note.
* A block of whole-line `#` comments is the note for the code below it. Inside a block, a bare `#` line is a
  paragraph break; a bare `#` line on its own starts a new section with no note.
* Trailing comments stay in the code.
* Every class or function starts a section (with or without a note), so its name anchor points at its own code.
* A class or function whose body is only its docstring shows `...` under its header in the code column (the body
  is the note on the left), so that the header does not look cut off.
* A fenced block in a note whose info string is `python beside` (an example, in a module docstring) goes to the
  code column: the note is cut at the heading above the block, and that part becomes a section of its own whose
  code is the block.

A markdown file (such as `readme.md`) is one note with no code.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from dataclasses import dataclass, field

import yaml


@dataclass
class Section:
    """One row of a page: `note` is markdown, `code` the source lines it explains."""

    note: str = ""
    code: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def has_code(self) -> bool:
        return any(line.strip() for line in self.code)


@dataclass
class Document:
    """A parsed source file."""

    front_matter: dict
    sections: list[Section]
    language: str  # "python" or "markdown"


_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.DOTALL)


def split_front_matter(text: str) -> tuple[dict, str]:
    """Separate YAML front matter between `---` lines from the markdown after it."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    data = yaml.safe_load(match.group(1)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"front matter must be a YAML mapping, got {type(data).__name__}")
    return data, text[match.end():]


_ANCHOR_LINE = re.compile(r"(<a\s+(id|name)=\"[^\"]*\"\s*>\s*</a>\s*)+")


def split_at_headings(text: str) -> list[str]:
    """Cut markdown before each heading of level 1 to 3 (outside fenced code)."""
    chunks: list[list[str]] = [[]]
    fence = None
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None and re.match(r"#{1,3}\s", line) and any(
                part.strip() and not _ANCHOR_LINE.fullmatch(part.strip()) for part in chunks[-1]):
            chunks.append([])
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = marker if fence is None else (None if marker == fence else fence)
        chunks[-1].append(line)
    return [chunk for chunk in ("\n".join(lines).strip() for lines in chunks) if chunk]


def parse_markdown(text: str) -> Document:
    """A markdown file: one section per heading, so each has its own anchor."""
    front_matter, body = split_front_matter(text)
    return Document(front_matter, [Section(note=chunk) for chunk in split_at_headings(body)], "markdown")


@dataclass
class _Docstring:
    first: int  # first line of the definition (its first decorator), 1-based
    header_end: int  # last line of the `def ...:` header
    doc_first: int  # lines of the docstring literal
    doc_last: int
    text: str
    name: str | None  # qualified name, `None` for the module
    empty_body: str | None = None  # the `...` line to show when the body is only the docstring


def _docstrings(tree: ast.Module) -> dict[int, _Docstring]:
    """Docstrings of the module, classes and functions, keyed by the line where their owner starts."""
    found: dict[int, _Docstring] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                doc = _docstring_expr(child)
                # A docstring on the header's own line (`def f(): "doc"`) stays in the code.
                if doc is not None and doc.lineno > child.lineno:
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    empty = " " * doc.col_offset + "..." if len(child.body) == 1 else None
                    found[first] = _Docstring(first, doc.lineno - 1, doc.lineno, doc.end_lineno,
                                              inspect.cleandoc(doc.value.value), name, empty)
                visit(child, name + ".")
            else:
                visit(child, prefix)

    doc = _docstring_expr(tree)
    if doc is not None:
        found[doc.lineno] = _Docstring(doc.lineno, doc.lineno - 1, doc.lineno, doc.end_lineno,
                                       inspect.cleandoc(doc.value.value), None)
    visit(tree, "")
    return found


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _definition_names(tree: ast.Module) -> dict[int, str]:
    """Qualified names of all classes and functions, keyed by their first line."""
    names: dict[int, str] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                names[first] = prefix + child.name
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return names


def _comment_lines(text: str) -> dict[int, str]:
    """Whole-line comments: line number to the text after `#` (and one space)."""
    comments: dict[int, str] = {}
    lines = text.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            if not lines[row - 1][:col].strip():
                body = token.string[1:]
                comments[row] = body[1:] if body.startswith(" ") else body
    return comments


def parse_python(text: str) -> Document:
    tree = ast.parse(text)
    lines = text.splitlines()
    docstrings = _docstrings(tree)
    definitions = _definition_names(tree)
    comments = _comment_lines(text)
    front_matter: dict = {}
    sections = [Section()]

    module_note: list[Section] = []

    def start_section(note: str = "") -> Section:
        current = sections[-1]
        if not current.has_code() and not any(current is s for s in module_note):
            # Nothing but a note (or nothing) so far: the new note joins it.
            current.code.clear()
            current.note = "\n\n".join(part for part in (current.note, note) if part)
            return current
        sections.append(Section(note=note))
        return sections[-1]

    number = 1
    if lines and lines[0].startswith("#!"):
        number = 2
    while number <= len(lines):
        doc = docstrings.get(number)
        if doc is not None and doc.name is None:
            front_matter, body = split_front_matter(doc.text)
            module_note.append(start_section(body.strip()))
            number = doc.doc_last + 1
        elif doc is not None:
            section = start_section(doc.text)
            section.names.append(doc.name)
            section.code.extend(lines[doc.first - 1:doc.header_end])
            if doc.empty_body:
                section.code.append(doc.empty_body)
            number = doc.doc_last + 1
        elif number in comments:
            block = []
            while number in comments:
                block.append(comments[number])
                number += 1
            note = "\n".join(block).strip()
            if note:
                start_section(note)
            elif sections[-1].has_code():
                sections.append(Section())
        else:
            if number in definitions:
                # A definition without a docstring starts a section of its own (unless it starts the current one,
                # below its comment block), so that its anchor is exactly its code and its translation key does
                # not depend on what comes before it
                section = sections[-1]
                if section.has_code() or any(section is s for s in module_note):
                    sections.append(Section())
                sections[-1].names.append(definitions[number])
            sections[-1].code.append(lines[number - 1])
            number += 1

    for section in sections:
        while section.code and not section.code[0].strip():
            section.code.pop(0)
        while section.code and not section.code[-1].strip():
            section.code.pop()
    sections = [s for s in sections if s.note or s.code]
    sections = [part for section in sections for part in _code_beside(section)]
    return Document(front_matter, sections, "python")


_BESIDE = re.compile(r"^```python beside[ \t]*\n(.*?)^```[ \t]*$\n?", re.M | re.S)


def _code_beside(section: Section) -> list[Section]:
    """`section`, with each `python beside` block of its note moved into a section of its own (see above)."""
    match = _BESIDE.search(section.note)
    if match is None:
        return [section]
    before = section.note[:match.start()]
    # The part moves from the last heading before the block (or from the block itself)
    heading = max((m.start() for m in re.finditer(r"^#{1,3}\s", before, re.M)), default=len(before))
    first = Section(note=before[:heading].strip(), code=section.code, names=section.names)
    moved = Section(note=before[heading:].strip(), code=match.group(1).rstrip("\n").splitlines())
    rest = Section(note=section.note[match.end():].strip())
    return [first] + _code_beside(moved) + ([rest] if rest.note else [])


def section_keys(sections: list[Section]) -> list[str]:
    """Stable names of sections for translations: a definition's name, or `name+k` for the k-th section after the
    last named one (`module+k` before any), so that inserting code elsewhere does not renumber them."""
    keys, owner, count = [], "module", 0
    for section in sections:
        if section.names:
            owner, count = section.names[0], 0
            # A name defined twice (a property and its setter): the second is `name(2)`.
            repeat = sum(1 for key in keys if key == owner or key.startswith(owner + "("))
            if repeat:
                owner = f"{owner}({repeat + 1})"
            keys.append(owner)
        else:
            keys.append(f"{owner}+{count}")
        count += 1
    return keys


def parse_source(path_name: str, text: str) -> Document:
    """Parse a `.py` or `.md` file's text."""
    if path_name.endswith(".py"):
        return parse_python(text)
    return parse_markdown(text)
