"""The `sdgraph` command line: argument parsing and printing only (the work lives in graph/, nodes/, sd/)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  sdgraph run workflows/txt2img.yaml
  sdgraph run workflows/txt2img.yaml --set seed=7 --set sampler.steps=30
  sdgraph run workflows/txt2img.yaml --sweep sampler.seed=1,2,3 --sweep positive.text=@prompts.txt
  sdgraph run image.png                     re-run the workflow embedded in an image
  sdgraph run civitai.png                   run an A1111/civitai image's settings (JPEG/WebP too)
  sdgraph convert comfy_ui.json -o wf.yaml  a ComfyUI UI or API workflow to sdgraph's YAML
  sdgraph run wf.yaml --sweep seed=@seeds.txt --distributed -n 2    one process (GPU) per rank
  mlx.launch --hostfile hosts.json -- sdgraph run wf.yaml --sweep ...      the same over several hosts
  sdgraph validate workflows/img2img.yaml
  sdgraph nodes KSampler
  sdgraph cache info

exit status: 0 ok, 1 a node failed, 2 invalid workflow or usage, 130 interrupted (Ctrl-C),
  143 terminated (SIGTERM), 129 hung up (SIGHUP).
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (partial outputs removed), exits 128 + the signal's number."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _install_signal_handlers() -> None:
    import signal
    import threading

    from graph.distributed import launched

    if launched():
        # A rank keeps the default SIGTERM (die): one blocked in a collective after its peer died never
        # returns to Python to run a handler, so with one the launcher's SIGTERM could not stop it (a hang).
        # The sweep runner turns SIGTERM into an interrupt only while its variations run (graph/distributed).
        return
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _raise_terminated)


def epilog() -> str:
    """The examples, the exit statuses and every environment variable sdgraph reads (sd.runtime.switches)."""
    from sd.runtime.switches import help_text

    return EPILOG + "\n" + help_text() + "\n  (on/off switches: 1/0, true/false, yes/no, on/off)\n"


def load_node_modules() -> None:
    """Populate the node registry: the built-in nodes, then any named in SDGRAPH_EXTRA_NODES."""
    import nodes  # noqa: F401  (importing the package registers sdgraph's nodes)

    for entry in filter(None, (e.strip() for e in os.environ.get("SDGRAPH_EXTRA_NODES", "").split(","))):
        if entry.endswith(".py"):
            name = Path(entry).stem
            if name not in sys.modules:
                spec = importlib.util.spec_from_file_location(name, entry)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            importlib.import_module(entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdgraph",
        description="Run Stable Diffusion 1.5 node-graph workflows on MLX.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", default=[], metavar="TARGET=VALUE",
                       help="override a node input (node.input=value) or a param (name=value)")
        p.add_argument("--sweep", action="append", default=[], metavar="TARGET=V1,V2|@FILE",
                       help="run once per value (cartesian product of all --sweep); @FILE: one per line")

    def folders(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models-dir", help="model folder (default $SDGRAPH_MODELS_DIR or ./models)")
        p.add_argument("--input-dir", help="input folder (default $SDGRAPH_INPUT_DIR or ./input)")
        p.add_argument("--output-dir", help="output folder (default $SDGRAPH_OUTPUT_DIR or ./output)")

    def cache_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", help="disk cache folder (default $SDGRAPH_CACHE_DIR or user cache dir)")

    run = sub.add_parser("run", help="run a workflow", epilog=epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("workflow", help="workflow file (.yaml, .json, or an importable format)")
    overrides(run)
    folders(run)
    cache_dir(run)
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the disk cache")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar or table; print outputs")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    from graph.distributed import add_run_arguments  # light: --distributed, -n, --backend, --only-missing

    add_run_arguments(run)

    val = sub.add_parser("validate", help="check a workflow without running it")
    val.add_argument("workflow")
    overrides(val)
    folders(val)
    val.add_argument("--json", action="store_true", help="print problems as JSON")

    nodes = sub.add_parser("nodes", help="list node types, or describe one")
    nodes.add_argument("type", nargs="?", help="a node type to describe")

    schema = sub.add_parser("schema", help="print the workflow file's JSON Schema")
    schema.add_argument("--with-nodes", action="store_true", help="include each node type's inputs")

    conv = sub.add_parser("convert", help="convert a workflow (YAML <-> JSON, or from an imported format)")
    conv.add_argument("input")
    conv.add_argument("-o", "--output", required=True, help="output file; .json or .yaml decides the format")
    conv.add_argument("--force", action="store_true", help="replace the output file if it exists")

    demo = sub.add_parser("demo", help="write random-weight stand-ins for the files the workflows name")
    demo.add_argument("--models-dir", help="model folder (default $SDGRAPH_MODELS_DIR or ./models)")
    demo.add_argument("--input-dir", help="input folder (default $SDGRAPH_INPUT_DIR or ./input)")

    sub.add_parser("doctor", help="report the environment and run a tiny workflow end to end")

    warm = sub.add_parser(
        "warmup", help="compile the GPU (or CPU) kernels for a checkpoint and image sizes ahead of time",
        description="Run a 2-step txt2img for each size, discarding the images, so later runs find every "
                    "kernel compiled (on NVIDIA a first run otherwise compiles for about a minute). Kernels "
                    "are kept in the cache folder's kernels/ (see `sdgraph cache info`).")
    warm.add_argument("--ckpt", default="v1-5-pruned-emaonly.safetensors",
                      help="checkpoint whose shapes and dtypes to compile for (default: %(default)s)")
    warm.add_argument("--size", action="append", default=[], metavar="WxH",
                      help="image size, repeatable (default 512x512)")
    warm.add_argument("--batch-size", type=int, default=1, help="images per batch (default 1)")
    warm.add_argument("--models-dir", help="model folder (default $SDGRAPH_MODELS_DIR or ./models)")
    cache_dir(warm)

    serve = sub.add_parser("serve", help="serve ComfyUI's HTTP/WebSocket API (ComfyUI's web UI and clients)",
                           description="One executor behind a queue, with the same caches as `sdgraph run`. "
                                       'Needs pip install "sdgraph[serve]" ("sdgraph[ui]" adds the web UI).')
    serve.add_argument("--listen", default="127.0.0.1", help="address to bind (default %(default)s: this "
                       "machine only)")
    serve.add_argument("--port", type=int, default=8188, help="port (default %(default)s, as ComfyUI)")
    folders(serve)
    cache_dir(serve)
    serve.add_argument("--no-cache", action="store_true", help="neither read nor write the disk cache")
    serve.add_argument("--max-queue", type=int, default=100,
                       help="pending prompts at most (default %(default)s)")
    serve.add_argument("--max-upload-mb", type=float, default=50,
                       help="upload size limit (default %(default)s)")
    serve.add_argument("--workers", type=int, default=1,
                       help="executor processes behind the queue (default %(default)s: one, in this "
                            "process); with MLX on CUDA and a GPU for each, one GPU each")
    serve.add_argument("--max-upload-megapixels", type=float, default=64,
                       help="upload image size limit (default %(default)s)")

    cache = sub.add_parser("cache", help="inspect or clear the disk cache")
    cache.add_argument("action", choices=["info", "clear"])
    cache_dir(cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and usage errors (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    from graph.disk_cache import default_cache_dir
    from sd import runtime
    from sd.runtime import switches

    # before anything imports mlx: the BLAS, MLX's settings, the CPU kernels' folder
    runtime.setup(getattr(args, "cache_dir", None) or default_cache_dir())
    problems = switches.check()
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from graph.errors import Cancelled, NodeFailed, ValidationFailed

    _install_signal_handlers()
    try:
        from graph.distributed import pin_local_gpu

        pin_local_gpu()  # a rank of a multi-GPU host takes its own GPU, before MLX starts (no-op otherwise)
        load_node_modules()
        return COMMANDS[args.command](args)
    except ValidationFailed as e:
        _print_problems(e, getattr(args, "json", False))
        return 2
    except NodeFailed as e:
        if switches.flag("SDGRAPH_DEBUG"):
            import traceback

            traceback.print_exception(e.cause, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Cancelled) as e:
        signum = getattr(e, "signum", 2)
        what = {15: "terminated (SIGTERM)", 1: "hung up (SIGHUP)"}.get(signum, "interrupted")
        kept = getattr(e, "kept_files", [])
        done = (f"; kept the {len(kept)} complete output file{'s' if len(kept) != 1 else ''} of finished "
                "variations") if kept else ""
        print(f"{what}; no partial output files were left{done}", file=sys.stderr)
        return 128 + signum


def _print_problems(e, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"status": "invalid", "errors": [p.to_dict() for p in e.problems]}, indent=2))
    for p in e.problems:
        print(str(p), file=sys.stderr)
    n = len(e.problems)
    print(f"{n} error{'s' if n != 1 else ''}; nothing was run.", file=sys.stderr)


def _folders(args):
    from graph.context import Folders

    return Folders.from_env(args.models_dir, args.input_dir, args.output_dir)


def _check_workflow_file(path: str | Path) -> None:
    """A missing `workflows/<example>` outside a checkout: say where the installed examples are."""
    from graph.errors import Problem, ValidationFailed

    path = Path(path)
    if path.exists():
        return
    import workflows

    installed = Path(workflows.__file__).resolve().parent / path.name
    if installed.is_file() and installed != path.resolve():
        raise ValidationFailed([Problem(
            f"cannot read workflow: no such file; '{path.name}' is one of sdgraph's examples, installed at "
            f"{installed}: run `sdgraph demo` here to copy the examples to ./workflows (with stand-in "
            f"models), or give that path", str(path))])


def _prepare(args):
    from graph.importers import load_workflow
    from graph.runner import prepare
    from graph.sweep import parse_assignment, parse_sweep

    _check_workflow_file(args.workflow)
    wf = load_workflow(args.workflow)
    _print_notes(wf)
    sets = [parse_assignment(s) for s in args.set]
    sweeps = [parse_sweep(s, Path(args.workflow).parent) for s in args.sweep]
    return prepare(wf, sets, sweeps, _folders(args))


def _print_notes(wf) -> None:
    """What an importer could not carry over (an A1111 image's unknown settings, a skipped node)."""
    for note in wf.notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_validate(args) -> int:
    prepared = _prepare(args)
    if args.json:
        print(json.dumps({"status": "ok", "variations": len(prepared)}))
    else:
        n = len(prepared[0].bound)
        plural = "s" if len(prepared) != 1 else ""
        print(f"{args.workflow}: ok ({n} nodes, {len(prepared)} variation{plural})")
    return 0


def cmd_run(args) -> int:
    from graph import distributed

    if distributed.handles(args):  # --distributed, under mlx.launch, --only-missing or --manifest
        from nodes.distributed import cmd_run as distributed_run

        return distributed_run(args, _prepare, _folders)
    from graph.runner import display_path, open_executor, run_variations

    prepared = _prepare(args)  # every variation is validated before anything runs
    printer = _RunPrinter(quiet=args.quiet, announce=not args.json)
    summary: dict[str, Any] = {"status": "ok", "workflow": str(args.workflow), "variations": [], "files": []}
    try:
        with open_executor(args.cache_dir, args.no_cache, _folders(args), printer) as executor:
            for outcome in run_variations(executor, prepared, before=printer.variation):
                printer.close_bars()
                result = outcome.result
                item = outcome.pv.variation.to_data() | {
                    "nodes": [r.to_data() for r in result.nodes],
                    "files": [display_path(f) for f in result.files],
                }
                summary["variations"].append(item)
                summary["files"] += item["files"]
                if not (args.quiet or args.json):
                    _print_table(result)
                elif args.quiet:
                    for f in item["files"]:
                        print(f)
    except BaseException as e:
        printer.close_bars()
        from graph.errors import Cancelled

        interrupted = isinstance(e, (KeyboardInterrupt, Cancelled))
        if interrupted:
            e.kept_files = list(summary["files"])  # the complete outputs of finished variations stay
        if args.json:
            summary["status"] = "interrupted" if interrupted else "failed"
            if interrupted:
                summary["signal"] = ["SIGINT", "SIGHUP", "SIGTERM"][[2, 1, 15].index(getattr(e, "signum", 2))]
            summary["error"] = str(e)
            summary["failed_node"] = getattr(e, "node_id", None)
            print(json.dumps(summary, indent=2))
        raise
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def _print_table(result) -> None:
    from graph.runner import display_path

    rows = [(r.id, r.type, r.status, f"{r.seconds:.2f}") for r in result.nodes]
    header = ("node", "type", "status", "seconds")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    for f in result.files:
        print(f"output: {display_path(f)}")


class _RunPrinter:
    """RunEvents for the terminal: a tqdm bar per node that reports progress, logs and warnings."""

    def __init__(self, quiet: bool, announce: bool = True):
        self.quiet = quiet
        self.announce = announce and not quiet  # "variation i/n" lines on stdout (not with --json)
        self.bars: dict[str, Any] = {}

    def node_started(self, node_id: str, node_type: str) -> None:
        pass

    def node_finished(self, report) -> None:
        bar = self.bars.pop(report.id, None)
        if bar is not None:
            bar.close()

    def progress(self, node_id: str, step: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(node_id)
        if bar is None:
            bar = self.bars[node_id] = tqdm(total=total, desc=node_id, file=sys.stderr, leave=False)
        bar.total = total
        bar.update(step - bar.n)

    def log(self, node_id: str, message: str) -> None:
        if not self.quiet:
            print(f"[{node_id}] {message}", file=sys.stderr)

    def warning(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    def variation(self, pv, count: int) -> None:
        if self.announce and count > 1:
            sets = " ".join(f"{k}={v}" for k, v in pv.variation.overrides.items())
            print(f"variation {pv.variation.index + 1}/{count} [{pv.variation.id}] {sets}")

    def close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def cmd_nodes(args) -> int:
    from graph.declare import NODE_REGISTRY
    from graph.errors import Problem, ValidationFailed, did_you_mean

    if args.type is None:
        if not NODE_REGISTRY:
            print("no node types are registered")
            return 0
        by_category: dict[str, list] = {}
        for spec in NODE_REGISTRY.values():
            by_category.setdefault(spec.category, []).append(spec)
        width = max(len(n) for n in NODE_REGISTRY)
        for category in sorted(by_category):
            print(f"{category}:")
            for spec in sorted(by_category[category], key=lambda s: s.type_name):
                print(f"  {spec.type_name.ljust(width)}  {spec.title}")
        return 0
    from graph.declare import get_spec

    spec = get_spec(args.type)
    if spec is None:
        raise ValidationFailed([Problem(f"unknown node type '{args.type}'",
                                        hint=did_you_mean(args.type, NODE_REGISTRY))])
    print(describe_node(spec))
    return 0


def describe_node(spec) -> str:
    lines = [f"{spec.type_name}  ({spec.category})", ""]
    if spec.description:
        lines += [spec.description, ""]
    rows = []
    for inp in spec.inputs.values():
        kind = "link" if inp.is_socket else inp.type.describe()
        if isinstance(getattr(inp.type, "options", None), tuple):
            kind = "one of: " + ", ".join(inp.type.options)
        default = "required" if inp.required else ("optional" if inp.default is None else repr(inp.default))
        rows.append((inp.name, inp.type_name, default, kind))
    if rows:
        lines.append("inputs:")
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            cells = "  ".join(x.ljust(w) for x, w in zip(r[:3], widths, strict=True))
            lines.append(f"  {cells}  {r[3]}")
    outs = ", ".join(f"{o.name} ({o.type.name})" if o.name != o.type.name else o.name for o in spec.outputs)
    lines.append(f"outputs: {outs or 'none'}")
    extras = [f"cache: {spec.cache_tier}", f"version: {spec.version}"]
    if spec.is_output:
        extras.append("output node (writes files)")
    if spec.reads_files:
        extras.append("reads files named by: " + ", ".join(spec.reads_files))
    lines.append("; ".join(extras))
    return "\n".join(lines)


def cmd_schema(args) -> int:
    from graph.declare import NODE_REGISTRY
    from graph.schema import schema_with_nodes, workflow_schema

    schema = schema_with_nodes(list(NODE_REGISTRY.values())) if args.with_nodes else workflow_schema()
    print(json.dumps(schema, indent=2))
    return 0


def cmd_convert(args) -> int:
    import yaml

    from graph.context import atomic_path
    from graph.errors import Problem, ValidationFailed
    from graph.importers import load_workflow

    out = Path(args.output)
    _check_convert_target(Path(args.input), out, args.force)
    _check_workflow_file(args.input)
    wf = load_workflow(args.input)
    _print_notes(wf)
    data = wf.to_data()
    if out.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    try:
        with atomic_path(out, overwrite=args.force) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except FileExistsError:  # created by someone else since the check above
        raise ValidationFailed([Problem(f"{out} exists; pass --force to replace it")]) from None
    except OSError as e:
        message = f"cannot write {out}: {e.strerror or e}; pick another -o path"
        raise ValidationFailed([Problem(message)]) from None
    print(f"wrote {out}")
    return 0


def _check_convert_target(source: Path, out: Path, force: bool) -> None:
    """`convert -o` never replaces its own input or anything but a regular file, and a regular file
    only with --force."""
    import stat

    from graph.errors import Problem, ValidationFailed

    def refuse(message: str) -> None:
        raise ValidationFailed([Problem(message)])

    try:
        st = out.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        refuse(f"cannot use -o {out}: {e.strerror}")
    try:
        same = source.exists() and os.path.samefile(source, out)
    except OSError:
        same = False
    if same:
        refuse(f"-o {out} is the input file itself; write the result to another file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        refuse(f"-o {out} is {kind}; convert writes only regular files, give a file path")
    if not force:
        refuse(f"-o {out} exists; pass --force to replace it, or pick another name")


def cmd_cache(args) -> int:
    from graph.disk_cache import DiskCache, default_cache_dir, human_size

    store = DiskCache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    if args.action == "clear":
        store.clear()
        print(f"cleared {store.root}")
        return 0
    info = store.info()
    print(f"cache dir:     {info['cache_dir']}")
    print(f"entries:       {info['entries']}")
    print(f"size:          {human_size(info['bytes'])} of {human_size(info['max_bytes'])}")
    kernels = _kernel_counts(store.root / "kernels")
    shown = ", ".join(f"{n} {what}" for what, (n, _) in kernels.items() if n) or "none yet"
    total = human_size(sum(b for _, b in kernels.values()))
    print(f"kernels:       {shown} ({total}; `cache clear` removes them)")
    return 0


def _kernel_counts(folder: Path) -> dict[str, tuple[int, int]]:
    """Compiled kernels kept in the cache folder: (files, bytes) for the CPU library, sdgraph's CUDA kernels
    and MLX's own GPU kernels."""
    counts = {"CPU kernel libraries": [0, 0], "sdgraph GPU kernels": [0, 0], "MLX GPU kernels": [0, 0]}
    if folder.is_dir():
        for p in folder.rglob("*"):
            kind = {".so": "CPU kernel libraries", ".cubin": "sdgraph GPU kernels",
                    ".ptx": "MLX GPU kernels"}.get(p.suffix)
            if kind and p.is_file() and not p.name.startswith("."):
                counts[kind][0] += 1
                counts[kind][1] += p.stat().st_size
    return {k: (n, b) for k, (n, b) in counts.items()}


def cmd_warmup(args) -> int:
    """`sdgraph warmup`: the packaged txt2img workflow, 2 steps per size, into a temporary folder."""
    import re
    import tempfile
    import time

    import workflows
    from graph.errors import Problem, ValidationFailed

    sizes = args.size or ["512x512"]
    parsed = []
    for size in sizes:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
        if not m:
            raise ValidationFailed([Problem(f"--size {size!r}: expected WIDTHxHEIGHT, e.g. 512x512")])
        parsed.append((int(m.group(1)), int(m.group(2))))
    workflow = Path(workflows.__file__).resolve().parent / "txt2img.yaml"
    os.environ["SDGRAPH_COMPILE"] = "1"  # what warmup is for: build the compiled graphs (sd/accel/gpu_cache)
    for width, height in parsed:
        with tempfile.TemporaryDirectory(prefix="sdgraph-warmup-") as out:
            start = time.perf_counter()
            argv = ["run", str(workflow), "--set", f"ckpt={args.ckpt}", "--set", f"width={width}",
                    "--set", f"height={height}", "--set", "steps=2", "--set", f"batch_size={args.batch_size}",
                    "--output-dir", out, "--no-cache", "--quiet"]
            if args.models_dir:
                argv += ["--models-dir", args.models_dir]
            if args.cache_dir:
                argv += ["--cache-dir", args.cache_dir]
            with contextlib.redirect_stdout(io.StringIO()):  # the discarded image's path
                code = main(argv)
            if code != 0:
                return code
            seconds = time.perf_counter() - start
            print(f"warmed up {width}x{height} (batch {args.batch_size}) in {seconds:.1f} s")
    print("later runs of these sizes find their kernels compiled (`sdgraph cache info` lists them)")
    return 0


def cmd_demo(args) -> int:
    from graph.context import Folders
    from nodes.demo import copy_example_workflows, make_demo

    folders = Folders.from_env(args.models_dir, args.input_dir)
    make_demo(folders.models_dir, folders.input_dir)
    copy_example_workflows("workflows")
    return 0


def cmd_doctor(args) -> int:
    from nodes.doctor import run_doctor

    return run_doctor()


def serve_worker(conn, cancel, folders, dirs, cache_dir, no_cache) -> None:
    """A `serve --workers` process. Spawned with this light module as its entry, so that, as for every
    command, the runtime (the BLAS) is set up before MLX is imported and SDGRAPH_EXTRA_NODES are loaded."""
    from graph.disk_cache import default_cache_dir
    from sd import runtime

    runtime.setup(cache_dir or default_cache_dir())
    load_node_modules()
    from nodes.server.workers import serve_prompts

    serve_prompts(conn, cancel, folders, dirs, cache_dir, no_cache)


def cmd_serve(args) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print('error: sdgraph serve needs aiohttp: pip install "sdgraph[serve]"', file=sys.stderr)
        return 2
    from graph.runner import open_executor
    from nodes.server.app import is_loopback, run

    if not is_loopback(args.listen):
        print(f"warning: listening on {args.listen}: anyone who can reach this address can queue prompts, "
              "read outputs and upload files (there is no authentication)", file=sys.stderr)
    folders = _folders(args)
    with open_executor(args.cache_dir, args.no_cache, folders) as executor:
        try:
            run(folders, executor, args.listen, args.port, max_queue=max(1, args.max_queue),
                max_upload_bytes=int(args.max_upload_mb * 2**20),
                max_pixels=int(args.max_upload_megapixels * 2**20), argv=sys.argv,
                workers=max(1, args.workers), cache_dir=args.cache_dir, no_cache=args.no_cache,
                worker_entry=serve_worker)
        except OSError as e:  # the port is taken, the address is not this machine's
            print(f"error: cannot listen on {args.listen}:{args.port}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "nodes": cmd_nodes, "schema": cmd_schema,
            "convert": cmd_convert, "cache": cmd_cache, "demo": cmd_demo, "doctor": cmd_doctor,
            "warmup": cmd_warmup, "serve": cmd_serve}


if __name__ == "__main__":
    sys.exit(main())
