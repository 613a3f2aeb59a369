"""`sdgraph serve`: ComfyUI's HTTP + WebSocket API on aiohttp, in front of one queue and one executor.

Routes and JSON shapes follow ComfyUI's server.py (every route also under `/api`, as ComfyUI registers
them); messages on `/ws` carry the submitted prompt's node ids. Safe by default: loopback only unless told,
ComfyUI's origin check against cross-site requests, bounded bodies, uploads, queue and history, and every
client-named path kept inside its folder (nodes/server/files.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from aiohttp import WSMsgType, web

from graph.context import Folders
from graph.executor import Executor
from nodes.images import preview_dir
from nodes.server import files
from nodes.server.object_info import FOLDER_NAMES, model_files, object_info
from nodes.server.prompts import PromptRejected, prepare_prompt
from nodes.server.queue import PromptQueue, QueueFull, Worker, image_ref

MAX_SOCKETS = 256
MAX_JSON_BYTES = 16 * 2**20   # a prompt or settings body; uploads have their own bound


def is_loopback(host: str | None) -> bool:
    """A literal loopback address or `localhost` (ComfyUI also resolves other names; a name that resolves
    to loopback from elsewhere is the Host an attacker's page sends anyway, and is compared below)."""
    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def origin_only(request: web.Request, handler):
    """ComfyUI's check (create_origin_only_middleware): a browser on another site may POST to 127.0.0.1;
    then its Origin differs from the Host it reached, and the request is refused."""
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return web.Response(status=403, text="cross-site request refused")
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_domain = host.lower()
        origin_domain = urllib.parse.urlparse(origin).netloc.lower()
        if is_loopback(urllib.parse.urlsplit("//" + host_domain).hostname) and host_domain != origin_domain:
            return web.Response(status=403, text="cross-origin request refused")
    return await handler(request)


def _bad(kind: str, message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message, "details": "", "extra_info": {}},
                              "node_errors": {}}, status=status)


class Server:
    def __init__(self, folders: Folders, executor: Executor, *, max_queue: int = 100,
                 max_upload_bytes: int = 50 * 2**20, max_pixels: int = 64 * 2**20,
                 argv: list[str] | None = None, workers: int = 1, cache_dir=None, no_cache: bool = False,
                 worker_entry=None):
        self.folders = folders
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.argv = list(argv if argv is not None else sys.argv)
        self.queue = PromptQueue(max_queue)
        self.dirs = {"output": Path(folders.output_dir), "input": Path(folders.input_dir),
                     "temp": preview_dir()}
        if workers > 1:
            from nodes.server.workers import WorkerPool

            self.worker = WorkerPool(workers, self.queue, self.send, folders, self.dirs, cache_dir, no_cache,
                                     entry=worker_entry)
        else:
            self.worker = Worker(self.queue, executor, self.send, image_ref(self.dirs))
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.settings: dict = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="sdgraph-validate")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.outbox: asyncio.Queue | None = None

    @property
    def features(self) -> dict:
        return {"supports_preview_metadata": False, "max_upload_size": self.max_upload_bytes}

    # -- messages ---------------------------------------------------------------------------------

    def send(self, event: str, data: dict, sid: str | None) -> None:
        """Thread-safe: queue a message for one client (sid) or all; one task sends them in order."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, (event, data, sid))

    async def _sender(self) -> None:
        while True:
            event, data, sid = await self.outbox.get()
            message = json.dumps({"type": event, "data": data})
            if sid:
                targets = [self.sockets[sid]] if sid in self.sockets else []
            else:
                targets = list(self.sockets.values())
            for ws in targets:
                try:
                    await ws.send_str(message)
                except (ConnectionError, RuntimeError):
                    pass

    def status_data(self, sid: str | None = None) -> dict:
        data: dict = {"status": {"exec_info": {"queue_remaining": self.queue.remaining()}}}
        return data | {"sid": sid} if sid else data

    # -- app ----------------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[origin_only], client_max_size=max(self.max_upload_bytes,
                                                                             MAX_JSON_BYTES))
        r = self.routes()
        for method, path, handler in r:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        frontend = frontend_dir()
        if frontend is not None:
            app.router.add_get("/", self.index)
            app.router.add_static("/", frontend)
        else:
            app.router.add_get("/", self.no_frontend)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    def routes(self) -> list[tuple[str, str, object]]:
        return [
            ("GET", "/ws", self.websocket),
            ("GET", "/prompt", self.get_prompt), ("POST", "/prompt", self.post_prompt),
            ("GET", "/queue", self.get_queue), ("POST", "/queue", self.post_queue),
            ("POST", "/interrupt", self.interrupt),
            ("GET", "/history", self.get_history), ("GET", "/history/{prompt_id}", self.get_history),
            ("POST", "/history", self.post_history),
            ("GET", "/view", self.view),
            ("POST", "/upload/image", self.upload_image), ("POST", "/upload/mask", self.upload_mask),
            ("GET", "/object_info", self.get_object_info),
            ("GET", "/object_info/{node_class}", self.get_object_info),
            ("GET", "/system_stats", self.system_stats),
            ("GET", "/embeddings", self.embeddings),
            ("GET", "/models", self.models), ("GET", "/models/{folder}", self.models),
            ("GET", "/extensions", self.extensions),
            ("GET", "/features", self.get_features),
            ("GET", "/users", self.users),
            ("GET", "/settings", self.get_settings), ("POST", "/settings", self.post_settings),
            ("GET", "/settings/{setting_id}", self.get_settings),
            ("POST", "/settings/{setting_id}", self.post_settings),
            ("GET", "/userdata", self.userdata_list), ("GET", "/userdata/{file}", self.userdata_file),
            ("GET", "/i18n", self.i18n),
            ("GET", "/workflow_templates", self.empty_object),
            ("GET", "/global_subgraphs", self.empty_object),
            ("GET", "/experiment/models", self.extensions),
            ("GET", "/jobs", self.jobs), ("GET", "/jobs/{job_id}", self.jobs),
        ]

    async def _startup(self, app: web.Application) -> None:
        self.loop = asyncio.get_running_loop()
        self.outbox = asyncio.Queue()
        app["sender"] = asyncio.create_task(self._sender())

    async def _shutdown(self, app: web.Application) -> None:
        for ws in list(self.sockets.values()):
            await ws.close()
        app["sender"].cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- websocket ----------------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self.sockets) >= MAX_SOCKETS:
            return web.Response(status=503, text="too many WebSocket clients")
        ws = web.WebSocketResponse(max_msg_size=2**20, heartbeat=30)
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        sid = sid if len(sid) <= 128 else uuid.uuid4().hex
        self.sockets[sid] = ws
        try:
            await ws.send_json({"type": "status", "data": self.status_data(sid)})
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    await ws.send_json({"type": "feature_flags", "data": self.features})
        finally:
            if self.sockets.get(sid) is ws:
                del self.sockets[sid]
        return ws

    # -- prompts and the queue -----------------------------------------------------------------------

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response({"exec_info": {"queue_remaining": self.queue.remaining()}})

    async def post_prompt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _bad("invalid_prompt", "the body is not JSON")
        if not isinstance(body, dict):
            return _bad("invalid_prompt", "the body must be a JSON object")
        extra = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        if isinstance(body.get("client_id"), str):
            extra = extra | {"client_id": body["client_id"]}
        extra = {"create_time": int(time.time() * 1000)} | extra
        prompt_id = body.get("prompt_id")
        if not (isinstance(prompt_id, str) and 0 < len(prompt_id) <= 128):
            prompt_id = str(uuid.uuid4())
        number = self.queue.next_number(front=bool(body.get("front")))
        try:
            job = await self.loop.run_in_executor(self.pool, prepare_prompt, body.get("prompt"), self.folders,
                                                  number, prompt_id, extra)
        except PromptRejected as e:
            return web.json_response(e.body, status=400)
        try:
            self.queue.put(job, front=bool(body.get("front")))
        except QueueFull as e:
            return _bad("queue_full", str(e), status=503)
        self.send("status", self.status_data(), None)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue.snapshot()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _json_body(self, request: web.Request) -> dict:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if body.get("clear"):
            self.queue.clear()
        if isinstance(body.get("delete"), list):
            self.queue.delete(body["delete"])
        self.send("status", self.status_data(), None)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        prompt_id = body.get("prompt_id") if isinstance(body.get("prompt_id"), str) else None
        self.worker.interrupt(prompt_id)
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        if "prompt_id" in request.match_info:
            return web.json_response(self.queue.history_items(prompt_id=request.match_info["prompt_id"]))
        try:
            max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        except ValueError:
            max_items = None
        return web.json_response(self.queue.history_items(max_items))

    async def post_history(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if body.get("clear"):
            self.queue.delete_history()
        if isinstance(body.get("delete"), list):
            self.queue.delete_history(body["delete"])
        return web.Response(status=200)

    async def jobs(self, request: web.Request) -> web.Response:
        """ComfyUI's /api/jobs (comfy_execution/jobs.py; newer frontends read queue and history through it):
        absent values are left out, as ComfyUI's prune_dict does (the frontend's schema refuses nulls)."""
        running, pending = self.queue.snapshot()
        history = self.queue.history_items()
        wanted = request.match_info.get("job_id")
        jobs = [_job(e, "in_progress") for e in running] + [_job(e, "pending") for e in pending]
        jobs += [_history_job(pid, item, pid == wanted) for pid, item in reversed(history.items())]
        if wanted is not None:
            found = [j for j in jobs if j["id"] == wanted]
            if not found:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(found[0])
        try:
            offset = max(0, int(request.query.get("offset", 0)))
            limit = int(request.query["limit"]) if "limit" in request.query else None
        except ValueError:
            offset, limit = 0, None
        page = jobs[offset:offset + limit] if limit is not None else jobs[offset:]
        return web.json_response({"jobs": page, "pagination": {
            "offset": offset, "limit": limit, "total": len(jobs),
            "has_more": offset + len(page) < len(jobs)}})

    # -- files ----------------------------------------------------------------------------------------

    def _folder(self, kind: str | None) -> Path | None:
        return self.dirs.get(kind or "output")

    async def view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        folder = self._folder(q.get("type"))
        if folder is None or not q.get("filename"):
            return web.Response(status=400, text="give filename and a type of output, input or temp")
        try:
            path = files.safe_path(folder, q.get("subfolder", ""), q["filename"])
        except files.PathRefused as e:
            return web.Response(status=403, text=str(e))
        if not path.is_file():
            return web.Response(status=404)
        return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"',
                                               "X-Content-Type-Options": "nosniff"})

    async def _read_upload(self, request: web.Request):
        try:
            post = await request.post()
        except web.HTTPRequestEntityTooLarge:
            raise
        except ValueError as e:
            raise web.HTTPBadRequest(text=f"not a multipart form: {e}") from e
        image = post.get("image")
        if not hasattr(image, "file"):
            raise web.HTTPBadRequest(text="no 'image' file in the form")
        data = image.file.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_upload_bytes, actual_size=len(data))
        kind = post.get("type") or "input"
        folder = self._folder(kind if isinstance(kind, str) else None)
        if folder is None:
            raise web.HTTPBadRequest(text="type must be input, temp or output")
        return post, image.filename or "upload.png", data, kind, folder

    def _written(self, folder: Path, post, name: str, data: bytes, kind: str) -> web.Response:
        subfolder = post.get("subfolder") or ""
        overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
        try:
            name, subfolder = files.write_upload(folder, str(subfolder), name, data, overwrite)
        except files.PathRefused as e:
            return web.Response(status=403, text=str(e))
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def upload_image(self, request: web.Request) -> web.Response:
        post, name, data, kind, folder = await self._read_upload(request)
        try:
            files.check_image(data, self.max_pixels)
        except ValueError as e:
            return web.Response(status=400, text=str(e))
        return self._written(folder, post, name, data, kind)

    async def upload_mask(self, request: web.Request) -> web.Response:
        post, name, data, kind, folder = await self._read_upload(request)
        try:
            ref = json.loads(post.get("original_ref") or "")
            original = files.safe_path(self._folder(ref.get("type")) or folder, ref.get("subfolder", ""),
                                       ref["filename"])
        except files.PathRefused as e:
            return web.Response(status=403, text=str(e))
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.Response(status=400, text="original_ref must name the image the mask belongs to")
        if not original.is_file():
            return web.Response(status=404, text="the original image is not there")
        try:
            data = files.masked_png(original, data, self.max_pixels)
        except ValueError as e:
            return web.Response(status=400, text=str(e))
        return self._written(folder, post, name, data, kind)

    # -- what the frontend reads at start ---------------------------------------------------------------

    async def get_object_info(self, request: web.Request) -> web.Response:
        only = request.match_info.get("node_class")
        info = await self.loop.run_in_executor(self.pool, object_info, self.folders, only)
        return web.json_response(info)

    async def system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(system_stats(self.argv))

    async def embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([os.path.splitext(n)[0] for n in model_files(self.folders, "embeddings")])

    async def models(self, request: web.Request) -> web.Response:
        folder = request.match_info.get("folder")
        if folder is None:
            return web.json_response(list(FOLDER_NAMES))
        if folder not in FOLDER_NAMES:
            return web.Response(status=404)
        return web.json_response(model_files(self.folders, folder))

    async def extensions(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def get_features(self, request: web.Request) -> web.Response:
        return web.json_response(self.features)

    async def users(self, request: web.Request) -> web.Response:
        return web.json_response({"storage": "server", "migrated": True})

    async def get_settings(self, request: web.Request) -> web.Response:
        key = request.match_info.get("setting_id")
        return web.json_response(self.settings if key is None else self.settings.get(key))

    async def post_settings(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.Response(status=400)
        key = request.match_info.get("setting_id")
        if key is not None:
            self.settings[key] = body
        elif isinstance(body, dict):
            self.settings.update(body)
        return web.Response(status=200)

    async def userdata_list(self, request: web.Request) -> web.Response:
        return web.json_response([])

    async def userdata_file(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def empty_object(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def i18n(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(frontend_dir() / "index.html")

    async def no_frontend(self, request: web.Request) -> web.Response:
        return web.Response(text="sdgraph serve: ComfyUI's API is here. For the web UI, "
                                 "pip install \"sdgraph[ui]\" and restart.\n")


def _pruned(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _job(entry: list, status: str) -> dict:
    number, prompt_id, _, extra, _ = entry
    return _pruned({"id": prompt_id, "status": status, "priority": number, "outputs_count": 0,
                    "create_time": extra.get("create_time")})


def _history_job(prompt_id: str, item: dict, full: bool) -> dict:
    number, _, prompt, extra, _ = item["prompt"]
    images = [dict(img, nodeId=node, mediaType="images") for node, out in item["outputs"].items()
              for img in out.get("images", [])]
    times = {m[0]: m[1].get("timestamp") for m in item["status"]["messages"]}
    end = times.get("execution_success") or times.get("execution_error") or times.get("execution_interrupted")
    error = next((m[1] for m in item["status"]["messages"] if m[0] == "execution_error"), None)
    job = _pruned({"id": prompt_id, "status": "completed" if item["status"]["status_str"] == "success"
                   else "failed", "priority": number, "create_time": extra.get("create_time"),
                   "execution_start_time": times.get("execution_start"), "execution_end_time": end,
                   "execution_error": error, "outputs_count": len(images),
                   "preview_output": images[0] if images else None})
    if full:
        job |= {"outputs": item["outputs"], "execution_status": item["status"],
                "workflow": {"prompt": prompt, "extra_data": extra}}
    return job


def frontend_dir() -> Path | None:
    """The static files of ComfyUI's frontend package (GPL-3.0, an optional extra), when installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    return static if (static / "index.html").is_file() else None


def system_stats(argv: list[str]) -> dict:
    """ComfyUI's shape; the frontend needs `system.argv` to show its Run button."""
    import platform
    from importlib import metadata

    import mlx.core as mx

    try:
        version = metadata.version("sdgraph")
    except metadata.PackageNotFoundError:
        version = "0"
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        total = free = 0
    device = mx.default_device()
    kind = "cpu" if device.type == mx.cpu else "gpu"
    return {
        "system": {"os": sys.platform, "ram_total": total, "ram_free": free,
                   "comfyui_version": f"{version} (sdgraph)", "required_frontend_version": "",
                   "installed_templates_version": "", "python_version": sys.version,
                   "pytorch_version": "none (sdgraph runs on MLX, " + platform.machine() + ")",
                   "embedded_python": False, "argv": list(argv)},
        "devices": [{"name": f"mlx {kind}", "type": kind, "index": 0, "vram_total": total, "vram_free": free,
                     "torch_vram_total": 0, "torch_vram_free": 0}],
    }


def run(folders: Folders, executor: Executor, listen: str, port: int, **limits) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM): HTTP and WebSockets on an event loop in a background
    thread, prompts run in this (the main) thread. Raises OSError when the address cannot be bound."""
    server = Server(folders, executor, **limits)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.make_app(), access_log=None, handle_signals=False)
    loop.run_until_complete(runner.setup())
    try:
        loop.run_until_complete(web.TCPSite(runner, listen, port, shutdown_timeout=5).start())
    except BaseException:
        loop.run_until_complete(runner.cleanup())
        loop.close()
        raise
    http = threading.Thread(target=loop.run_forever, name="sdgraph-serve-http", daemon=True)
    http.start()
    print(f"sdgraph serve: http://{listen}:{port}/ (output {folders.output_dir}, input {folders.input_dir})",
          file=sys.stderr, flush=True)
    if note := getattr(server.worker, "note", None):  # --workers N without a GPU each
        print(note, file=sys.stderr, flush=True)
    try:
        server.worker.run()
    finally:
        server.queue.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        http.join(10)
