"""comfy-catapult (PyPI), a ComfyUI job scheduler, used unchanged against a live `sdgraph serve`, as its
README's example uses it: ComfyAPIClient + ComfyCatapult submit an API-format prompt with an important
node, the future resolves with the prompt's /history entry (which catapult parses with pydantic as
ComfyUI's shapes: the 5-element queue/history tuples), and DownloadPreviewImage fetches the image over
/view through its comfy+http:// remote."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.test_serve import TIMEOUT, live_server, prompt

pytest.importorskip("comfy_catapult")


@pytest.mark.slow
def test_comfy_catapult_unchanged(tmp_path):
    from anyio import Path as APath
    from comfy_catapult.api_client import ComfyAPIClient
    from comfy_catapult.catapult import ComfyCatapult
    from comfy_catapult.comfy_schema import APIHistoryEntry, APIQueueInfo, APIWorkflow
    from comfy_catapult.comfy_utils import DownloadPreviewImage
    from comfy_catapult.remote_file_api_comfy import ComfySchemeRemoteFileAPI
    from comfy_catapult.remote_file_api_generic import GenericRemoteFileAPI

    class Client(ComfyAPIClient):
        """Its client, telling when catapult's poll loop has read /queue (a poll has just ended)."""

        polled: asyncio.Event

        async def GetQueue(self):  # noqa: N802 (catapult's name)
            queue = await super().GetQueue()
            self.polled.set()
            return queue

    workflow = APIWorkflow.model_validate(prompt(seed=77, prefix="catapult")).model_dump()
    local = tmp_path / "fetched.png"

    async def flow(url: str):
        async with Client(comfy_api_url=url) as client:
            client.polled = asyncio.Event()
            stats = await client.GetSystemStats()
            remote = GenericRemoteFileAPI()
            remote.Register(ComfySchemeRemoteFileAPI(comfy_api_urls=[url], overwrite=True))
            async with ComfyCatapult(comfy_client=client, debug_path=None) as catapult:
                info = await client.GetObjectInfo()  # as its README's example reads the ckpt_name choices
                assert "v1-5-pruned-emaonly.safetensors" in info.root["CheckpointLoaderSimple"] \
                    .input.required["ckpt_name"].type
                # catapult polls /queue every 2 s and registers a job before its POST /prompt answers: a
                # poll landing in between fails the job ("prompt_id is None", its own race, ComfyUI's too),
                # so submit just after a poll, with the next 2 s away
                await asyncio.wait_for(client.polled.wait(), TIMEOUT)
                job_id = f"sdgraph-{uuid.uuid4()}"
                _, future = await catapult.Catapult(job_id=job_id, prepared_workflow=workflow,
                                                    important=["9"], use_future_api=True)
                history = await asyncio.wait_for(future, TIMEOUT)
            entry = APIHistoryEntry.model_validate(history)
            await DownloadPreviewImage(node_id="9", job_history=entry, field_path="images[0]",
                                       comfy_api_url=url, remote=remote, local_dst_path=APath(local))
            queue = await client.GetQueue()  # ComfyUI's 5-element entries, parsed by catapult's model
            return stats, entry, queue

    with live_server(tmp_path / "root") as srv:
        stats, entry, queue = asyncio.run(asyncio.wait_for(flow(srv["url"]), TIMEOUT))
        out = srv["root"] / "output"
        saved = list(out.glob("catapult*.png"))
    assert stats.system is not None and stats.system.os
    assert entry.status is not None and entry.status.status_str == "success" and entry.status.completed
    assert entry.prompt is not None and entry.prompt.outputs_to_execute == ["9"]
    assert isinstance(queue, APIQueueInfo) and queue.queue_running == [] and queue.queue_pending == []
    (image,) = entry.outputs["9"].root["images"]
    assert image["filename"].startswith("catapult") and image["type"] == "output"
    assert len(saved) == 1 and local.read_bytes() == saved[0].read_bytes()
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
