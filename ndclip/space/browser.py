"""Drive a running Space app in a real browser, as its users meet it: Debian's `chromium`, headless, through
selenium and `chromedriver` (apt: `chromium chromium-driver`; pip: `ndclip[space]`). Used by tests/test_space.py,
and to take the README's screenshot of a Space folder:

    python -m ndclip.space.browser --space_dir my_space/ --image my_space/gallery/0001.png \
        --labels "a red circle, a blue square, a green triangle" --query "a big red circle" \
        --screenshot docs/images/space_app.png

`running_app` starts `python app.py` in the Space folder on 127.0.0.1 and a free port, and stops it; `AppPage` uploads
an image, types labels, runs a search and reads what the page shows (the probability table, the result table, the
gallery's image addresses).
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

STARTUP_TIMEOUT = 300  # seconds for the app to load the model and serve; generous, for a busy machine
ANSWER_TIMEOUT = 120  # seconds for the page to show an answer
# The browser and its driver, overridable by environment variables (another chromium build, Chrome).
BROWSER_VARIABLES = {"CHROMIUM": "chromium", "CHROMEDRIVER": "chromedriver"}
# A table's cells as [[text, ...], ...] rows: Gradio's Dataframe draws them as ARIA grid cells (row, column).
READ_TABLE = """
const rows = [];
for (const cell of document.querySelectorAll(`#${arguments[0]} [role=gridcell]`)) {
    const row = Number(cell.dataset.row), column = Number(cell.dataset.col);
    (rows[row] = rows[row] || [])[column] = cell.innerText.trim();
}
return rows;
"""


def find_browser() -> tuple[str, str] | None:
    """The paths of chromium and chromedriver, or None when either is missing."""
    paths = [os.environ.get(variable) or shutil.which(name) for variable, name in BROWSER_VARIABLES.items()]
    return tuple(paths) if all(paths) else None


def free_port() -> int:
    """A TCP port nobody listens on now (the app binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_app(space_dir: str | Path, log_file: str | Path, env: dict | None = None):
    """`python app.py` serving the Space folder `space_dir` on 127.0.0.1 and a free port, its output in `log_file`;
    yields its URL once it answers, and stops it on exit. Raises `RuntimeError` with the log's end if it exits or
    does not answer within `STARTUP_TIMEOUT` seconds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_file, "w") as log:
        app = subprocess.Popen(
            command, cwd=space_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        wait_until_served(url, app, Path(log_file))
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


def wait_until_served(url: str, app: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise RuntimeError(f"the app exited with status {app.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer at {url} in {STARTUP_TIMEOUT} s:\n{log_file.read_text()[-3000:]}")


@contextmanager
def chromium(browser: tuple[str, str], size: tuple[int, int] = (1400, 1000)):
    """A headless chromium, driven by selenium through `chromedriver` (paths from `find_browser`)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser[0]
    # --no-sandbox: chromium refuses to run as root (containers, CI) with its sandbox on.
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={size[0]},{size[1]}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=browser[1]))
    try:
        yield driver
    finally:
        driver.quit()


class AppPage:
    """The app's page in `driver`, and what a user does on it."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, ANSWER_TIMEOUT)
        self.wait.until(lambda d: d.find_elements("css selector", "#classify"))

    def element(self, css: str):
        return self.driver.find_element("css selector", css)

    def type_into(self, element_id: str, text: str) -> None:
        box = self.element(f"#{element_id} textarea")
        box.clear()
        box.send_keys(text)

    def table(self, element_id: str) -> list[list[str]]:
        return self.driver.execute_script(READ_TABLE, element_id)

    def answer(self, element_id: str, before: list) -> list[list[str]]:
        """The table `element_id` once it differs from `before` (what it showed before the click)."""
        self.wait.until(lambda d: self.table(element_id) not in ([], before))
        return self.table(element_id)

    def classify(self, image: str | Path, labels: str, ensemble: bool = False) -> tuple[list[list[str]], str]:
        """Upload `image` (unless it is already there), type `labels`, tick the ensemble box or not, and press
        Classify; returns the probability table's rows `[label, probability]` and the chart's text."""
        self.open_tab("Zero-shot labels")
        if not self.driver.find_elements("css selector", "#image img"):
            self.element("#image input[type=file]").send_keys(str(Path(image).resolve()))
            self.wait.until(lambda d: d.find_elements("css selector", "#image img"))
        self.type_into("labels", labels)
        box = self.element("#ensemble input[type=checkbox]")
        if box.is_selected() != ensemble:
            box.click()
        before = self.table("probability_table")
        self.element("#classify").click()
        rows = self.answer("probability_table", before)
        return rows, self.element("#probabilities").get_attribute("innerText")

    def search(self, text: str) -> tuple[list[list[str]], list[str]]:
        """Type `text` in the search tab and press Search; returns the result table's rows `[rank, image, cosine]`
        and the addresses of the gallery's images."""
        self.open_tab("Search images by caption")
        self.type_into("query", text)
        before = self.table("search_table")
        self.element("#search").click()
        rows = self.answer("search_table", before)
        self.wait.until(lambda d: len(d.find_elements("css selector", "#gallery img")) == len(rows))
        return rows, [image.get_attribute("src") for image in self.driver.find_elements("css selector", "#gallery img")]

    def open_tab(self, name: str) -> None:
        tab = next(b for b in self.driver.find_elements("css selector", "button[role=tab]") if b.text == name)
        if tab.get_attribute("aria-selected") != "true":
            tab.click()

    def screenshot(self, path: str | Path) -> None:
        """A PNG of the whole page as it is now."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))


def fetch(url: str) -> bytes:
    """The bytes the app serves at `url` (a gallery image)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def take_screenshot(args: argparse.Namespace) -> None:
    """Classify `--image` with `--labels`, run `--query`, and save a screenshot of each tab side by side."""
    browser = find_browser()
    if browser is None:
        sys.exit("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    output = Path(args.screenshot)
    output.parent.mkdir(parents=True, exist_ok=True)
    with running_app(args.space_dir, output.with_suffix(".log")) as url, chromium(browser) as driver:
        page = AppPage(driver, url)
        page.classify(args.image, args.labels, args.ensemble)
        page.screenshot(output.with_name("labels_tab.png"))
        page.search(args.query)
        page.screenshot(output.with_name("search_tab.png"))
    tabs = [Image.open(output.with_name(f"{name}.png")) for name in ("labels_tab", "search_tab")]
    sheet = Image.new("RGB", (sum(tab.width for tab in tabs), max(tab.height for tab in tabs)), "white")
    for i, tab in enumerate(tabs):
        sheet.paste(tab, (i * tabs[0].width, 0))
    sheet.save(output)
    for name in ("labels_tab", "search_tab"):
        output.with_name(f"{name}.png").unlink()
    output.with_suffix(".log").unlink()
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space_dir", required=True, help="a folder written by `ndclip space`")
    parser.add_argument("--image", required=True, help="the image to classify")
    parser.add_argument("--labels", required=True, help="comma-separated labels")
    parser.add_argument("--ensemble", action="store_true", help="tick the prompt-ensemble box")
    parser.add_argument("--query", required=True, help="the caption to search for")
    parser.add_argument("--screenshot", required=True, help="the PNG to write")
    take_screenshot(parser.parse_args(argv))


if __name__ == "__main__":
    main()
