// Renders a batch of TeX expressions with the pinned KaTeX (see package.json).
// stdin: JSON [{"tex": "...", "display": true|false}, ...]
// stdout: JSON [{"html": "..."} | {"error": "...", "html": "..."}, ...] in the same order, plus KaTeX's version.
"use strict";
const katex = require("katex");

function render(item) {
  const warnings = [];
  const options = {
    displayMode: Boolean(item.display),
    throwOnError: true,
    output: "htmlAndMathml",
    // Strict-mode complaints (e.g. unicode text in math) are reported as warnings, never silently dropped.
    strict: (code, message) => { warnings.push(`${code}: ${message}`); return "ignore"; },
    trust: false,
  };
  try {
    return { html: katex.renderToString(item.tex, options), warnings };
  } catch (error) {
    const html = katex.renderToString(item.tex, { ...options, throwOnError: false });
    return { error: String(error.message || error), html, warnings };
  }
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const items = JSON.parse(input);
  process.stdout.write(JSON.stringify({ version: katex.version, results: items.map(render) }));
});
