"""Open a report's dashboard.html in headless Chromium and check that it loads, self-contained.

    python scripts/check_dashboard.py outputs/runs/.../dashboard.html --runs 4 --expect "division B4 Q2" \
        --screenshot /tmp/dashboard.png

Checks, on the DOM as Chromium parsed it (``--dump-dom``):
- a title, the run count (``#run-count``, equal to ``--runs`` when given) and at least one table with rows;
- every image is an inline PNG data URI that decodes; no script, stylesheet link, or any src/href/url()
  that leaves the page (only ``data:`` and ``#anchor`` references), so it opens offline, from disk;
- each ``--expect`` text appears in the page text.
``--screenshot`` also renders the page to a PNG and checks it is not blank. Chromium runs with its
network switched off (every host name resolves to nothing), background services disabled and a
throw-away profile. Exit status 0 when every check passes, 1 otherwise (each failure printed).
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--disable-breakpad", "--host-resolver-rules=MAP * ~NOTFOUND")
_URL_ATTRS = {"src", "href", "srcset", "poster", "data", "action", "background"}
_CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]+)")


def find_chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (name if Path(name).exists() else None)
        if path:
            return path
    return None


def chromium(binary: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="dashboard-check-") as profile:
        # Chromium also writes crash-report and dconf folders under XDG dirs: keep those in the temp dir too.
        env = {**os.environ, "XDG_CONFIG_HOME": f"{profile}/config", "XDG_CACHE_HOME": f"{profile}/cache"}
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}/profile", *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


class _Dom(HTMLParser):
    """What the checks need from the DOM: tags, external references, images, text, the run count."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, int] = {}
        self.refs: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.links: list[str] = []
        self.run_count: str | None = None
        self.body_rows = 0
        self._in_tbody = False
        self._in_count = False
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        for name, value in attrs.items():
            if name in _URL_ATTRS and value is not None:
                self.refs.append(value)
            if name == "style" and value:
                self.refs += _CSS_URL.findall(value)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag == "link":
            self.links.append(attrs.get("rel") or "")
        self._in_tbody |= tag == "tbody"
        if tag == "tr" and self._in_tbody:
            self.body_rows += 1
        if attrs.get("id") == "run-count":
            self._in_count, self.run_count = True, ""
        self._in_style |= tag == "style"

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_tbody = False
        if tag == "span" and self._in_count:
            self._in_count = False
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.refs += _CSS_URL.findall(data)
            return
        self.text.append(data)
        if self._in_count:
            self.run_count = (self.run_count or "") + data


def check_dom(dom_html: str, runs: int | None, expect: list[str]) -> list[str]:
    dom = _Dom()
    dom.feed(dom_html)
    problems = []
    text = " ".join(" ".join(dom.text).split())
    if not dom.tags.get("h1"):
        problems.append("no visible title (h1)")
    match = re.search(r"(\d+)\s+runs?", dom.run_count or "")
    if not match:
        problems.append("no run count (#run-count)")
    elif runs is not None and int(match.group(1)) != runs:
        problems.append(f"run count says {match.group(1)}, expected {runs}")
    if not dom.tags.get("table") or dom.body_rows == 0:
        problems.append("no table with rows")
    if dom.tags.get("script"):
        problems.append("the page has scripts")
    if dom.links:
        problems.append(f"the page links other files: {dom.links}")
    external = [r for r in dom.refs if not (r.startswith("data:") or r.startswith("#"))]
    if external:
        problems.append(f"references outside the page (missing offline): {external[:5]}")
    for i, src in enumerate(dom.images):
        head, _, payload = src.partition(",")
        try:
            ok = head == "data:image/png;base64" and base64.b64decode(payload)[:8] == b"\x89PNG\r\n\x1a\n"
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"image {i} is not an inline PNG ({src[:40]!r})")
    problems += [f"text not found: {e!r}" for e in expect if e not in text]
    return problems


def check_screenshot(path: Path) -> list[str]:
    if not path.exists() or path.stat().st_size == 0:
        return [f"no screenshot written to {path}"]
    try:
        from PIL import Image
    except ImportError:  # the file exists; without Pillow its content is not inspected
        return []
    with Image.open(path) as image:
        low, high = image.convert("L").getextrema()
    return [] if high - low > 32 else [f"the screenshot {path} is blank"]


def check(path: Path, runs: int | None = None, expect: tuple[str, ...] = (), screenshot: Path | None = None,
          binary: str | None = None, timeout: float = 60.0) -> list[str]:
    """Every problem found (empty when the dashboard passes)."""
    binary = binary or find_chromium()
    if binary is None:
        return ["Chromium not found (install it: apt-get install -y chromium)"]
    if not path.is_file():
        return [f"{path} does not exist"]
    url = path.resolve().as_uri()
    result = chromium(binary, ["--dump-dom", url], timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        return [f"Chromium could not load {url} (exit {result.returncode}): {result.stderr[-500:]}"]
    problems = check_dom(result.stdout, runs, list(expect))
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        chromium(binary, ["--hide-scrollbars", "--window-size=1400,2200", f"--screenshot={screenshot.resolve()}",
                          url], timeout)
        problems += check_screenshot(screenshot)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dashboard", type=Path)
    parser.add_argument("--runs", type=int, default=None, help="the run count the page must show")
    parser.add_argument("--expect", action="append", default=[], help="a text the page must contain (repeatable)")
    parser.add_argument("--screenshot", type=Path, default=None, help="also render the page to this PNG")
    parser.add_argument("--chromium", default=None, help="the browser binary (default: /usr/bin/chromium)")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    problems = check(args.dashboard, args.runs, tuple(args.expect), args.screenshot, args.chromium, args.timeout)
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"OK: {args.dashboard} loads in headless Chromium, self-contained"
              + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
