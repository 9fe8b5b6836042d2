"""A report page as a browser shows it: headless Chromium at a common laptop width, saved as PNG.

    python scripts/screenshot_report.py reports/gemma3-270m/report.html -o /tmp/report.png [--height 900]

Needs a `chromium` (Debian: apt-get install -y chromium) or `chromium-browser` / `google-chrome` on PATH.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, png: Path, width: int = 1366, height: int = 900) -> Path:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit(f"error: no browser found (tried {', '.join(BROWSERS)}); apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing of a user's browser is read
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise SystemExit(f"error: {browser} wrote no screenshot")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--width", type=int, default=1366)
    ap.add_argument("--height", type=int, default=900)
    a = ap.parse_args(argv)
    print(screenshot(a.page, a.output, a.width, a.height), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
