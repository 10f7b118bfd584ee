"""Screenshots of `alignpipe ui` views, as small PNGs (the docs' pictures in docs/ui-*.png were taken with it).

Starts `alignpipe ui RUNS_DIR` on a free port, opens each view in headless Chromium (selenium, chromium and
chromedriver, as the page tests use) and saves OUT_DIR/ui-<name>.png, reduced to a 96-colour palette:

    .venv/bin/python scripts/ui_screenshots.py runs docs runs=#/ stage=#/stage/tiny/dpo \\
        samples=#/samples/tiny/dpo compare=#/compare/tiny/dpo,tiny/dpo_b 'verdicts=#/stage/tiny/dpo::#verdicts'

A view is NAME=HASH, or NAME=HASH::SELECTOR to scroll that element to the top first.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def start_ui(runs_dir: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "ui", runs_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if " open http://" not in line:
        proc.kill()
        raise SystemExit(f"alignpipe ui did not start: {line}")
    return proc, line.rsplit("open ", 1)[1].strip()


def browser(width: int = 1200, height: int = 860) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(driver, url: str, view: str, out: Path) -> None:
    hash_, _, selector = view.partition("::")
    driver.get(url + hash_)
    end = time.time() + 30
    while time.time() < end and driver.find_element(By.ID, "main").text.strip() in ("", "loading"):
        time.sleep(0.2)
    time.sleep(1.5)  # the curves draw after the page
    if selector:
        driver.execute_script("document.querySelector(arguments[0]).scrollIntoView()", selector)
        time.sleep(0.3)
    driver.save_screenshot(str(out))
    Image.open(out).convert("RGB").quantize(96).save(out, optimize=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    runs_dir, out_dir, views = argv[0], Path(argv[1]), [v.split("=", 1) for v in argv[2:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    proc, url = start_ui(runs_dir)
    driver = browser()
    try:
        for name, view in views:
            out = out_dir / f"ui-{name}.png"
            shoot(driver, url, view, out)
            print(f"{out}: {out.stat().st_size // 1024} kB")
    finally:
        driver.quit()
        proc.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
