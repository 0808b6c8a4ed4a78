"""The painting page in a real headless Chromium against the real Serve app, serving two randomly initialised tiny
models that differ in resolution, classes, palette and sampling defaults."""

from __future__ import annotations

import base64
import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from sdm.checkpoint import save_classes, save_model
from sdm.config import get_preset
from sdm.testing import perturbed
from sdm.unet import SDMUNet
from serve_helpers import CLASS_NAMES, PALETTE, deploy, png, random_tiny_model, read_png, serve_cluster

pytestmark = [pytest.mark.ray, pytest.mark.e2e]
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
# tiny-b: the tiny network at another resolution (height 32, width 48), with 4 classes of its own and other defaults
B_NAMES = ["cloud", "rock", "sand", "lava"]
B_PALETTE = [(250, 250, 250), (90, 60, 30), (230, 200, 120), (255, 69, 0)]
B_DEFAULTS = {"guidance_scale": 2.5, "num_inference_steps": 3, "sampler": "dpm++"}
B_TIMESTEPS = 200


def tiny_b_model(path: str) -> str:
    base = get_preset("tiny")
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, image_size=(32, 48), num_classes=len(B_NAMES)),
        diffusion=dataclasses.replace(base.diffusion, num_timesteps=B_TIMESTEPS),
        sampling=dataclasses.replace(base.sampling, guidance_scale=B_DEFAULTS["guidance_scale"],
                                     num_inference_steps=B_DEFAULTS["num_inference_steps"], sampler=B_DEFAULTS["sampler"]),
    ).validate()
    save_model(path, perturbed(SDMUNet(config.model), seed=1), config, metadata={"origin": "random-init"})
    save_classes(path, B_NAMES, B_PALETTE)
    return path


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """One app serving two models: tiny-a (the default; the tiny preset) and tiny-b."""
    model_a = random_tiny_model(str(tmp_path_factory.mktemp("tiny_a")))
    model_b = tiny_b_model(str(tmp_path_factory.mktemp("tiny_b")))
    with serve_cluster() as cluster:
        yield deploy({"models": {"tiny-a": model_a, "tiny-b": model_b}, "num_cpus": 0.5}, "sdm", "/", cluster.http)


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
    """Until the status line says `text`; an error shown instead fails at once, with the page's message."""
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        status = d.find_element("id", "status")
        return text in status.text or "error" in (status.get_attribute("class") or "")

    WebDriverWait(driver, 90).until(shown)
    status = driver.find_element("id", "status").text
    assert text in status, f"waiting for {text!r}, the page says: {status}"


def test_paint_generate_and_edit_in_headless_chromium(url, browser):
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    _wait_for_status(browser, "Ready")
    classes = browser.find_elements(By.CSS_SELECTOR, "#classes button")
    assert [c.text for c in classes][:2] == ["0: sky", "1: tree"]  # the default model's classes

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
    assert "drawn by tiny-a: seed 0" in browser.find_element(By.ID, "meta").text
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


def _page_state(driver) -> dict:
    """What the page shows for the selected model: classes with swatch colours, canvas size, sampling fields."""
    return driver.execute_script("""
        const $ = (id) => document.getElementById(id);
        return {
          classes: Array.from(document.querySelectorAll("#classes button")).map((b) => b.textContent),
          swatches: Array.from(document.querySelectorAll("#classes .swatch"), (s) => getComputedStyle(s).backgroundColor),
          canvas: [$("paint").width, $("paint").height, $("mask").width, $("mask").height],
          shown: [$("paint").clientWidth, $("paint").clientHeight],  // inside the border
          ids: ids.length, painted: Array.from(ids).filter((v) => v !== 0).length,
          corner: Array.from($("paint").getContext("2d").getImageData(0, 0, 1, 1).data),
          guidance: $("guidance").value, steps: $("steps").value, max_steps: $("steps").max,
          sampler: $("sampler").value,
        };""")


def _rgb(colour) -> str:
    return "rgb({}, {}, {})".format(*colour)


def test_model_picker_switches_model_and_generates_with_it(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    browser.get(url + "/")
    _wait_for_status(browser, "Ready")
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.text for o in picker.options] == ["tiny-a (tiny, 32x32)", "tiny-b (tiny, 32x48)"]
    assert picker.first_selected_option.get_attribute("value") == "tiny-a"  # the default: first of `models`
    assert browser.find_element(By.ID, "model").is_enabled()
    a = _page_state(browser)
    assert a["classes"] == [f"{i}: {n}" for i, n in enumerate(CLASS_NAMES)]
    assert a["swatches"] == [_rgb(c) for c in PALETTE]
    assert a["canvas"] == [32, 32, 32, 32] and a["steps"] == "25" and a["sampler"] == "ddim"

    # paint with tiny-a, then switch: tiny-b's classes mean other things, so the map is cleared, not carried over
    browser.find_elements(By.CSS_SELECTOR, "#classes button")[4].click()
    canvas = browser.find_element(By.ID, "paint")
    _paint(browser, canvas, [(-100, -100), (100, 100)])
    assert _page_state(browser)["painted"] > 40
    picker.select_by_value("tiny-b")
    _wait_for_status(browser, "tiny-b selected")
    b = _page_state(browser)
    assert b["classes"] == [f"{i}: {n}" for i, n in enumerate(B_NAMES)]
    assert b["swatches"] == [_rgb(c) for c in B_PALETTE]
    assert b["canvas"] == [48, 32, 48, 32] and b["shown"] == [480, 320]  # width x height, 10 screen pixels a cell
    assert b["ids"] == 32 * 48 and b["painted"] == 0 and b["corner"] == [*B_PALETTE[0], 255]
    assert (b["guidance"], b["steps"], b["sampler"]) == ("2.5", "3", "dpm++")
    assert b["max_steps"] == str(B_TIMESTEPS)  # limits.max_steps: at most the model's timesteps
    assert "of tiny-b" in browser.find_element(By.ID, "model-name").text

    # draw lava across tiny-b's canvas and generate: the page names tiny-b, and its image is tiny-b's for that map
    browser.find_elements(By.CSS_SELECTOR, "#classes button")[3].click()
    canvas = browser.find_element(By.ID, "paint")
    _paint(browser, canvas, [(-220, -140), (0, 0), (220, 140)])
    browser.find_element(By.ID, "seed").clear()
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "generate").click()
    _wait_for_status(browser, "Done")
    assert "drawn by tiny-b: seed 7" in browser.find_element(By.ID, "meta").text
    labels = np.array(browser.execute_script("return Array.from(ids)"), dtype=np.uint8).reshape(32, 48)
    assert set(np.unique(labels)) == {0, 3} and (labels == 3).sum() > 100
    src = browser.execute_script("return document.getElementById('result').src")
    shown = read_png(base64.b64decode(src.split(",", 1)[1]))
    assert shown.shape == (32, 48, 3)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_page_model_b.png"))

    # the same map, seed and parameters straight to the API; and, for contrast, the blank map (sent together: one batch)
    params = {"model": "tiny-b", "seed": "7", "num_inference_steps": "3", "guidance_scale": "2.5", "sampler": "dpm++"}
    with ThreadPoolExecutor(2) as pool:
        direct, blank = pool.map(
            lambda m: requests.post(url + "/v1/generate", files={"label": png(m)}, data=params, timeout=120),
            [labels, np.zeros_like(labels)],
        )
    assert direct.status_code == 200 and blank.status_code == 200, (direct.text, blank.text)
    assert direct.headers["X-SDM-Model"] == "tiny-b"
    np.testing.assert_array_equal(shown, read_png(direct.content))
    # the image depends on the map, so the equality above says the page sent this map (in tiny-b's palette) to tiny-b
    assert not np.array_equal(read_png(blank.content), shown)

    # back to tiny-a: its classes and size return; the result stays labelled with the model that drew it
    picker.select_by_value("tiny-a")
    _wait_for_status(browser, "tiny-a selected")
    back = _page_state(browser)
    assert back["classes"][:2] == ["0: sky", "1: tree"] and back["canvas"] == [32, 32, 32, 32]
    assert (back["steps"], back["sampler"]) == ("25", "ddim")
    assert "drawn by tiny-b" in browser.find_element(By.ID, "meta").text
    browser.find_element(By.ID, "edit-mode").click()  # a 32x48 result cannot be edited by a 32x32 model
    _wait_for_status(browser, "generate with it first")
    assert not browser.find_element(By.ID, "edit-mode").is_selected()


def test_one_model_still_shows_in_the_picker(url, browser):
    """With one model served, the picker shows it (disabled). The deployment's real /v1/models answer, trimmed to its
    default model in the browser before the page reads it: a second app would cost this module seconds of startup."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch;
        window.fetch = async (resource, options) => {
          const res = await realFetch(resource, options);
          if (!String(resource).endsWith("v1/models")) return res;
          const body = await res.json();
          body.models = body.models.filter((m) => m.name === body.default);
          return new Response(JSON.stringify(body), { status: res.status, headers: { "Content-Type": "application/json" } });
        };"""})
    browser.get(url + "/")
    _wait_for_status(browser, "Ready")
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.text for o in picker.options] == ["tiny-a (tiny, 32x32)"]
    assert picker.first_selected_option.get_attribute("value") == "tiny-a"
    assert not browser.find_element(By.ID, "model").is_enabled()
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#classes button")] == [
        f"{i}: {n}" for i, n in enumerate(CLASS_NAMES)
    ]
    assert browser.execute_script("return [document.getElementById('paint').width, info.name]") == [32, "tiny-a"]
