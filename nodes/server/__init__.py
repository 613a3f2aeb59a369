"""`sdgraph serve`: ComfyUI's server API (HTTP + WebSocket) over sdgraph's engine, so ComfyUI's web UI and
ComfyUI clients drive it. Needs the `serve` extra (aiohttp).

    app.py          routes, the origin check, /ws, system_stats; `run()` starts it
    queue.py        the bounded prompt queue, history, and the worker thread that runs prompts
    prompts.py      an API prompt -> a validated run, or ComfyUI's node_errors with the submitted ids
    object_info.py  /object_info from the node declarations
    files.py        /view and upload paths kept inside their folders; upload bounds
"""
