"""ComfyUI's own web UI (comfyui-frontend-package 1.58.1, the `ui` extra) in Debian's chromium driven by
Playwright, against a live `sdgraph serve`: the UI boots (object_info, settings, system_stats, /ws), an SD1.5
API workflow is opened through its file input, Run queues it, and the finished image is shown in the UI: the
SaveImage node's preview, an <img> fetched from /api/view for the file the prompt wrote, loaded at its size.
A screenshot of it lands in the test's folder (and, with SDGRAPH_UI_SCREENSHOT=path, a small copy there:
docs/images/serve-ui.png is made so). Skipped, with the reason, where chromium, Playwright or the frontend
package is absent."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.test_serve import live_server, prompt

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = 64  # the workflow's width and height: the shown image must load at this size

# Settings the UI reads at boot (kept by the server, as ComfyUI keeps a user's):
UI_SETTINGS = {
    # A new user gets the first-run templates dialog. It is modal: the rest of the page leaves the
    # accessibility tree, so a Run button not found before the dialog opened is never found (the boot
    # that "sometimes never showed the Run button": the dialog won the race on a loaded machine).
    "Comfy.TutorialCompleted": True,
    "Comfy.VueNodes.Enabled": True,   # nodes as DOM elements: SaveImage's preview is an <img>, not pixels
    "Comfy.Minimap.Visible": False,   # nothing drawn over the graph in the screenshot
}

# The preview <img> of a file named `prefix`*, fetched from /view and decoded (naturalWidth > 0): its src.
SHOWN_IMAGE_JS = """prefix => {
    for (const img of document.querySelectorAll('img')) {
        const url = new URL(img.src, location.href);
        if (url.pathname.endsWith('/view') && (url.searchParams.get('filename') || '').startsWith(prefix)
                && img.complete && img.naturalWidth > 0)
            return [img.src, img.naturalWidth, img.naturalHeight];
    }
    return null;
}"""


def _skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install chromium)"
    try:
        import comfyui_frontend_package  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install playwright 'sdgraph[ui]')"
    return None


def docs_png(screenshot: bytes, path: Path) -> None:
    """The screenshot for the docs: the toolbar and the graph (the empty bottom of the canvas cut off),
    in a 256-colour palette, so it stays well under 300 KB."""
    from PIL import Image

    with Image.open(io.BytesIO(screenshot)) as img:
        small = img.convert("RGB").crop((0, 0, img.width, min(img.height, 600)))
        small.quantize(256).save(path, optimize=True)


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_the_comfyui_frontend_shows_the_finished_image(tmp_path):
    from playwright.async_api import TimeoutError as PlaywrightTimeout
    from playwright.async_api import async_playwright

    workflow = tmp_path / "sd15_api.json"
    workflow.write_text(json.dumps(prompt(seed=3, steps=2, prefix="ui")))

    async def drive(url: str) -> tuple[list, bytes]:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            try:
                await page.goto(url + "/", wait_until="networkidle", timeout=90000)
                run_button = page.get_by_role("button", name="Run").first
                await run_button.wait_for(state="visible", timeout=90000)  # needs system_stats' argv
                await page.wait_for_timeout(1000)  # the app finishes setting up its graph
                await page.locator("input[type=file]").first.set_input_files(str(workflow))
                await page.get_by_text("sd15_api").first.wait_for(timeout=30000)  # its tab: loaded
                await run_button.click(timeout=30000)
                try:
                    shown = await page.wait_for_function(SHOWN_IMAGE_JS, arg="ui", timeout=120000,
                                                         polling=250)
                except PlaywrightTimeout:
                    raise AssertionError("the UI never showed the finished image (no loaded <img> from "
                                         "/view for it within 120 s: see failed.png)") from None
                await page.mouse.click(640, 700)  # the empty canvas has the focus: "." fits the graph in view
                await page.keyboard.press(".")
                await page.wait_for_timeout(1000)
                return await shown.json_value(), await page.screenshot()
            except Exception:
                await page.screenshot(path=str(tmp_path / "failed.png"))  # to see why
                raise
            finally:
                await browser.close()

    with live_server(tmp_path / "root") as srv:
        request = urllib.request.Request(srv["url"] + "/api/settings", data=json.dumps(UI_SETTINGS).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).read()
        (src, width, height), screenshot = asyncio.run(asyncio.wait_for(drive(srv["url"]), 300))
        history = json.loads(urllib.request.urlopen(srv["url"] + "/history", timeout=5).read())
    (tmp_path / "ui.png").write_bytes(screenshot)
    if os.environ.get("SDGRAPH_UI_SCREENSHOT"):
        docs_png(screenshot, Path(os.environ["SDGRAPH_UI_SCREENSHOT"]))
    (item,) = history.values()
    assert item["status"]["status_str"] == "success", item["status"]
    (image,) = item["outputs"]["9"]["images"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(src).query)
    assert query["filename"] == [image["filename"]] and query["type"] == ["output"]  # the prompt's own file
    assert (width, height) == (SIZE, SIZE)
    assert (srv["root"] / "output" / image["filename"]).is_file()
    assert item["prompt"][3].get("client_id")  # the UI's session id: its messages went to it
