#!/usr/bin/env bash
# Headless Chromium screenshots of the docs, to look at the layout (CI does not run this).
#   apt-get install -y chromium fonts-noto-cjk   # Debian packages; the CJK fonts show the Korean pages
#   bash docs/_generator/screenshots.sh [OUT_DIR] [DOCS_DIR] [PAGE ...]
# Each page is shot at a desktop width (1400 px) and a narrow, phone-like width (420 px).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(realpath -m "${1:-/tmp/labml-docs-screens}")"
docs="$(realpath "${2:-$here/..}")"
shift $(( $# > 2 ? 2 : $# ))
pages=("$@")
if [ ${#pages[@]} -eq 0 ]; then
  pages=(transformers/feedback/index.html transformers/feedback/experiment.html transformers/feedback/readme.html
         ko/transformers/feedback/index.html ko/transformers/feedback/experiment.html
         ko/transformers/feedback/readme.html index.html)
fi
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "chromium is not installed (apt-get install -y chromium)" >&2; exit 2; }
mkdir -p "$out"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
for page in "${pages[@]}"; do
  [ -f "$docs/$page" ] || { echo "skip $page (not built)" >&2; continue; }
  name="${page//\//_}"
  for size in 1400,2400 420,2400; do
    file="$out/${name%.html}-${size%%,*}.png"
    "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync \
      --user-data-dir="$profile" --hide-scrollbars --window-size="$size" \
      --screenshot="$file" "file://$docs/$page" >/dev/null 2>&1
    echo "$file"
  done
done
