"""The web page in a real headless Chromium, driven by Playwright, against a real 2-node cluster: a streamed chat
answer and the cluster picture.

Needs: `.venv/bin/pip install playwright` and `apt-get install -y chromium` (Debian's build at
/usr/bin/chromium; Playwright's own browser download is not used).
"""
from __future__ import annotations
import os
from pathlib import Path
import pytest

CHROMIUM = Path(os.environ.get("EXO_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
MODEL = "smollm2-135m"

sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: .venv/bin/pip install playwright").sync_playwright
if not CHROMIUM.exists(): pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def base_url(api_cluster) -> str: return api_cluster.procs[0].url


# ---------------------------------------------------------------- the test: only the URL from here on

def test_web_ui_chat_and_cluster(base_url: str):
  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 800})
      errors: list[str] = []
      page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
      page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
      page.goto(base_url + "/", wait_until="domcontentloaded")

      # The cluster picture: one card per node and one layer-bar segment per plan stage.
      page.wait_for_selector('#cluster g.node[data-node-id="n1"]', timeout=15_000)
      nodes = page.eval_on_selector_all("#cluster g.node", "els => els.map(e => e.dataset.nodeId)")
      assert sorted(nodes) == ["n0", "n1"], nodes
      segments = page.eval_on_selector_all(
        "#cluster rect.segment", "els => els.map(e => [e.dataset.nodeId, e.dataset.start, e.dataset.end])")
      assert sorted(segments) == [["n0", "0", "15"], ["n1", "15", "30"]], segments
      svg_text = page.text_content("#cluster") or ""
      assert "smollm2-135m" in svg_text and "30 layers" in svg_text, svg_text

      # Chat: the answer streams into an assistant bubble; Send is disabled meanwhile and re-enabled after.
      page.fill("#temperature", "0")  # greedy: a real model answers the same way every run
      page.fill("#prompt", "What is the capital of France?")
      page.click("#send")
      page.wait_for_function(
        """() => {
          const bubbles = document.querySelectorAll('#messages .msg.assistant');
          const last = bubbles[bubbles.length - 1];
          return last && last.textContent.trim().length > 0 && !document.querySelector('#send').disabled;
        }""", timeout=120_000)
      assert page.locator("#messages .msg.user").last.text_content() == "What is the capital of France?"
      answer = page.locator("#messages .msg.assistant").last
      assert "Paris" in (answer.text_content() or ""), answer.text_content()
      assert "error" not in (answer.get_attribute("class") or ""), answer.text_content()
      assert page.is_disabled("#stop")
      assert page.input_value("#prompt") == ""

      page.wait_for_timeout(300)  # let the cursor animation settle for the picture
      page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)
      assert not errors, errors
    finally:
      browser.close()
