"""Screenshots of a report.html at desktop and phone widths, for the README (`make screenshots`).

Renders the page in headless Chromium (as the report tests do) and writes two small PNGs:
``report-desktop.png`` (1280 px wide) and ``report-phone.png`` (390 px wide, the width of a
common phone). Headless Chromium will not open a window narrower than 500 px, so the phone
shot frames the page in a 390 px wide iframe and keeps that part of the window. Colours are
reduced to a 256-colour palette so the files stay small enough to commit.

    .venv/bin/python scripts/report_screenshots.py build/tiny-demo/report/report.html docs/
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

SHOTS = (("report-desktop.png", 1280, 1700), ("report-phone.png", 390, 2000))
FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe src="{src}" style="border:0; width:{width}px; height:{height}px"></iframe>
</body></html>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    return exe


def shoot(exe: str, url: str, window: tuple[int, int], out: Path, profile: Path) -> None:
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-dev-shm-usage", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                    f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=5000",
                    f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html")
    parser.add_argument("out_dir", type=Path, help="where the PNGs go (docs/)")
    args = parser.parse_args()
    page = args.report.resolve()
    if not page.is_file():
        sys.exit(f"{page} not found: run `make demo` first")
    exe = chromium()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, width, height in SHOTS:
            url, window = page.as_uri(), (width, height)
            if width < 500:
                frame = page.with_name(f".frame-{width}.html")
                frame.write_text(FRAME.format(src=page.name, width=width, height=height),
                                 encoding="utf-8")
                url, window = frame.as_uri(), (500, height)
            raw = work / name
            try:
                shoot(exe, url, window, raw, work / f"profile-{width}")
            finally:
                if width < 500:
                    frame.unlink(missing_ok=True)
            image = Image.open(raw).convert("RGB").crop((0, 0, width, height))
            out = args.out_dir / name
            image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
            print(f"{out}  {width}x{height}  {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
