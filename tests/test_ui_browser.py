"""The web UI in a real browser: Debian's headless Chromium driven by selenium through Debian's chromium-driver
(nothing downloaded). The server is started as users start it (`python -m finetune.ui`); the page starts a tiny
run, the step counter advances and a sample grid appears, the run is stopped (SIGTERM: it checkpoints and exits),
a second tiny run finishes, and a prompt sampled from it brings images. Screenshots go to the test's folder, and
with FINETUNE_UI_SCREENSHOTS=1 also to docs/images/ui-runs.png and ui-sample.png (the README shows them).

Chromium missing is a failure, not a skip: CI must run this (.ci/run installs it). To run it alone:
    python -m pytest tests/test_ui_browser.py -q
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import TINY_RUN, wait_for_port

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "apt-get install -y chromium chromium-driver"
# Debian's flags for a browser that talks to nothing but the page: no sandbox (root in CI), no GPU, no QUIC, no
# first-run, background, component-update or sync traffic.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT = 180  # seconds for anything a run must do first (two cores, maybe shared)


def _executable(name: str, env: str) -> str:
    found = os.environ.get(env) or shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                                          else None)
    if not found:
        pytest.fail(f"{name} not found: this test needs Debian's Chromium and its driver; install them with "
                    f"`{INSTALL}` (as root; .ci/run does), or set {env} to the executable")
    return found


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _executable("chromium", "FINETUNE_CHROMIUM"), _executable("chromedriver",
                                                                                     "FINETUNE_CHROMEDRIVER")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1280,1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`python -m finetune.ui` on a free port, over an empty output root; yields (url, output root)."""
    port, root = _free_port(), tmp_path / "outputs"
    root.mkdir()
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen([sys.executable, "-m", "finetune.ui", "--root", str(root), "--configs",
                                str(ROOT / "configs"), "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    wait_for_port(port, process, tmp_path / "server.log")
    yield f"http://127.0.0.1:{port}/", root
    process.terminate()
    process.wait(timeout=30)
    log.close()


def _wait(driver, condition, what: str, timeout: float = TIMEOUT):
    """Poll `condition(driver)` until it is true; fail naming `what` and showing the page's state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.2)
    state = driver.execute_script("return [document.getElementById('state').textContent, "
                                  "document.getElementById('state-detail').textContent, "
                                  "document.getElementById('log').textContent, "
                                  "document.getElementById('start-error').textContent]")
    pytest.fail(f"timed out waiting for {what}; the page says {state}")


def _text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def _step(driver) -> int | None:
    text = _text(driver, "step")
    return int(text.split("/")[0]) if "/" in text else None


def _start(driver, overrides: list[str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "config")).select_by_value("shapes.yaml")
    box = driver.find_element(By.ID, "overrides")
    box.clear()
    box.send_keys("\n".join(overrides))
    driver.find_element(By.ID, "start").click()


def _shot(driver, tmp_path: Path, name: str) -> None:
    """Save a screenshot as a test artefact, and for the README when FINETUNE_UI_SCREENSHOTS=1."""
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    if os.environ.get("FINETUNE_UI_SCREENSHOTS") == "1":
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ROOT / "docs" / "images" / f"{name}.png"))


def test_start_watch_stop_and_sample_in_chromium(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, root = server
    started = time.monotonic()
    browser.get(url)
    assert "finetune" in browser.title
    _wait(browser, lambda d: "shapes.yaml" in _text(d, "config"), "the configs list")

    # A config mistake is refused on the page, naming the key.
    _start(browser, ["train.max_train_step=10"])
    _wait(browser, lambda d: "did you mean train.max_train_steps" in _text(d, "start-error"), "the config error")

    # A tiny run: the step counter advances, a sample grid and the process strips appear.
    tiny = [*TINY_RUN, "validation.validation_steps=20", "train.checkpointing_steps=0"]
    _start(browser, [*tiny, "train.max_train_steps=100000", f"train.output_dir={root / 'watched'}"])
    _wait(browser, lambda d: _text(d, "run-name") == "watched", "the new run to open")
    _wait(browser, lambda d: _text(d, "state") == "running", "the run to be running")
    first = _wait(browser, _step, "a first step")
    _wait(browser, lambda d: (_step(d) or 0) > first, "the step counter to advance")
    shown = "const i = document.getElementById('{}'); return !i.hidden && i.complete && i.naturalWidth > 0"
    _wait(browser, lambda d: d.execute_script(shown.format("grid")), "a sample grid")
    _wait(browser, lambda d: d.execute_script(shown.format("reverse")), "the reverse-process strip")
    assert "sample grid at step" in _text(browser, "grid-caption")
    assert browser.execute_script("return document.querySelectorAll('#curve polyline').length") == 2
    assert "/" in _text(browser, "step") and _text(browser, "speed") != "–" and _text(browser, "eta") != "–"
    _shot(browser, tmp_path, "ui-runs")

    # Stop: SIGTERM, a checkpoint, a clean exit.
    browser.find_element(By.ID, "stop").click()
    _wait(browser, lambda d: _text(d, "state") == "stopped", "the run to stop")
    assert list((root / "watched").glob("checkpoint-*"))

    # A second tiny run that finishes, then images sampled from it.
    _start(browser, [*tiny, "train.max_train_steps=4", f"train.output_dir={root / 'finished'}"])
    _wait(browser, lambda d: _text(d, "run-name") == "finished" and _text(d, "state") == "finished",
          "the second run to finish")
    browser.find_element(By.ID, "tab-sample").click()
    assert browser.find_element(By.ID, "sample-form").is_displayed()
    assert not browser.find_element(By.ID, "runs-view").is_displayed()
    _wait(browser, lambda d: "finished" in _text(d, "sample-run"), "the finished run among the results")
    Select(browser.find_element(By.ID, "sample-run")).select_by_value("finished")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a blue square")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("10")
    browser.find_element(By.ID, "sample-button").click()
    loaded = ("const images = [...document.querySelectorAll('#sample-images img')]; "
              "return images.length === 4 && images.every(i => i.complete && i.naturalWidth > 0)")
    _wait(browser, lambda d: d.execute_script(loaded), "four sampled images", timeout=120)
    assert "4 images from finished" in _text(browser, "sample-status")
    assert len(list((root / "finished" / "samples" / "ui").glob("00-a-blue-square-*.png"))) == 4
    _shot(browser, tmp_path, "ui-sample")

    # No script error, no content-security-policy violation, no failed request but the refused config.
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and not ("/api/start" in entry["message"] and "status of 400" in entry["message"])]
    assert not errors, errors
    print(f"browser test: {time.monotonic() - started:.1f} s; screenshots in {tmp_path}")
