"""The picker and the report in a real browser (headless Chromium + Selenium): what a person clicks is what Python
receives. Skipped without chromium/chromedriver/selenium, except under CI=true where that fails (conftest)."""

from __future__ import annotations

from pathlib import Path

from deltakit import LoraModel, find_modules
from deltakit.structures import tiny_model
from deltakit.web.picker import Picker
from deltakit.web.preview import plan_preview
from deltakit.web.report import delta_report
from tests.helpers import perturb

TIMEOUT = 20


def wait_ready(driver, sites: int | None = None) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d) -> bool:
        pane = d.find_element("id", "preview")
        if pane.get_attribute("data-pending") != "0" or d.find_element("id", "error").is_displayed():
            return bool(d.find_element("id", "error").is_displayed() and pane.get_attribute("data-pending") == "0")
        return sites is None or d.find_element("id", "sites-count").text == str(sites)

    WebDriverWait(driver, TIMEOUT).until(ready)


def node(driver, path: str):
    return driver.find_element("css selector", f'li.node[data-path="{path}"]')


def row_part(driver, path: str, css: str):
    return node(driver, path).find_element("css selector", f":scope > .row {css}")


def test_pick_in_the_browser(browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    model = tiny_model("llama", num_layers=4)
    picker = Picker(model, "lora", options={"lora_r": 4}).start()
    try:
        browser.get(picker.url)
        WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"))
        wait_ready(browser, sites=8)  # the default positions (attn.q, attn.v) are ticked
        assert browser.find_element("id", "patterns").text.replace("\n", "").replace(" ", "") == '["q_proj","v_proj"]'
        browser.find_element("id", "clear").click()
        wait_ready(browser, sites=0)
        # expand the folded layer group into its members, open layer 2 and tick a folded pair inside it
        row_part(browser, "LlamaModel/layers/0-3", ".unfold").click()
        row_part(browser, "LlamaModel/layers/2", ".toggle").click()
        row_part(browser, "LlamaModel/layers/2/self_attn", ".toggle").click()
        row_part(browser, "LlamaModel/layers/2/self_attn/q_proj,o_proj", "input.pick").click()
        wait_ready(browser, sites=2)
        params_two = browser.find_element("id", "params-count").text
        # fold back and tick a group of the folded template: gate_proj and up_proj of all four layers
        row_part(browser, "LlamaModel/layers/0-3", ".unfold").click()
        row_part(browser, "LlamaModel/layers/0-3/mlp", ".toggle").click()
        row_part(browser, "LlamaModel/layers/0-3/mlp/gate_proj,up_proj", "input.pick").click()
        wait_ready(browser, sites=10)
        chosen = sorted(["layers.2.self_attn.q_proj", "layers.2.self_attn.o_proj"]
                        + [f"layers.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj")])
        expected = plan_preview(LoraModel, model, chosen, None, {"lora_r": 4})
        assert browser.find_element("id", "params-count").text == f"{expected['parameters']:,}" != params_two
        assert browser.find_element("id", "share").text.endswith("%")
        browser.find_element("id", "submit").click()
        result = picker.wait(timeout=TIMEOUT)
        assert result is not None
        matched = [n for n, _ in find_modules(model, result.modified_modules)]
        assert result.sites == matched == [s["module"] for s in expected["sites"]]
        assert sorted(result.sites) == chosen
        WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element("id", "done").is_displayed())
    finally:
        picker.stop()


def test_the_report_page(browser, tmp_path: Path) -> None:
    model = tiny_model("llama", num_layers=3)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4)
    perturb(delta)
    page = tmp_path / "report.html"
    data = delta_report(delta, html_path=page)
    browser.get(page.as_uri())
    assert browser.title == "deltakit report: lora on LlamaModel"
    rows = browser.find_elements("css selector", "table.sites tr")
    assert len(rows) == 1 + len(delta.sites)
    assert len(browser.find_elements("css selector", "table.heat tr")) == 1 + len(data["layers"])
    sites = browser.find_elements("css selector", "#tree li.site")
    assert any("q_proj" in e.get_attribute("textContent") for e in sites)
    badges = [e.text for e in browser.find_elements("css selector", "#tree .hits") if e.is_displayed()]
    assert "3/6 sites" in badges  # the folded q_proj,o_proj of three layers: q_proj carries the delta
    unfold = next(e for e in browser.find_elements("css selector", "#tree li.members > details > summary")
                  if e.is_displayed())
    unfold.click()  # a folded group opens into its members
    assert unfold.find_element("xpath", "..").get_attribute("open") is not None
    assert "Every update is exactly zero" not in browser.page_source
