"""`sdgraph serve` against a real HTTP/WebSocket client (aiohttp's), on a live server process on 127.0.0.1
with a tiny random checkpoint: ComfyUI's message sequence and JSON shapes (server.py / execution.py), the
cache across prompts, validation answers keyed by the submitted ids, interrupt, queue and history
operations, uploads, refused traversal, the origin check, and 20 queued prompts with nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp")

REPO = Path(__file__).resolve().parents[1]
CKPT = "v1-5-pruned-emaonly.safetensors"
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(root: Path, *extra: str):
    """`sdgraph serve` on a free port of 127.0.0.1 in `root` (a tiny checkpoint in models/), stopped with
    SIGTERM (killed if it lingers) on the way out."""
    from sd.synthetic import make_checkpoint

    (root / "models" / "checkpoints").mkdir(parents=True)
    make_checkpoint(root / "models" / "checkpoints" / CKPT, "tiny", fmt="safetensors", seed=0)
    for name in ("input", "output", "tmp"):
        (root / name).mkdir()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(root / "tmp"))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "serve", "--port", str(port), "--models-dir", "models",
         "--input-dir", "input", "--output-dir", "output", "--cache-dir", "cache", *extra],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        yield {"url": url, "root": root, "proc": proc}
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("serve"), "--max-queue", "25", "--max-upload-mb", "1",
                     "--max-upload-megapixels", "0.05") as s:
        yield s


def prompt(seed: int = 1, steps: int = 2, prefix: str = "serve") -> dict:
    """ComfyUI's default txt2img graph in API format (its own node numbers), 64x64."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def until_done(ws, prompt_id: str) -> list[dict]:
    """Messages until the prompt's success/error/interrupt message, and then ComfyUI's "executing" with node
    None, which comes once the history holds the prompt (as in ComfyUI, the success message comes before);
    the messages returned end with the success/error/interrupt one."""
    out, ended = [], False
    async for msg in ws:
        data = json.loads(msg.data)
        out.append(data)
        if data["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                and data["data"].get("prompt_id") == prompt_id:
            ended = True
        if ended and data["type"] == "executing" and data["data"].get("node") is None \
                and data["data"].get("prompt_id") == prompt_id:
            return out[:-1]
    raise AssertionError(f"socket closed; got {out}")


async def queue_and_wait(url: str, body: dict, client_id: str = "tester") -> tuple[str, list[dict]]:
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
        first = json.loads((await ws.receive()).data)
        assert first["type"] == "status" and first["data"]["sid"] == client_id
        async with s.post(f"{url}/prompt", json=body | {"client_id": client_id}) as r:
            answer = await r.json()
            assert r.status == 200, answer
        assert answer["node_errors"] == {} and isinstance(answer["number"], int)
        return answer["prompt_id"], await until_done(ws, answer["prompt_id"])


async def get(url: str, path: str, **params):
    async with aiohttp.ClientSession() as s, s.get(url + path, params=params) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.read())


async def post(url: str, path: str, body=None, headers=None):
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body, headers=headers) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


@pytest.mark.slow
def test_queue_progress_executed_view_history(server):
    url = server["url"]
    pid, msgs = run(queue_and_wait(url, {"prompt": prompt(seed=1)}))
    types = [m["type"] for m in msgs]
    assert types.index("execution_start") < types.index("execution_cached") < types.index("executing")
    assert types[-1] == "execution_success"
    executing = [m["data"]["node"] for m in msgs
                 if m["type"] == "executing" and m["data"]["prompt_id"] == pid]
    assert set(executing) <= {"3", "4", "5", "6", "7", "8", "9"} and {"3", "8", "9"} <= set(executing)
    progress = [m["data"] for m in msgs if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 2, "3"), (2, 2, "3")]
    assert all(m["data"]["prompt_id"] == pid for m in msgs if m["type"] != "status")
    executed = [m["data"] for m in msgs if m["type"] == "executed"]
    assert [e["node"] for e in executed] == ["9"]
    image = executed[0]["output"]["images"][0]
    assert set(image) == {"filename", "subfolder", "type"} and image["type"] == "output"
    for prefix in ("", "/api"):
        status, png = run(get(url, prefix + "/view", **image))
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (server["root"] / "output" / image["filename"]).is_file()
    status, history = run(get(url, f"/history/{pid}"))
    entry = history[pid]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["outputs"]["9"]["images"] == [image]
    assert len(entry["prompt"]) == 5 and entry["prompt"][1] == pid and entry["prompt"][4] == ["9"]
    assert [m[0] for m in entry["status"]["messages"]][0] == "execution_start"
    _, jobs = run(get(url, "/api/jobs"))
    assert any(j["id"] == pid and j["status"] == "completed" for j in jobs["jobs"])
    _, queue = run(get(url, "/queue"))
    assert queue == {"queue_running": [], "queue_pending": []}


@pytest.mark.slow
def test_new_seed_reruns_only_the_sampler_onward(server):
    url = server["url"]
    run(queue_and_wait(url, {"prompt": prompt(seed=11)}))
    pid, msgs = run(queue_and_wait(url, {"prompt": prompt(seed=12)}))
    cached = next(m["data"]["nodes"] for m in msgs if m["type"] == "execution_cached")
    executing = {m["data"]["node"] for m in msgs
                 if m["type"] == "executing" and m["data"]["prompt_id"] == pid}
    assert {"4", "5", "6", "7"} <= set(cached)
    assert executing == {"3", "8", "9"}


def _node_errors(url: str, p) -> dict:
    status, body = run(post(url, "/prompt", {"prompt": p}))
    assert status == 400, body
    assert set(body) == {"error", "node_errors"} and {"type", "message"} <= set(body["error"])
    return body


@pytest.mark.parametrize("case", ["bad_type", "too_large", "huge_size", "unknown_class", "cycle",
                                  "missing_input", "bad_link"])
def test_hostile_prompts_are_node_errors(server, case):
    url = server["url"]
    p = prompt()
    node = "3"
    if case == "bad_type":
        p["3"]["inputs"]["steps"] = "many"
    elif case == "too_large":
        p["3"]["inputs"]["cfg"] = 1e9
    elif case == "huge_size":
        p["5"]["inputs"].update(width=2**20, height=2**20)
        node = "5"
    elif case == "unknown_class":
        p["3"]["class_type"] = "NoSuchSampler"
    elif case == "cycle":
        p["6"]["inputs"]["clip"] = ["10", 0]
        p["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["11", 0], "stop_at_clip_layer": -1}}
        p["11"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["10", 0], "stop_at_clip_layer": -1}}
        node = None
    elif case == "missing_input":
        del p["3"]["inputs"]["seed"]
    elif case == "bad_link":
        p["3"]["inputs"]["model"] = ["4", 7]
    body = _node_errors(url, p)
    errors = body["node_errors"]
    if node is None:
        assert errors.keys() & {"6", "10", "11"} or "cycle" in json.dumps(body).lower()
    else:
        assert node in errors, body
        assert errors[node]["class_type"] == p[node]["class_type"]
        assert errors[node]["errors"][0]["message"]
    assert not any(k.startswith(("sampler_", "latent_")) for k in errors)  # the submitted ids, not ours
    assert run(get(url, "/system_stats"))[0] == 200


@pytest.mark.parametrize("body", [{}, {"prompt": []}, {"prompt": {"1": 5}}, {"prompt": "x"},
                                  {"prompt": {"1": {"class_type": "SaveImage", "inputs": []}}}])
def test_malformed_bodies(server, body):
    status, answer = run(post(server["url"], "/prompt", body))
    assert status == 400 and "error" in answer and "node_errors" in answer


def test_input_errors_name_the_comfy_input(server):
    p = prompt()
    p["3"]["inputs"]["steps"] = 0
    body = _node_errors(server["url"], p)
    assert body["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] == "steps"
    assert body["error"]["type"] == "prompt_outputs_failed_validation"


async def _interrupt_flow(url: str):
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/ws?clientId=int") as ws:
        await ws.receive()
        long = prompt(seed=5, steps=5000, prefix="interrupted")
        async with s.post(f"{url}/prompt", json={"prompt": long, "client_id": "int"}) as r:
            pid = (await r.json())["prompt_id"]
        pending = []
        for seed in (6, 7, 8):
            async with s.post(f"{url}/prompt", json={"prompt": prompt(seed=seed, prefix="never")}) as r:
                pending.append((await r.json())["prompt_id"])
        async for msg in ws:  # wait until it samples
            if json.loads(msg.data)["type"] == "progress":
                break
        async with s.get(f"{url}/api/queue") as r:
            queue = await r.json()
        assert [e[1] for e in queue["queue_running"]] == [pid]
        assert [e[1] for e in queue["queue_pending"]] == pending
        assert all(len(e) == 5 for e in queue["queue_pending"])
        async with s.get(f"{url}/prompt") as r:
            assert (await r.json())["exec_info"]["queue_remaining"] == 4
        async with s.post(f"{url}/queue", json={"delete": [pending[0]]}) as r:
            assert r.status == 200
        async with s.get(f"{url}/queue") as r:
            assert [e[1] for e in (await r.json())["queue_pending"]] == pending[1:]
        async with s.post(f"{url}/queue", json={"clear": True}) as r:
            assert r.status == 200
        async with s.post(f"{url}/interrupt", json={"prompt_id": "someone-else"}):
            pass  # not the running prompt: ignored
        async with s.post(f"{url}/interrupt") as r:
            assert r.status == 200
        msgs = await until_done(ws, pid)
        async with s.get(f"{url}/history/{pid}") as r:
            history = await r.json()
        async with s.get(f"{url}/queue") as r:
            queue = await r.json()
        return pid, msgs, history, queue


@pytest.mark.slow
def test_interrupt_and_queue_operations(server):
    pid, msgs, history, queue = run(_interrupt_flow(server["url"]))
    last = msgs[-1]
    assert last["type"] == "execution_interrupted" and last["data"]["node_id"] == "3"
    assert last["data"]["node_type"] == "KSampler"
    steps = [m["data"]["value"] for m in msgs if m["type"] == "progress"]
    assert len(steps) < 5000
    assert history[pid]["status"]["status_str"] == "error" and history[pid]["status"]["completed"] is False
    assert queue == {"queue_running": [], "queue_pending": []}
    out = server["root"] / "output"
    assert not list(out.glob("interrupted*")) and not list(out.glob("never*"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_bounded_queue(server):
    url = server["url"]

    async def flow():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/prompt", json={"prompt": prompt(seed=90, steps=5000, prefix="q")}) as r:
                running = (await r.json())["prompt_id"]
            statuses = []
            for seed in range(26):
                async with s.post(f"{url}/prompt", json={"prompt": prompt(seed=100 + seed, prefix="q")}) as r:
                    statuses.append((r.status, await r.json()))
            await s.post(f"{url}/queue", json={"clear": True})
            await s.post(f"{url}/interrupt", json={"prompt_id": running})
            return statuses

    statuses = run(flow())
    assert [s for s, _ in statuses].count(200) <= 25 and statuses[-1][0] == 503
    assert statuses[-1][1]["error"]["type"] == "queue_full"


@pytest.mark.slow
def test_history_delete_and_clear(server):
    url = server["url"]
    pid, _ = run(queue_and_wait(url, {"prompt": prompt(seed=31)}))
    assert pid in run(get(url, "/history"))[1]
    assert len(run(get(url, "/history", max_items="1"))[1]) == 1
    run(post(url, "/history", {"delete": [pid]}))
    assert pid not in run(get(url, "/history"))[1]
    run(post(url, "/api/history", {"clear": True}))
    assert run(get(url, "/history"))[1] == {}


def _png(size=(32, 32), color=(200, 10, 10, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, "PNG")
    return buf.getvalue()


async def _upload(url: str, path: str, data: bytes, name: str, **fields):
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for k, v in fields.items():
        form.add_field(k, v)
    async with aiohttp.ClientSession() as s, s.post(url + path, data=form) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


def test_uploads(server):
    url, inputs = server["url"], server["root"] / "input"
    status, answer = run(_upload(url, "/upload/image", _png(), "cat.png"))
    assert status == 200 and answer == {"name": "cat.png", "subfolder": "", "type": "input"}
    status, again = run(_upload(url, "/api/upload/image", _png(), "cat.png"))
    assert again["name"] == "cat (1).png"  # ComfyUI's rule: never overwrite unless asked
    status, _ = run(_upload(url, "/upload/image", _png(color=(0, 0, 0, 255)), "cat.png", overwrite="true"))
    assert status == 200 and len(list(inputs.glob("cat*.png"))) == 2
    status, sub = run(_upload(url, "/upload/image", _png(), "../../escape.png", subfolder="pets"))
    assert status == 200 and sub["subfolder"] == "pets"  # the client may percent-encode the name's slashes
    assert (inputs / "pets" / sub["name"]).is_file() and sub["name"].endswith("escape.png")
    assert not list(server["root"].parent.glob("escape.png")) and not (server["root"] / "escape.png").exists()
    assert run(_upload(url, "/upload/image", _png(), "x.png", subfolder="../.."))[0] == 403
    assert run(_upload(url, "/upload/image", b"not an image", "x.png"))[0] == 400
    assert run(_upload(url, "/upload/image", _png(size=(300, 300)), "big.png"))[0] == 400  # > 0.05 MP
    assert run(_upload(url, "/upload/image", os.urandom(2 * 2**20), "huge.png"))[0] == 413  # > 1 MB
    assert not (inputs / "big.png").exists() and not (inputs / "huge.png").exists()
    status, png = run(get(url, "/view", filename="cat.png", type="input"))
    assert status == 200 and png[:4] == b"\x89PNG"
    # a mask: the original with the mask's alpha (ComfyUI's /upload/mask)
    status, masked = run(_upload(url, "/upload/mask", _png(color=(0, 0, 0, 7)), "cat_mask.png",
                                 original_ref=json.dumps({"filename": "cat.png", "type": "input"})))
    assert status == 200
    from PIL import Image

    with Image.open(inputs / masked["name"]) as img:
        assert img.mode == "RGBA" and img.getpixel((3, 3))[3] == 7
    _, info = run(get(url, "/object_info/LoadImage"))
    assert "cat.png" in info["LoadImage"]["input"]["required"]["image"][0]


def test_view_never_leaves_its_folder(server, tmp_path):
    url, root = server["url"], server["root"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    (root / "output" / "link.png").symlink_to(secret)
    (root / "output" / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    refused = [dict(filename="../server.log"), dict(filename=str(secret)), dict(filename="x", subfolder=".."),
               dict(filename="link.png"), dict(filename="secret.png", subfolder="linkdir"),
               dict(filename="../../etc/passwd", type="input"), dict(filename="a\x00.png"),
               dict(filename="..\\server.log")]
    for params in refused:
        status, body = run(get(url, "/view", **params))
        assert status in (400, 403, 404), (params, status)
        assert body != secret.read_bytes()
    assert run(get(url, "/view", filename="server.log", type="nowhere"))[0] == 400
    assert run(get(url, "/view", filename="missing.png"))[0] == 404


def test_origin_check(server):
    url = server["url"]
    host = url.split("//")[1]
    assert run(post(url, "/prompt", {"prompt": prompt()}, {"Origin": "http://evil.example"}))[0] == 403
    assert run(post(url, "/interrupt", None, {"Sec-Fetch-Site": "cross-site"}))[0] == 403
    status, _ = run(post(url, "/interrupt", None, {"Origin": f"http://{host}"}))
    assert status == 200


def test_what_the_frontend_and_clients_read(server):
    url = server["url"]
    for prefix in ("", "/api"):
        status, stats = run(get(url, prefix + "/system_stats"))
        assert status == 200 and isinstance(stats["system"]["argv"], list)
        assert {"os", "python_version", "comfyui_version", "ram_total"} <= set(stats["system"])
        assert {"name", "type", "vram_total", "vram_free"} <= set(stats["devices"][0])
    assert run(get(url, "/api/users"))[1] == {"storage": "server", "migrated": True}
    assert run(post(url, "/api/settings", {"Comfy.Theme": "dark"}))[0] == 200
    assert run(get(url, "/api/settings"))[1]["Comfy.Theme"] == "dark"
    assert run(get(url, "/api/settings/Comfy.Theme"))[1] == "dark"
    assert run(get(url, "/extensions"))[1] == []
    assert "max_upload_size" in run(get(url, "/features"))[1]
    assert run(get(url, "/embeddings"))[1] == []
    assert "checkpoints" in run(get(url, "/models"))[1]
    assert run(get(url, "/models/checkpoints"))[1] == [CKPT]
    assert run(get(url, "/models/nowhere"))[0] == 404
    _, info = run(get(url, "/object_info"))
    ks = info["KSampler"]
    assert ks["input"]["required"]["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000, "step": 1}]
    assert "euler" in ks["input"]["required"]["sampler_name"][0]
    assert ks["output"] == ["LATENT"] and ks["category"] == "sampling" and not ks["output_node"]
    assert info["SaveImage"]["output_node"] is True
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CKPT]
    assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert "LoadCheckpoint" not in info  # listed under ComfyUI's class name only
    assert set(run(get(url, "/object_info/KSampler"))[1]) == {"KSampler"}


def test_feature_flags_answered(server):
    async def flow():
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{server['url']}/ws") as ws:
            hello = json.loads((await ws.receive()).data)
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            answer = json.loads((await ws.receive()).data)
            return hello, answer

    hello, answer = run(flow())
    assert hello["type"] == "status" and hello["data"]["sid"]
    assert answer["type"] == "feature_flags" and "max_upload_size" in answer["data"]


@pytest.mark.slow  # ~5 s
def test_twenty_queued_prompts_none_lost_or_duplicated(server):
    url = server["url"]

    async def flow():
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/ws?clientId=load") as ws:
            await ws.receive()
            ids = []
            for seed in range(20):
                body = {"prompt": prompt(seed=1000 + seed, prefix="load"), "client_id": "load"}
                async with s.post(f"{url}/prompt", json=body) as r:
                    ids.append((await r.json())["prompt_id"])
            done, images = set(), {}
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "executed":
                    images.setdefault(m["data"]["prompt_id"], []).extend(m["data"]["output"]["images"])
                if m["type"] in ("execution_success", "execution_error"):
                    assert m["type"] == "execution_success", m
                    done.add(m["data"]["prompt_id"])
                    if done == set(ids):
                        return ids, images

    ids, images = run(flow())
    assert len(set(ids)) == 20 and set(images) == set(ids)
    names = [img["filename"] for pid in ids for img in images[pid]]
    assert len(names) == 20 and len(set(names)) == 20
    assert sorted(p.name for p in (server["root"] / "output").glob("load*.png")) == sorted(names)


@pytest.mark.slow
def test_comfy_api_simplified_unchanged(server, tmp_path):
    """A ComfyUI client from PyPI (comfy-api-simplified), used as it is: a titled workflow, a seed set by
    title, queue-and-wait over its own WebSocket, the images fetched through /history and /view."""
    cas = pytest.importorskip("comfy_api_simplified")
    titled = {cid: body | {"_meta": {"title": body["class_type"]}}
              for cid, body in prompt(prefix="cas").items()}
    titled["9"]["_meta"]["title"] = "Save Image"
    workflow = cas.ComfyWorkflowWrapper(titled)
    workflow.set_node_param("KSampler", "seed", 4242)
    api = cas.ComfyApiWrapper(server["url"])
    images = api.queue_and_wait_images(workflow, "Save Image")
    assert len(images) == 1
    (name, png), = images.items()
    assert name.startswith("cas") and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (server["root"] / "output" / name).read_bytes() == png
    (tmp_path / "dog.png").write_bytes(_png())
    assert api.upload_image(tmp_path / "dog.png")["subfolder"] == "default_upload_folder"
    assert "KSampler" in api.get_object_info("KSampler")
    assert "argv" in api.get_system_stats()["system"]


@pytest.mark.slow
def test_preview_image_is_a_temp_image(server):
    p = prompt(seed=8)
    p["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    pid, msgs = run(queue_and_wait(server["url"], {"prompt": p}))
    executed = [m["data"] for m in msgs if m["type"] == "executed"]
    image = executed[0]["output"]["images"][0]
    assert executed[0]["node"] == "9" and image["type"] == "temp"
    status, png = run(get(server["url"], "/view", **image))
    assert status == 200 and png[:4] == b"\x89PNG"
    assert run(get(server["url"], f"/history/{pid}"))[1][pid]["outputs"]["9"]["images"] == [image]


@pytest.mark.slow
def test_a_taken_port_and_a_public_address_are_reported(server):
    """--listen other than loopback warns (no authentication); a port in use is one clear error, exit 1."""
    port = server["url"].rsplit(":", 1)[1]
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "serve", "--listen", "0.0.0.0",
                           "--port", port, "--cache-dir", str(server["root"] / "cache")],
                          cwd=server["root"], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    assert "warning: listening on 0.0.0.0" in proc.stderr
    assert f"error: cannot listen on 0.0.0.0:{port}" in proc.stderr


@pytest.mark.slow
def test_two_worker_processes(tmp_path):
    """--workers 2 on the CPU: two prompts run at once (two in queue_running), an interrupt stops both,
    then six queued prompts complete with six distinct images."""

    async def flow(url):
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{url}/ws?clientId=w") as ws:
            await ws.receive()
            long_ids = []
            for seed in (1, 2):
                body = {"prompt": prompt(seed=seed, steps=5000, prefix="long"), "client_id": "w"}
                async with s.post(f"{url}/prompt", json=body) as r:
                    long_ids.append((await r.json())["prompt_id"])
            sampling = set()
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "progress":
                    sampling.add(m["data"]["prompt_id"])
                    if sampling == set(long_ids):
                        break
            async with s.get(f"{url}/queue") as r:
                running = {e[1] for e in (await r.json())["queue_running"]}
            await s.post(f"{url}/interrupt")
            ids = []
            for seed in range(6):
                body = {"prompt": prompt(seed=50 + seed, prefix="short"), "client_id": "w"}
                async with s.post(f"{url}/prompt", json=body) as r:
                    ids.append((await r.json())["prompt_id"])
            ends, images = {}, []
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "executed":
                    images += [i["filename"] for i in m["data"]["output"]["images"]]
                if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    ends[m["data"]["prompt_id"]] = m["type"]
                    if set(ends) >= set(ids) | set(long_ids):
                        return running, long_ids, ids, ends, images

    with live_server(tmp_path, "--workers", "2") as srv:
        running, long_ids, ids, ends, images = run(flow(srv["url"]))
        assert running == set(long_ids)
        assert all(ends[i] == "execution_interrupted" for i in long_ids)
        assert all(ends[i] == "execution_success" for i in ids)
        assert len(images) == 6 == len(set(images))
        assert sorted(p.name for p in (tmp_path / "output").glob("*.png")) == sorted(images)
    from graph.distributed.world import nvidia_gpu_count
    from nodes.server.workers import current_device, gpu_plan

    _, note = gpu_plan(2, current_device(), nvidia_gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    log = (tmp_path / "server.log").read_text()
    assert log.count("workers share") == (0 if note is None else 1) and (note is None or note in log)
    assert "imported before sdgraph" not in log  # each worker set its BLAS up before MLX, as the CLI does


@pytest.mark.slow
def test_worker_processes_load_the_extra_nodes(tmp_path, monkeypatch):
    """SDGRAPH_EXTRA_NODES reach the worker processes too: a prompt of toy nodes runs in one of them."""
    monkeypatch.setenv("SDGRAPH_EXTRA_NODES", str(REPO / "tests" / "graph_toy_nodes.py"))
    toy = {"1": {"class_type": "Const", "inputs": {"value": 2.5}},
           "2": {"class_type": "WriteNumber", "inputs": {"x": ["1", 0], "prefix": "extra"}}}
    with live_server(tmp_path, "--workers", "2") as srv:
        _, msgs = run(queue_and_wait(srv["url"], {"prompt": toy}))
        assert msgs[-1]["type"] == "execution_success", msgs[-1]
    assert (tmp_path / "output" / "extra.txt").read_text() == "2.5"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's memory")
def test_a_hundred_prompts_a_burst_and_flat_memory(tmp_path):
    """100 prompts with varying seeds, posted as a concurrent burst while 8 WebSocket clients listen: every
    prompt succeeds once with its own image, a prompt's messages reach only the client that queued it, and
    the server's resident memory after the second 50 is within a bound of what it was after the first 50."""

    async def batch(url: str, seeds: range) -> tuple[list[str], list[set]]:
        async with aiohttp.ClientSession() as s:
            sockets = [await s.ws_connect(f"{url}/ws?clientId=c{i}") for i in range(8)]

            async def post_one(seed: int) -> str:
                body = {"prompt": prompt(seed=seed, prefix="burst"), "client_id": "c0"}
                async with s.post(f"{url}/prompt", json=body) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["prompt_id"]

            ids = await asyncio.gather(*(post_one(seed) for seed in seeds))
            seen: list[set] = [set() for _ in sockets]

            async def listen(i: int, ws) -> None:
                async for msg in ws:
                    m = json.loads(msg.data)
                    if m["type"] == "execution_success":
                        seen[i].add(m["data"]["prompt_id"])
                        if i == 0 and seen[0] >= set(ids):
                            return

            others = [asyncio.create_task(listen(i, ws)) for i, ws in enumerate(sockets) if i]
            await listen(0, sockets[0])
            await asyncio.sleep(0.5)  # anything sent to the others meanwhile has arrived
            for task in others:
                task.cancel()
            for ws in sockets:
                await ws.close()
            return ids, seen

    with live_server(tmp_path, "--max-queue", "100") as srv:
        first, seen = run(batch(srv["url"], range(50)))
        assert seen[0] == set(first) and all(not other for other in seen[1:])  # messages go to the sender
        before = _rss_mb(srv["proc"].pid)
        second, _ = run(batch(srv["url"], range(50, 100)))
        after = _rss_mb(srv["proc"].pid)
        history = json.loads(urllib.request.urlopen(srv["url"] + "/history", timeout=5).read())
    ids = first + second
    assert len(set(ids)) == 100 and set(history) == set(ids)
    assert all(item["status"]["status_str"] == "success" for item in history.values())
    names = [img["filename"] for item in history.values() for img in item["outputs"]["9"]["images"]]
    assert len(names) == 100 == len(set(names)) == len(list((tmp_path / "output").glob("burst*.png")))
    assert after - before < 150, f"resident memory grew from {before:.0f} MB to {after:.0f} MB"
