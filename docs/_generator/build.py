#!/usr/bin/env python3
"""Build the annotated HTML docs of labml_nn into docs/, or check them (see README.md beside this file).

    python docs/_generator/build.py            # (re)build docs/
    python docs/_generator/build.py --check    # fail if docs/ is stale, has broken links, KaTeX errors, ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docgen import katex  # noqa: E402
from docgen.check import check_required, check_site, compare_trees  # noqa: E402
from docgen.config import Config, load_config  # noqa: E402
from docgen.site import Site, build  # noqa: E402
from docgen.translate import load_entries, template, units  # noqa: E402

GENERATOR_DIR = Path(__file__).resolve().parent
# Files in the output folder that the generator does not own.
KEEP = {GENERATOR_DIR.name}


def _print(title: str, lines: list[str]) -> None:
    if lines:
        print(f"{title} ({len(lines)}):", file=sys.stderr)
        for line in lines:
            print("  " + line.replace("\n", "\n    "), file=sys.stderr)


def build_into(config: Config, out_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """Build into a fresh `out_dir`: (errors, warnings, translation notes)."""
    result = build(config, out_dir)
    notes = [line for report in result.reports for line in report.lines()]
    return result.errors, result.warnings, notes


def replace_output(built: Path, output: Path) -> None:
    """Make `output` hold exactly the build, keeping what the generator does not own."""
    output.mkdir(parents=True, exist_ok=True)
    others = [child.name for child in output.iterdir() if child.name not in KEEP]
    if others and not (output / "assets" / "style.css").exists():
        raise SystemExit(f"error: {output} holds files that are not generated docs ({', '.join(sorted(others)[:5])});"
                         " refusing to replace them")
    for child in output.iterdir():
        if child.name in KEEP:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in built.iterdir():
        target = output / child.name
        if child.is_dir():
            shutil.copytree(child, target)
        else:
            shutil.copyfile(child, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=GENERATOR_DIR / "config.yaml")
    parser.add_argument("--output", help="output folder (default: the config's `output`)")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and fail on stale docs, KaTeX errors, broken links or "
                             "anchors, missing pages and remote assets")
    parser.add_argument("--strict-translations", action="store_true",
                        help="also fail when a translated section's English original changed")
    parser.add_argument("--translation-template", nargs=2, metavar=("LANG", "SOURCE"),
                        help="print a translation file for SOURCE (relative to the package), keeping the "
                             "translations that still apply")
    args = parser.parse_args(argv)
    config = load_config(args.config, output=args.output)

    if args.translation_template:
        return _template(config, *args.translation_template)

    problem = katex.katex_available()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="labml-docs-") as temp:
        built = Path(temp)
        errors, warnings, notes = build_into(config, built)
        _print("warnings", warnings)
        _print("translations", notes)
        if args.check:
            # Links and assets of the fresh build and of the committed docs (which differ when stale).
            errors += list(dict.fromkeys(check_site(built) + check_site(config.output)))
            errors += check_required(built, config.required_pages)
            errors += compare_trees(built, config.output, KEEP)
            stale = [note for note in notes if "changed since translation" in note]
            if args.strict_translations and stale:
                errors += stale
        else:
            replace_output(built, config.output)
            errors += check_site(config.output)
            errors += check_required(config.output, config.required_pages)
        pages = sorted(path.relative_to(built).as_posix() for path in built.rglob("*.html"))
    _print("errors", errors)
    verb = "checked" if args.check else "built"
    status = "FAILED" if errors else "ok"
    print(f"docs {verb}: {len(pages)} pages in {config.output} — {status}")
    return 1 if errors else 0


def _template(config: Config, lang: str, source: str) -> int:
    site = Site(config)
    page = next((p for p in site.pages if p.source == source and p.lang == "en"), None)
    if page is None:
        print(f"error: no source {source!r} in {config.source_dir}", file=sys.stderr)
        return 2
    texts = units(page.title, page.summary, page.doc.sections)
    path = config.translations / lang / f"{source}.yaml"
    entries = load_entries(path, lang) if path.exists() else []
    print(f"# {lang} translation of {config.package}/{source}: made with `build.py --translation-template`.")
    print(template(texts, entries, lang), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
