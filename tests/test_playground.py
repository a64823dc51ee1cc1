"""The playground page in a real headless Chromium against a real server."""

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,  # a headless browser against a server subprocess
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="needs Debian's chromium and chromium-driver "
                                        "(.ci/run installs them)")]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def test_playground_streams_previews_then_final_image(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_server.url + "/")
    assert "stepserve playground" in browser.title
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a large green square at the top right on a black background")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("12")
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") == "done")
    final = browser.find_element(By.ID, "final").get_attribute("src")
    preview = browser.find_element(By.ID, "preview").get_attribute("src")
    assert final.startswith("data:image/png;base64,") and len(final) > 100
    assert preview.startswith("data:image/png;base64,") and preview != final
    assert "Warning" not in status.text
    assert "triangle" in browser.find_element(By.ID, "vocabulary").text  # the words it knows
    prompt.clear()
    prompt.send_keys("a cat on a sofa")  # outside them: served, with the warning shown
    browser.execute_script("document.getElementById('status').dataset.state = ''")
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") == "done")
    assert "names nothing this model knows" in status.text
    caption = browser.find_element(By.ID, "preview-caption").text
    assert caption.startswith("preview 3") and "/12" in caption
    browser.save_screenshot(str(tmp_path / "playground.png"))


def test_playground_shows_errors(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_server.url + "/")
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("500")
    browser.execute_script("document.getElementById('steps').removeAttribute('max')")
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: status.get_attribute("data-state") == "error")
    assert "num_inference_steps" in status.text


def test_playground_edits_the_last_image_inside_a_drawn_mask(live_server, browser):
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def pixels(data_url: str) -> np.ndarray:
        raw = base64.b64decode(data_url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))

    browser.get(live_server.url + "/")
    status = browser.find_element(By.ID, "status")
    browser.find_element(By.ID, "go").click()  # a first image to edit
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") == "done")
    source = pixels(browser.find_element(By.ID, "final").get_attribute("src"))
    browser.find_element(By.ID, "mode-edit").click()
    assert browser.find_element(By.ID, "go").text == "Edit"
    browser.find_element(By.ID, "reuse").click()
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a large blue square in the center on a black background")
    browser.execute_script("const s = document.getElementById('strength'); s.value = '1';"
                           "s.dispatchEvent(new Event('input'))")
    mask = browser.find_element(By.ID, "mask")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "return document.getElementById('mask').width") == source.shape[1])
    chain = ActionChains(browser).move_to_element_with_offset(mask, 40, -100).click_and_hold()
    for dy in range(-100, 101, 10):  # paint a vertical band right of the centre
        chain = chain.move_to_element_with_offset(mask, 40, dy)
        chain = chain.move_to_element_with_offset(mask, 110, dy)
    chain.release().perform()
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") == "done")
    edited = pixels(browser.find_element(By.ID, "final").get_attribute("src"))
    assert edited.shape == source.shape
    w = source.shape[1]
    assert np.array_equal(edited[:, : w // 2], source[:, : w // 2])  # outside the mask: exact
    assert not np.array_equal(edited, source)  # inside it, the edit


def test_playground_offers_the_built_in_adapters_and_applies_one(live_server, browser):
    import base64
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def corners(data_url: str) -> float:
        raw = base64.b64decode(data_url.split(",", 1)[1])
        img = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(float)
        return float(np.mean([img[1, 1], img[1, -2], img[-2, 1], img[-2, -2]]))

    browser.get(live_server.url + "/")
    picker = browser.find_element(By.ID, "lora")
    WebDriverWait(browser, 10).until(lambda d: picker.get_attribute("data-loaded"))
    offered = [o.get_attribute("value") for o in Select(picker).options]
    assert {"", "night", "mirror"} <= set(offered)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("a small red circle in the center on a white background")
    status = browser.find_element(By.ID, "status")
    images = {}
    for choice in ("", "night"):
        Select(picker).select_by_value(choice)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-state") == "done")
        images[choice] = browser.find_element(By.ID, "final").get_attribute("src")
        browser.execute_script("document.getElementById('status').dataset.state = ''")
    assert corners(images[""]) > 200  # white, as prompted
    assert corners(images["night"]) < 60  # the night adapter's black background
