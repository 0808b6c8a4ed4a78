"""The painting page in a real headless Chromium against the real Serve app (randomly initialised tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve_helpers import deploy, random_tiny_model, serve_cluster

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model = random_tiny_model(str(tmp_path_factory.mktemp("random_tiny_model")))
    with serve_cluster() as cluster:
        yield deploy({"model_uri": model, "num_cpus": 0.5}, "sdm", "/", cluster.http)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _paint(driver, canvas, offsets: list[tuple[int, int]]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver).move_to_element_with_offset(canvas, *offsets[0]).click_and_hold()
    for dx, dy in offsets[1:]:
        actions = actions.move_to_element_with_offset(canvas, dx, dy)
    actions.release().perform()


def _wait_for_status(driver, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 90).until(lambda d: text in d.find_element("id", "status").text)


def test_paint_generate_and_edit_in_headless_chromium(url, browser):
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    _wait_for_status(browser, "Ready")
    classes = browser.find_elements(By.CSS_SELECTOR, "#classes button")
    assert [c.text for c in classes][:2] == ["0: sky", "1: tree"]

    classes[2].click()
    canvas = browser.find_element(By.ID, "paint")
    _paint(browser, canvas, [(-120, -120), (0, 0), (120, 120)])  # offsets from the canvas centre
    painted = browser.execute_script("return Array.from(ids).filter(v => v === 2).length")
    assert painted > 60  # a connected stroke across the diagonal, not three dots
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "steps").send_keys("5")
    browser.find_element(By.ID, "generate").click()
    _wait_for_status(browser, "Done")
    size = browser.execute_script("const r = document.getElementById('result'); return [r.naturalWidth, r.naturalHeight]")
    assert size == [32, 32]
    assert "seed 0" in browser.find_element(By.ID, "meta").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_page_generate.png"))

    first = browser.execute_script("return document.getElementById('result').src")
    browser.find_element(By.ID, "edit-mode").click()
    _wait_for_status(browser, "Edit mode")
    classes[5].click()
    _paint(browser, canvas, [(-60, 0), (60, 0)])
    assert browser.execute_script("return Array.from(maskBits).filter(v => v).length") > 10
    browser.find_element(By.ID, "generate").click()
    _wait_for_status(browser, "Edited")
    assert browser.execute_script("return document.getElementById('result').src") != first
    browser.save_screenshot(str(ARTIFACTS / "serve_page_edit.png"))
