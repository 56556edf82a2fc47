#!/usr/bin/env python3
"""`make report-check`: checks a rendered report (reports/<experiment>/index.html) and fails
when
- a link or image points anywhere but a file of the report (a relative path that resolves
  inside the report's folder) or an https URL: `javascript:`, `data:`, `http:`, `//host`,
  absolute paths and `../` are refused however they are spelled (case, entities, tabs or
  spaces a browser would drop);
- the page holds a script, an inline event handler, a frame, an object or a form (a report
  has none);
- and, opened in headless Chromium (Debian's `chromium` package), an image does not load or a
  table is empty.

The static checks run first, on the page as written. For the browser, the page is copied to a
temporary folder with a check script added; the script runs once everything has loaded and
writes its findings into the page, which Chromium's --dump-dom prints."""
import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

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

# Attributes that hold a URL a browser follows or loads.
URL_ATTRIBUTES = {"href", "src", "srcset", "action", "formaction", "poster", "data",
                  "background", "cite", "longdesc", "manifest", "xlink:href", "ping"}
# Elements a report never writes: they run code, embed other documents or send data.
FORBIDDEN = {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "form",
             "base", "link", "svg", "math", "template"}


class Links(html.parser.HTMLParser):
    """Every URL-valued attribute and every forbidden element or attribute of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls = []
        self.forbidden = []

    def handle_starttag(self, tag, attrs):
        if tag in FORBIDDEN:
            self.forbidden.append(f"<{tag}> element")
        for name, value in attrs:
            value = value or ""
            if name.startswith("on"):
                self.forbidden.append(f"{name}= handler on <{tag}>")
            elif name == "style" and re.search(r"url\s*\(|expression\s*\(", value, re.I):
                self.forbidden.append(f"style with a URL on <{tag}>")
            elif tag == "meta" and name == "http-equiv" and value.lower() == "refresh":
                self.forbidden.append("<meta http-equiv=refresh>")
            elif name in URL_ATTRIBUTES:
                parts = value.split(",") if name == "srcset" else [value]
                self.urls.extend((tag, name, p.strip().split(" ")[0]) for p in parts)

    handle_startendtag = handle_starttag


def link_problem(value, report):
    """Why `value` (an attribute's value, entities decoded) is not a link a report may hold."""
    # Browsers drop ASCII tabs and newlines anywhere in a URL and leading or trailing spaces
    # and control characters, so `java\tscript:` and ` javascript:` are `javascript:`.
    url = re.sub(r"[\t\n\r]", "", value).strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b"
                                                  "\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16"
                                                  "\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f ")
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    if scheme:
        if scheme.group(1).lower() == "https" and url.lower().startswith("https://"):
            return None
        return f"a {scheme.group(1).lower()}: link (only files of the report and https)"
    if url.startswith("/") or url.startswith("\\"):
        return "an absolute path (only files of the report and https)"
    if url == "" or url.startswith("#"):
        return None
    path = urllib.parse.unquote(url.split("#")[0].split("?")[0])
    root = os.path.realpath(report)
    target = os.path.realpath(os.path.join(report, path))
    if os.path.commonpath([root, target]) != root:
        return "a path out of the report"
    if not os.path.isfile(target):
        return "a link to a missing file"
    return None


def static_problems(text, report):
    links = Links()
    links.feed(text)
    links.close()
    bad = [f"{what} (a report holds no code)" for what in links.forbidden]
    for tag, name, value in links.urls:
        why = link_problem(value, report)
        if why:
            bad.append(f"<{tag} {name}={value!r}>: {why}")
    return bad


def browser():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("report-check: Chromium is not installed: `apt-get install chromium` (Debian's package)")


def in_chromium(report, text):
    with tempfile.TemporaryDirectory() as work:
        copy = os.path.join(work, "report")
        shutil.copytree(report, copy, symlinks=True)
        index = os.path.join(copy, "index.html")
        with open(index, "w", encoding="utf-8") as f:
            f.write(text.replace("</body>", CHECK + "</body>"))
        dom = subprocess.run(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu",
             "--user-data-dir=" + os.path.join(work, "profile"),
             "--virtual-time-budget=10000", "--dump-dom", "file://" + index],
            capture_output=True, text=True, timeout=300,
        ).stdout
    found = re.search(r'<pre id="report-check">(.*?)</pre>', dom, re.S)
    return json.loads(html.unescape(found.group(1))) if found else None


def main():
    report = sys.argv[1] if len(sys.argv) > 1 else "reports/demo-digits"
    page = os.path.join(report, "index.html")
    if not os.path.isfile(page):
        sys.exit(f"report-check: {page}: no report there (run `make demo` or `mfr report`)")
    with open(page, encoding="utf-8") as f:
        text = f.read()
    bad = static_problems(text, report)
    if bad:
        sys.exit(f"report-check: {page}:\n  " + "\n  ".join(bad))
    result = in_chromium(report, text)
    if result is None:
        sys.exit(f"report-check: {page}: the page did not finish loading in Chromium")
    bad = result["bad"]
    if result["images"] == 0 or result["tables"] == 0:
        bad.append(f"{result['images']} images and {result['tables']} tables: not a report")
    if bad:
        sys.exit(f"report-check: {page}:\n  " + "\n  ".join(bad))
    print(f"report-check: {page}: {result['images']} images loaded, {result['tables']} tables "
          "filled, links stay in the report or use https (Chromium headless)")


if __name__ == "__main__":
    main()
