#!/usr/bin/env python3
"""`make report-check`: opens a rendered report (reports/<experiment>/index.html) in headless
Chromium (Debian's `chromium` package) and fails when an image does not load, a table is empty,
or a link points at a file the report does not hold.

The page is copied to a temporary folder with a check script added; the script runs in the
browser once everything has loaded and writes its findings into the page, which Chromium's
--dump-dom prints."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHECK = """<script>
window.addEventListener('load', () => {
  const bad = [];
  const images = [...document.images];
  for (const i of images) {
    if (!i.complete || i.naturalWidth === 0) bad.push('image did not load: ' + i.getAttribute('src'));
  }
  const tables = [...document.querySelectorAll('table')];
  for (const t of tables) {
    const name = t.caption ? t.caption.textContent.trim() : '(no caption)';
    const cells = [...t.querySelectorAll('td')].map(c => c.textContent.trim());
    if (t.querySelectorAll('tr').length < 2 || cells.every(c => c === '' || c === '-')) {
      bad.push('empty table: ' + name);
    }
  }
  const out = document.createElement('pre');
  out.id = 'report-check';
  out.textContent = JSON.stringify({images: images.length, tables: tables.length, bad});
  document.body.appendChild(out);
});
</script>"""


def browser():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("report-check: Chromium is not installed: `apt-get install chromium` (Debian's package)")


def main():
    report = sys.argv[1] if len(sys.argv) > 1 else "reports/demo-digits"
    page = os.path.join(report, "index.html")
    if not os.path.isfile(page):
        sys.exit(f"report-check: {page}: no report there (run `make demo` or `mfr report`)")
    with tempfile.TemporaryDirectory() as work:
        copy = os.path.join(work, "report")
        shutil.copytree(report, copy)
        index = os.path.join(copy, "index.html")
        with open(index, encoding="utf-8") as f:
            text = f.read()
        with open(index, "w", encoding="utf-8") as f:
            f.write(text.replace("</body>", CHECK + "</body>"))
        dom = subprocess.run(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu",
             "--user-data-dir=" + os.path.join(work, "profile"),
             "--virtual-time-budget=10000", "--dump-dom", "file://" + index],
            capture_output=True, text=True, timeout=300,
        ).stdout
    found = re.search(r'<pre id="report-check">(.*?)</pre>', dom, re.S)
    if not found:
        sys.exit(f"report-check: {page}: the page did not finish loading in Chromium")
    result = json.loads(html.unescape(found.group(1)))
    bad = result["bad"]
    # Links to the report's own files (discrepancy reports, Markdown twins) must resolve.
    for href in re.findall(r'href="([^"#:]+)"', text):
        if not os.path.isfile(os.path.join(report, html.unescape(href))):
            bad.append(f"link to a missing file: {href}")
    if result["images"] == 0 or result["tables"] == 0:
        bad.append(f"{result['images']} images and {result['tables']} tables: not a report")
    if bad:
        sys.exit(f"report-check: {page}:\n  " + "\n  ".join(bad))
    print(f"report-check: {page}: {result['images']} images loaded, {result['tables']} tables filled, links resolve (Chromium headless)")


if __name__ == "__main__":
    main()
