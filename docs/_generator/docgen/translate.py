"""Translated editions: notes kept as YAML source files next to the generator, matched to the English text.

A translation file `translations/<lang>/<source path>.yaml` holds a list of entries, like gettext's catalogues:

    entries:
      - key: title             # `title`, `summary`, a section's name anchor or `section-N` (used on mismatch)
        en: Feedback Transformer  # the English original it translates, verbatim
        ko: 피드백 트랜스포머

An entry applies when its `en` equals the current English text of a section. When the English changed, the
entry with the same key is *stale*: the page shows the English text and the build reports it. Sections with no
entry show English and are counted as untranslated. A translation whose math differs from the original's is an
error: math and code are never translated.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .markup import math_segments
from .source import Section, section_keys, split_at_headings


@dataclass
class Entry:
    key: str
    en: str
    text: str
    previous: str = ""


@dataclass
class Report:
    """What a build found about one translated page."""

    where: str
    stale: list[str] = field(default_factory=list)
    untranslated: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    math_errors: list[str] = field(default_factory=list)  # and other errors: wrong terms

    def lines(self) -> list[str]:
        out = [f"{self.where}: {message}" for message in self.stale + self.orphaned]
        if self.untranslated:
            out.append(f"{self.where}: {len(self.untranslated)} section(s) not translated, shown in English: "
                       + ", ".join(self.untranslated))
        return out


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def load_entries(path: Path, lang: str) -> list[Entry]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = []
    for number, raw in enumerate(data.get("entries") or []):
        if not isinstance(raw, dict) or "key" not in raw or "en" not in raw:
            raise ValueError(f"{path}: entry {number} needs `key` and `en`")
        entries.append(Entry(str(raw["key"]), _normal(str(raw["en"])), _normal(str(raw.get(lang) or "")),
                             str(raw.get("previous_" + lang) or "")))
    return entries


def translate(texts: list[tuple[str, str]], entries: list[Entry], where: str,
              avoid: dict[str, str] | None = None) -> tuple[list[str | None], Report]:
    """For each `(key, english)` the translated text, or `None` where English must be shown.

    `avoid` maps wrong renderings of technical terms to the right ones (machine translations turn the
    "transformer" of this library into the electrical kind, 변압기): a translation using one is an error."""
    report = Report(where)
    by_english = {}
    for entry in entries:
        if entry.text:
            by_english.setdefault(entry.en, entry)
    by_key = {entry.key: entry for entry in entries}
    used = set()
    result: list[str | None] = []
    for key, english in texts:
        english = _normal(english)
        entry = by_english.get(english)
        if entry is not None:
            used.add(id(entry))
            if math_segments(entry.en) != math_segments(entry.text):
                report.math_errors.append(f"translation of `{key}` changes its math: "
                                          f"{math_segments(entry.en)} != {math_segments(entry.text)}")
            for wrong, right in (avoid or {}).items():
                if wrong in entry.text:
                    report.math_errors.append(f"translation of `{key}` uses {wrong!r}; the term is {right!r}")
            result.append(entry.text)
            continue
        result.append(None)
        if not english:
            continue
        entry = by_key.get(key)
        if entry is not None and entry.text:
            used.add(id(entry))
            diff = "\n".join(difflib.unified_diff(entry.en.splitlines(), english.splitlines(), "translated from",
                                                  "English now", lineterm="", n=1))
            report.stale.append(f"English original of translated section `{key}` changed since translation "
                                f"(showing English):\n{diff}")
        else:
            report.untranslated.append(key)
    for entry in entries:
        if entry.text and id(entry) not in used:
            report.orphaned.append(f"translation `{entry.key}` matches no section (its English is gone)")
    return result, report


def units(title: str, summary: str, sections: list[Section]) -> list[tuple[str, str]]:
    """What gets translated, as `(key, english)`: the title, the summary, and each note cut at its headings
    (so that a change in one part of a long note leaves the other parts' translations in use)."""
    out = [("title", title), ("summary", summary)]
    for key, section in zip(section_keys(sections), sections):
        for number, chunk in enumerate(split_at_headings(section.note) or [""]):
            out.append((key if number == 0 else f"{key}#{number}", chunk))
    return out


def assemble(sections: list[Section], texts: list[tuple[str, str]], result: list[str | None]) -> list[str | None]:
    """Each section's translated note (`None`: all English), from the translations of its units."""
    notes: list[str | None] = []
    position = 2
    for section in sections:
        count = len(split_at_headings(section.note)) or 1
        parts = list(zip(texts[position:position + count], result[position:position + count]))
        position += count
        if all(translated is None for _, translated in parts):
            notes.append(None)
            continue
        # English parts of a partly translated note keep their language for fonts and screen readers.
        notes.append("\n\n".join(translated if translated is not None else f'<div lang="en">\n\n{english}\n\n</div>'
                                  for (_, english), translated in parts))
    return notes


class _Literal(str):
    pass


def _literal(dumper: yaml.Dumper, value: _Literal) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style=style)


def template(texts: list[tuple[str, str]], entries: list[Entry], lang: str) -> str:
    """A translation file for the current English texts, keeping the translations that still apply.

    A stale translation moves to `previous_<lang>`, so that nothing unchecked is shown as current.
    """
    yaml.add_representer(_Literal, _literal)
    by_english = {entry.en: entry for entry in entries if entry.text}
    by_key = {entry.key: entry for entry in entries}
    out = []
    for key, english in texts:
        english = _normal(english)
        if not english:
            continue
        item = {"key": key, "en": _Literal(english)}
        if english in by_english:
            item[lang] = _Literal(by_english[english].text)
        else:
            item[lang] = _Literal("")
            old = by_key.get(key)
            if old is not None and (old.text or old.previous):
                item["previous_" + lang] = _Literal(old.text or old.previous)
        out.append(item)
    return yaml.dump({"entries": out}, allow_unicode=True, sort_keys=False, width=120)
