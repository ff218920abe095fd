"""Screenshots of the module picker and the delta report for the docs, and the picker's timing at scale.

Needs chromium + chromedriver (``apt-get install -y chromium chromium-driver``) and selenium (a dev dependency)::

    python examples/screenshots.py            # writes docs/picker.png and docs/report.png
    python examples/screenshots.py --scale    # times the picker on a meta-device Llama-7B in the browser
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deltakit import LoraModel  # noqa: E402
from deltakit.structures import tiny_model  # noqa: E402
from deltakit.web.picker import Picker  # noqa: E402
from deltakit.web.report import delta_report  # noqa: E402


def browser(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def until(driver, condition, timeout: float = 30.0) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.01).until(condition)


def settled(d) -> bool:
    return d.find_element("id", "preview").get_attribute("data-pending") == "0"


def click_row(driver, path: str, css: str) -> None:
    driver.find_element("css selector", f'li.node[data-path="{path}"] > .row {css}').click()


def picker_shot(driver, out: Path) -> None:
    model = tiny_model("llama", num_layers=8)
    with Picker(model, "lora", options={"lora_r": 8}) as picker:
        driver.get(picker.url)
        until(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"))
        until(driver, settled)
        click_row(driver, "LlamaModel/layers/0-7/mlp/down_proj", "input.pick")  # a folded group: 8 more sites
        click_row(driver, "LlamaModel/layers/0-7", ".unfold")
        click_row(driver, "LlamaModel/layers/5", ".toggle")
        click_row(driver, "LlamaModel/layers/5/self_attn", ".toggle")
        click_row(driver, "LlamaModel/layers/5/self_attn/q_proj,o_proj", "input.pick")
        time.sleep(0.3)
        until(driver, settled)
        driver.save_screenshot(str(out))


def report_shot(driver, out: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=6)
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=4, lora_alpha=8)
    with torch.no_grad():  # a stand-in for training: updates that grow with depth, larger on v_proj
        for site in delta.sites:
            depth = int(site.name.split(".")[1])
            site.module.lora_B.normal_(0, 0.05 * (1 + depth) * (2 if "v_proj" in site.name else 1))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        delta_report(delta, html_path=page)
        driver.get(page.as_uri())
        driver.save_screenshot(str(out))


def scale(driver, rounds: int = 5) -> None:
    from benchmarks.injection import llama_config, meta_model

    model = meta_model(llama_config("llama-7b"))
    start = time.perf_counter()
    picker = Picker(model, "lora", options={"lora_r": 16, "lora_alpha": 32}).start()
    print(f"Llama-7B on the meta device: {sum(1 for _ in model.modules()):,} modules; picker ready in "
          f"{time.perf_counter() - start:.2f} s (tree, roles, default plan)")
    loads, previews = [], []
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            driver.get(picker.url)
            until(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-loaded"))
            until(driver, settled)
            loads.append(time.perf_counter() - start)
            box = driver.find_element("css selector",
                                      'li.node[data-path="LlamaForCausalLM/model/layers/0-31/mlp"] > .row input.pick')
            start = time.perf_counter()
            box.click()  # 32 modules at once; the preview waits 120 ms for more clicks before asking Python
            until(driver, lambda d: d.find_element("id", "preview").get_attribute("data-pending") == "1", 5)
            until(driver, settled)
            previews.append(time.perf_counter() - start)
    finally:
        picker.stop()
    print(f"page load to tree and first preview: median {statistics.median(loads):.3f} s, max {max(loads):.3f} s")
    print(f"click to updated preview (incl. 120 ms debounce): median {statistics.median(previews):.3f} s, "
          f"max {max(previews):.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG files (default docs/)")
    parser.add_argument("--scale", action="store_true", help="time the picker on a meta-device Llama-7B instead")
    args = parser.parse_args(argv)
    driver = browser()
    try:
        if args.scale:
            scale(driver)
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        picker_shot(driver, args.out / "picker.png")
        driver.set_window_size(1200, 1400)
        report_shot(driver, args.out / "report.png")
        print(f"wrote {args.out / 'picker.png'} and {args.out / 'report.png'}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
