"""Open a report folder's index.html in headless Chromium: every image must load, every link must resolve.

    python bench/report_browser.py /tmp/pysafe-demo --screenshot docs/img/report.png

Images are checked by the browser itself (a copy of the page gets a small script that, once the page has
loaded, records each <img>'s natural size); links are checked against the folder (``file://`` pages may
not fetch each other in Chromium). Exits 1 with one line per problem. Needs Debian's ``chromium`` (or
``CHROMIUM=/path/to/chrome``). The pytest marker ``browser`` runs the same check (tests/test_report_html.py)
and is skipped where no browser is installed.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img").forEach(function (im) {
    out.push({src: im.getAttribute("src"), ok: im.complete && im.naturalWidth > 0, w: im.naturalWidth});
  });
  var pre = document.createElement("pre");
  pre.id = "pysafe-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.anchors, self.scripts = [], [], set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        if a.get("id"):
            self.anchors.add(a["id"])
        if tag == "script":
            self.scripts += 1


def static_check(folder: Path) -> tuple[list[str], _Links]:
    """Problems found without a browser: links that do not resolve, network references, scripts."""
    page = (folder / "index.html").read_text(encoding="utf-8")
    p = _Links()
    p.feed(page)
    problems = []
    for ref in p.links + p.images:
        u = urllib.parse.urlparse(ref)
        if u.scheme or u.netloc:
            problems.append(f"{ref}: points outside the folder (the page must work offline)")
            continue
        if ref.startswith("#"):
            if ref[1:] not in p.anchors:
                problems.append(f"{ref}: no such anchor in the page")
            continue
        target = folder / urllib.parse.unquote(u.path)
        if not target.exists():
            problems.append(f"{ref}: no such file in {folder}")
    if p.scripts:
        problems.append(f"index.html has {p.scripts} <script> element(s); it must need none")
    return problems, p


def browser_check(folder: Path, screenshot: Path | None = None, exe: str | None = None, width: int = 1280,
                  height: int = 1800, timeout: float = 120) -> tuple[list[str], list[dict]]:
    """Load the page in headless Chromium; returns (problems, per-image results)."""
    exe = exe or chromium()
    if exe is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium, or set CHROMIUM)")
    page = (folder / "index.html").read_text(encoding="utf-8")
    probe = folder / f".index-probe-{os.getpid()}.html"  # beside index.html, so relative paths stay valid
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--virtual-time-budget=10000", f"--window-size={width},{height}"]
    with tempfile.TemporaryDirectory() as prof:
        flags.append(f"--user-data-dir={prof}")
        try:
            res = subprocess.run([exe, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                                 timeout=timeout)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([exe, *flags, f"--screenshot={screenshot.resolve()}",
                                (folder / "index.html").resolve().as_uri()], capture_output=True, timeout=timeout,
                               check=True)
        finally:
            probe.unlink(missing_ok=True)
    dom = res.stdout
    start = dom.find('<pre id="pysafe-probe">')
    if start < 0:
        return [f"the browser did not finish loading the page (exit {res.returncode}): "
                f"{(res.stderr.strip().splitlines() or ['no output'])[-1]}"], []
    text = dom[start + len('<pre id="pysafe-probe">'):dom.index("</pre>", start)]
    images = json.loads(html.unescape(text))
    problems = [f"{im['src']}: image did not load in the browser" for im in images if not im["ok"]]
    return problems, images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--screenshot", type=Path, default=None, help="Write a PNG of the top of the page.")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1800)
    a = ap.parse_args(argv)
    problems, parsed = static_check(a.folder)
    more, images = browser_check(a.folder, a.screenshot, width=a.width, height=a.height)
    problems += more
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{a.folder}/index.html: {len(images)} images loaded in Chromium"
          f" ({sum(im['ok'] for im in images)} ok), {len(parsed.links)} links checked, {len(problems)} problems"
          + (f"; screenshot {a.screenshot}" if a.screenshot else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
