"""ComfyUI's own web UI (comfyui-frontend-package, the `ui` extra) in Debian's chromium driven by Playwright,
against a live `sdgraph serve`: the UI boots (object_info, settings, system_stats, /ws), an SD1.5 API
workflow is opened through its file input, Run queues it, and the prompt succeeds with its image.
Skipped, with the reason, where chromium, Playwright or the frontend package is absent."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request

import pytest

from tests.test_serve import live_server, prompt

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install chromium)"
    try:
        import comfyui_frontend_package  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install playwright 'sdgraph[ui]')"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_the_comfyui_frontend_runs_a_workflow(tmp_path):
    from playwright.async_api import async_playwright

    workflow = tmp_path / "sd15_api.json"
    workflow.write_text(json.dumps(prompt(seed=3, steps=2, prefix="ui")))

    async def drive(url: str) -> None:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                await page.goto(url + "/", wait_until="networkidle", timeout=90000)
                run_button = page.get_by_role("button", name="Run").first
                try:
                    await run_button.wait_for(state="visible", timeout=90000)  # needs system_stats' argv
                except Exception:
                    await page.screenshot(path=str(tmp_path / "failed.png"))  # to see why
                    raise
                await page.wait_for_timeout(3000)  # the app finishes setting up its graph
                await page.keyboard.press("Escape")  # the templates dialog
                await page.locator("input[type=file]").first.set_input_files(str(workflow))
                await page.get_by_text("sd15_api").first.wait_for(timeout=30000)  # its tab: loaded
                await run_button.click(timeout=30000)
                await page.wait_for_timeout(1000)
                await page.screenshot(path=str(tmp_path / "ui.png"))
            finally:
                await browser.close()

    with live_server(tmp_path / "root") as srv:
        try:
            asyncio.run(asyncio.wait_for(drive(srv["url"]), 240))
        except Exception as e:  # noqa: BLE001
            # The frontend's first boot in a fresh chromium sometimes never shows its Run button within 90 s
            # when the whole suite has run before it (seen in 1 of 3 full runs; alone it boots in ~5 s):
            # one more browser, every check below unchanged
            if "Timeout" not in type(e).__name__ + str(e):
                raise
            asyncio.run(asyncio.wait_for(drive(srv["url"]), 240))
        deadline = time.monotonic() + 120
        while True:
            history = json.loads(urllib.request.urlopen(srv["url"] + "/history", timeout=5).read())
            if history:
                break
            assert time.monotonic() < deadline, "the UI queued nothing"
            time.sleep(0.5)
        (item,) = history.values()
        assert item["status"]["status_str"] == "success", item["status"]
        (image,) = item["outputs"]["9"]["images"]
        assert image["filename"].startswith("ui") and (srv["root"] / "output" / image["filename"]).is_file()
        assert item["prompt"][3].get("client_id")  # the UI's session id: its messages went to it
