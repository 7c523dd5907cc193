"""Open an HTML file in real headless Chromium (Debian ``chromium``; scripts/test.sh installs
it when missing): load checks written into the DOM, and screenshots.

:func:`check_page` copies the page with a small script first in ``<head>`` that records
script errors, ``console.error`` calls and images that fail to load, and, once the page has
loaded, every image's natural size; Chromium's ``--dump-dom`` then hands back the DOM with
that record in ``<pre id="ehrgpt-check">``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t.tagName ? 'failed to load ' + t.tagName + ' ' +
    String(t.src || t.href).slice(0, 60) : 'error: ' + e.message);
}, true);
window.addEventListener('unhandledrejection', function (e) {
  window.__errors.push('rejection: ' + e.reason);
});
(function () {
  var orig = console.error;
  console.error = function () {
    window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return orig.apply(console, arguments);
  };
})();
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (im) {
    return {alt: im.alt, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight};
  });
  var pre = document.createElement('pre');
  pre.id = 'ehrgpt-check';
  pre.textContent = JSON.stringify({errors: window.__errors, images: imgs});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = chromium()
    assert exe, "chromium is not installed (scripts/test.sh installs the Debian package)"
    return subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_page(page: Path) -> dict:
    """Load ``page`` in headless Chromium; returns ``{"errors": [...], "images": [...],
    "console": [...]}`` (console: Chromium's own log lines about console errors)."""
    text = Path(page).read_text()
    probed = re.sub(r"<head>", "<head>" + _PROBE, text, count=1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(probed)
        done = _run(
            [
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=10000",
                "--dump-dom",
                copy.as_uri(),
            ],
            Path(tmp) / "profile",
        )
    match = re.search(r'<pre id="ehrgpt-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"no check result in the DOM; chromium said: {done.stderr[-2000:]}"
    result = json.loads(
        match.group(1)
        .replace("&quot;", '"')
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
    )
    result["console"] = [
        line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()
    ]
    return result


def screenshot(page: Path, png: Path, *, width: int = 1200, height: int = 1800) -> Path:
    """A PNG of the top ``width x height`` pixels of ``page``."""
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                f"--screenshot={png}",
                f"--window-size={width},{height}",
                "--hide-scrollbars",
                "--virtual-time-budget=10000",
                Path(page).resolve().as_uri(),
            ],
            Path(tmp) / "profile",
        )
    return png
