"""The HTML report in a real headless Chromium: it renders offline, every plot present and drawn.

Skips where no Chromium is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from sweep_output import write_sweep_output

from batch.cli import main

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
    pytest.mark.timeout(180),  # a cold browser start on a busy 2-core machine
]
PLOTS = ("score-cost", "latency", "lengths", "failures", "progress")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         # no name resolves: a page that needed the network would show it
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, timeout=150, check=False,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    write_sweep_output(folder / "sweep.parquet")
    # one report for both tests (run_cli needs the function-scoped capsys)
    try:
        assert main(["report", str(folder / "sweep.parquet"), "-o", str(folder / "report.html"), "-q"]) == 0
    finally:
        root = logging.getLogger()
        root.handlers[:] = [h for h in root.handlers if not getattr(h, "promptmill", False)]
    return folder / "report.html"


def test_every_plot_is_in_the_rendered_dom(report: Path, tmp_path: Path) -> None:
    done = chromium(tmp_path, "--dump-dom", report.as_uri())
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    dom = done.stdout.decode()
    assert "<h1>promptmill report: report-test</h1>" in dom
    assert dom.count("<svg") == len(PLOTS)
    for plot in PLOTS:
        figure = re.search(rf'<figure id="plot-{plot}">(.*?)</figure>', dom, re.S)
        assert figure is not None, plot
        svg = figure.group(1)
        assert svg.startswith("<svg") and "</svg>" in svg, plot
        assert len(re.findall(r"<(?:path|use)\b", svg)) > 20, plot  # axes, ticks, marks and lettering
    assert "<table>" in dom and "small-t7" in dom


def test_screenshot_is_drawn(report: Path, tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")  # matplotlib's own dependency
    shot = tmp_path / "report.png"
    done = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    with image.open(shot) as png:
        assert png.size == (1280, 4000)
        rgb = png.convert("RGB")
        # the plots' colours are there: each variant's (tab10 blue, orange, green) among the pixels
        colors = {c for _, c in rgb.getcolors(maxcolors=1 << 20) or []}
        assert len(colors) > 50
        for variant_color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)):
            assert any(max(abs(a - b) for a, b in zip(c, variant_color, strict=True)) < 8 for c in colors), variant_color
        # and the page is drawn from top to well down: no band of 1,000 px is blank
        for top in range(0, 2000, 500):
            band = rgb.crop((0, top, 1280, top + 1000))
            assert len(band.getcolors(maxcolors=1 << 20) or []) > 2, top
