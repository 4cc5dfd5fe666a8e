#!/usr/bin/env bash
# Headless Chromium screenshots of the docs, to look at the layout (CI does not run this).
#   apt-get install -y chromium fonts-noto-cjk   # Debian packages; the CJK fonts show the Korean pages
#   bash docs/_generator/screenshots.sh [--all] [--bottom] [--overflow] [OUT_DIR] [DOCS_DIR] [PAGE[#ANCHOR] ...]
# Each page is shot at a desktop width (1400 px) and a narrow, phone-like width (420 px): the top 2400 px of the page,
# and with --bottom also its last screen (the end of the page: the previous/next links and the footer). A PAGE#ANCHOR
# is shot one screen (1200 px) from that anchor down.
# --all: every page of DOCS_DIR; otherwise the PAGEs given, or a default set of English and Korean pages.
# --overflow: no screenshots; print each page that is wider than a phone (420 px) and what sticks out, and exit 1
#   if there is one (code blocks and display math scroll inside their own box and do not count).
set -euo pipefail
all=0
bottom=0
overflow=0
while [ $# -gt 0 ]; do
  case "$1" in
    --all) all=1; shift ;;
    --bottom) bottom=1; shift ;;
    --overflow) overflow=1; shift ;;
    *) break ;;
  esac
done
here="$(cd "$(dirname "$0")" && pwd)"
out="$(realpath -m "${1:-/tmp/labml-docs-screens}")"
docs="$(realpath "${2:-$here/..}")"
shift $(( $# > 2 ? 2 : $# ))
pages=("$@")
if [ "$all" = 1 ]; then
  mapfile -t pages < <(cd "$docs" && find . -name '*.html' -not -path './_generator/*' | sed 's|^\./||' | sort)
elif [ ${#pages[@]} -eq 0 ]; then
  pages=(index.html transformers/feedback/index.html transformers/feedback/readme.html
         transformers/feedback/transformer.html transformers/feedback/fused_backward.html
         transformers/feedback/state_tracking.html transformers/feedback/experiment.html
         ko/index.html ko/transformers/feedback/index.html ko/transformers/feedback/readme.html
         ko/transformers/feedback/transformer.html ko/transformers/feedback/fused_backward.html
         ko/transformers/feedback/state_tracking.html ko/transformers/feedback/experiment.html)
fi
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "chromium is not installed (apt-get install -y chromium)" >&2; exit 2; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT

chrome() {  # chrome WIDTH,HEIGHT ARGS... URL
  local size="$1"
  shift
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --allow-file-access-from-files \
    --user-data-dir="$profile/user" --hide-scrollbars --window-size="$size" --virtual-time-budget=3000 "$@" 2>/dev/null
}

# A page in a frame of the given width; the script runs once the page has loaded.
frame() {  # frame PAGE WIDTH HEIGHT SCRIPT
  printf '<!DOCTYPE html><body style="margin:0"><pre id="out"></pre><iframe id="page" src="file://%s" style="border:0;width:%spx;height:%spx;display:block"></iframe><script>document.getElementById("page").onload = function () { %s };</script></body>' \
    "$docs/$1" "$2" "$3" "$4" > "$profile/frame.html"
  echo "file://$profile/frame.html"
}

# Elements sticking out of the page's width, outside any box that scrolls or clips them.
read -r -d '' MEASURE <<'JS' || true
const win = this.contentWindow, doc = this.contentDocument, width = doc.documentElement.clientWidth, found = [];
const visible = (el) => win.getComputedStyle(el).overflowX === "visible";
if (doc.documentElement.scrollWidth > width) {
  for (const el of doc.body.querySelectorAll("*")) {
    let clipped = false;
    for (let up = el.parentElement; up && !clipped; up = up.parentElement) {
      clipped = !visible(up);
    }
    const spills = visible(el) && el.scrollWidth > el.clientWidth + 1 && el.clientWidth > 0;
    if (!clipped && (el.getBoundingClientRect().right > width + 1 || spills)) found.push(el);
  }
}
// The innermost elements: what sticks out, not the boxes around it
const names = found.filter((el) => !found.some((other) => other !== el && el.contains(other))).map(
  (el) => el.tagName.toLowerCase() + (el.className ? "." + el.className : "") + ": "
          + (el.textContent || "").replace(/\s+/g, " ").slice(0, 60));
document.getElementById("out").textContent = "OVERFLOW " + JSON.stringify(names.slice(0, 5));
JS

if [ "$overflow" = 1 ]; then
  status=0
  for page in "${pages[@]}"; do
    result="$(chrome 420,900 --dump-dom "$(frame "$page" 420 900 "$MEASURE")" \
              | sed -n 's|.*<pre id="out">OVERFLOW \(.*\)</pre>.*|\1|p')"
    if [ "$result" != "[]" ]; then
      echo "$page: ${result:-not measured}"
      status=1
    fi
  done
  exit "$status"
fi

mkdir -p "$out"
for target in "${pages[@]}"; do
  page="${target%%#*}"
  anchor="${target#"$page"}"
  [ -f "$docs/$page" ] || { echo "skip $page (not built)" >&2; continue; }
  name="${page//\//_}"
  name="${name%.html}${anchor:+-${anchor#\#}}"
  for width in 1400 420; do
    if [ -n "$anchor" ]; then
      # PAGE#ANCHOR: one screen from that anchor down
      scroll="this.contentDocument.getElementById(\"${anchor#\#}\").scrollIntoView()"
      chrome "$width,1200" --screenshot="$out/$name-$width.png" "$(frame "$page" "$width" 1200 "$scroll")" >/dev/null
      echo "$out/$name-$width.png"
      continue
    fi
    chrome "$width,2400" --screenshot="$out/$name-$width.png" "file://$docs/$page" >/dev/null
    echo "$out/$name-$width.png"
    if [ "$bottom" = 1 ]; then
      # The page in a frame scrolled to its end (a screenshot shows only the top of a page).
      file="$out/$name-$width-bottom.png"
      chrome "$width,1200" --screenshot="$file" "$(frame "$page" "$width" 1200 "this.contentWindow.scrollTo(0, 1e9)")" \
        >/dev/null
      echo "$file"
    fi
  done
done
