"""The ``deltakit`` command.

* ``deltakit demo`` fine-tunes LoRA on the embedded all-MiniLM-L6-v2 (see :mod:`deltakit.demo`).
* ``deltakit show MODEL`` prints a model's structure tree; ``MODEL`` is a local transformers model directory (built
  from its ``config.json`` on the meta device: no weights are read) or an architecture name (``llama``, ``bert``,
  ... a tiny random model). ``--roles`` adds the common-structure role map, ``--delta lora`` (with
  ``--modified-modules``, ``--exclude-modules``, ``--option key=value``, or the method's default positions) previews
  exactly which modules that delta would modify, without changing anything.
* ``deltakit inspect DIR`` prints a checkpoint's config, tensor table (names, shapes, dtypes, bytes) and backbone
  fingerprint, reading only the safetensors header (no tensors are loaded, no backbone), and checks the weights
  file's bytes against the SHA-256 recorded at save time (exit code 1 when they differ). PEFT adapter directories
  are shown too.

* ``deltakit pick MODEL`` serves the interactive module picker (:mod:`deltakit.web.picker`) and prints the submitted
  ``modified_modules`` patterns and sites as JSON.
* ``deltakit report DIR --html out.html [--png out.png] [--model MODEL]`` draws a checkpoint
  (:mod:`deltakit.web.report`).

Exit codes: 0 success, 1 failure (message on stderr, no traceback unless ``--debug``), 2 usage error, 141 the
reader of stdout went away (``deltakit inspect DIR | head``: no message, as ``cat`` or ``git`` would end through
SIGPIPE, 128 + 13). :func:`main` returns the code; like any argparse program it raises ``SystemExit`` for
``--help``/``--version`` (0) and usage errors (2).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import Any

from ._version import __version__


class CliError(Exception):
    """A failure the command reports on stderr with exit code 1."""


# ------------------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    """The ``deltakit`` argument parser (subcommands ``demo``, ``show``, ``inspect``, ``pick``, ``report``)."""
    parser = argparse.ArgumentParser(
        prog="deltakit",
        description="Delta tuning for PyTorch / transformers models.",
        epilog="Run 'deltakit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    # Accepted after the command too; SUPPRESS keeps a subcommand from resetting a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
    parser.add_argument("--version", action="version", version=f"deltakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "demo",
        help="fine-tune LoRA on the embedded all-MiniLM-L6-v2 (a generated task); --tiny for a seconds-long run",
        add_help=False,
    )
    show = sub.add_parser(
        "show",
        parents=[debug],
        help="print a model's structure tree; preview which modules a delta would modify",
        description="Print the structure tree of MODEL and, with --delta, preview exactly which modules that delta "
        "would modify (nothing is changed, no weights are loaded).",
    )
    show.add_argument(
        "model",
        metavar="MODEL",
        help="a local transformers model directory (with config.json), or an architecture name for a tiny random "
        "model: " + ", ".join(_architecture_names()),
    )
    show.add_argument("--layers", type=int, default=2, help="layers of a tiny random model (default 2)")
    show.add_argument("--roles", action="store_true", help="also print the common-structure role map")
    show.add_argument("--no-tree", action="store_true", help="do not print the structure tree")
    show.add_argument("--delta", metavar="TYPE", choices=_delta_types(),
                      help="delta type to preview: " + ", ".join(_delta_types()))
    show.add_argument("--modified-modules", nargs="+", metavar="PATTERN", help="modules to modify (default: the "
                      "method's default positions); names, [r]regexes or role names such as attn.q")
    show.add_argument("--exclude-modules", nargs="+", metavar="PATTERN", help="modules never to modify")
    show.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a hyper-parameter of the delta, e.g. --option lora_r=16 (VALUE is read as JSON if it can)")
    show.add_argument("--json", action="store_true", help="print the preview / roles as JSON instead of tables")
    inspect = sub.add_parser(
        "inspect",
        parents=[debug],
        help="print a checkpoint's config, tensor table and fingerprint",
        description="Print a delta checkpoint's config, tensor table (names, shapes, dtypes, bytes) and backbone "
        "fingerprint, reading only the safetensors header, and check the weights file against the SHA-256 recorded "
        "when it was saved (exit code 1 if it differs). Also reads PEFT adapter directories.",
    )
    inspect.add_argument("directory", metavar="DIR", help="a directory written by save_finetuned (or a PEFT adapter)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    _add_pick(sub, debug)
    _add_report(sub, debug)
    return parser


def _add_pick(sub: Any, debug: argparse.ArgumentParser) -> None:
    pick = sub.add_parser(
        "pick",
        parents=[debug],
        help="choose the modules a delta modifies on a local web page, with a live exact preview",
        description="Serve a page (on 127.0.0.1, with a random token in its URL) showing MODEL's folded module tree "
        "with checkboxes and the exact preview of the delta for the ticked modules. Submit prints the compact "
        "modified_modules patterns and the site list as JSON on stdout.",
    )
    pick.add_argument("model", metavar="MODEL", help="a local transformers model directory (with config.json, built "
                      "on the meta device) or an architecture name for a tiny random model")
    pick.add_argument("--layers", type=int, default=2, help="layers of a tiny random model (default 2)")
    pick.add_argument("--delta", metavar="TYPE", default="lora", choices=_delta_types(),
                      help="delta type to preview (default lora; changeable on the page)")
    pick.add_argument("--modified-modules", nargs="+", metavar="PATTERN",
                      help="modules ticked when the page opens (default: the method's default positions)")
    pick.add_argument("--exclude-modules", nargs="+", metavar="PATTERN", help="removed from that first selection")
    pick.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="a hyper-parameter of the delta, e.g. --option lora_r=16")
    pick.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1, this machine "
                      "only; anything else is reachable from other machines and warns)")
    pick.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    pick.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="another name the page may be reached under (checked against the Host header)")
    pick.add_argument("--open", action="store_true", help="open the page in the default browser")
    pick.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up (exit code 1) when nothing is submitted in this time")


def _add_report(sub: Any, debug: argparse.ArgumentParser) -> None:
    report = sub.add_parser(
        "report",
        parents=[debug],
        help="draw a delta checkpoint: where it sits, parameters per layer, update size per site (HTML / PNG)",
        description="Write a visual report of the delta checkpoint DIR: its sites on the folded module tree, "
        "trainable parameters per layer and site kind, and the size of each site's update. With --model the "
        "checkpoint is loaded onto that backbone and updates are measured as merged weight changes (merge_deltas); "
        "without it the stored tensors' norms are shown.",
    )
    report.add_argument("directory", metavar="DIR", help="a directory written by save_finetuned")
    report.add_argument("--html", metavar="FILE", help="write the self-contained HTML report here")
    report.add_argument("--png", metavar="FILE", help="write the figures as a PNG here (needs matplotlib)")
    report.add_argument("--json", action="store_true", help="print the report data as JSON")
    report.add_argument("--model", metavar="MODEL", help="the backbone: an architecture name (tiny random model) "
                        "or a local transformers model directory (its weights are loaded)")
    report.add_argument("--layers", type=int, default=2, help="layers of a tiny random --model (default 2)")


def _architecture_names() -> list[str]:
    from .structures import TINY_ARCHITECTURES

    return sorted(TINY_ARCHITECTURES)


def _delta_types() -> list[str]:
    from . import deltas  # noqa: F401  (registers the methods)
    from .registry import DELTA_REGISTRY

    return sorted(DELTA_REGISTRY)


#: Exit code when stdout's reader has gone away: what a shell reports for a process ended by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltakit`` console script; returns the process exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """End quietly after a write to a closed stdout pipe (``deltakit inspect DIR | head``).

    Output still buffered would fail again when Python flushes stdout at exit, so stdout is pointed at
    ``os.devnull`` first (the idiom of the Python docs' note on SIGPIPE).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (e.g. captured in-process)
        pass
    return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # --help and --version exit with 0 and usage errors with 2 through SystemExit, as argparse does.
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo" and "--debug" in rest:  # the demo parses its own options; --debug is ours
        rest = [a for a in rest if a != "--debug"]
        args.debug = True
    if args.command != "demo" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(rest)
        if args.command == "show":
            return _show(args, parser)
        if args.command == "pick":
            return _pick(args, parser)
        if args.command == "report":
            return _report(args, parser)
        return _inspect(args)
    except BrokenPipeError:
        raise  # not a failure to report: main() ends quietly
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line message, unless --debug
        if args.debug:
            raise
        from .errors import DeltaError

        known = isinstance(exc, (CliError, DeltaError, OSError, ValueError))
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        print(f"deltakit {args.command}: error: {message}", file=sys.stderr)
        if not known:
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _console() -> Any:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich's default exits with status 1 itself; let main() end the command like any other closed pipe.
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    # A terminal gets its own width (rich reads it); output to a file or pipe is laid out 160 wide, so names and
    # tables are not cut short for grep or a log.
    return _Console(width=None if sys.stdout.isatty() else _PIPE_WIDTH)


#: Width of ``show`` / ``inspect`` output that does not go to a terminal.
_PIPE_WIDTH = 160


# ------------------------------------------------------------------------------------------------------ show
def load_structure(model: str, layers: int = 2) -> Any:
    """The model ``deltakit show`` displays: an architecture name's tiny random model, or a local directory's model
    built from its ``config.json`` on the meta device (class from ``architectures``, else ``AutoModel``)."""
    from .structures import MAX_TINY_LAYERS, TINY_ARCHITECTURES, tiny_model

    if os.path.isdir(model):
        import torch
        import transformers

        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CliError(f"{model!r} is a directory without config.json: not a transformers model directory.")
        config = transformers.AutoConfig.from_pretrained(model)
        names = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        with torch.device("meta"):
            if cls is not None:
                return cls(config).eval()
            return transformers.AutoModel.from_config(config).eval()
    if model in TINY_ARCHITECTURES:
        if not 1 <= layers <= MAX_TINY_LAYERS:  # checked first: --layers 100000 would exhaust memory building it
            raise CliError(
                f"--layers must be between 1 and {MAX_TINY_LAYERS} (deeper than any released model), got {layers:,}."
            )
        return tiny_model(model, num_layers=layers)
    raise CliError(
        f"MODEL {model!r} is neither a local directory nor a known architecture name; known names: "
        f"{', '.join(sorted(TINY_ARCHITECTURES))}."
    )


def _parse_options(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--option expects KEY=VALUE, got {item!r}")  # exits with code 2
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def role_map(model: Any) -> dict[str, Any]:
    """``{"source": ..., "roles": {role: [names]}, "ambiguous": {role: why}}`` for ``model``."""
    from .web.tree import role_map as _role_map

    return _role_map(model)


def preview_delta(
    model: Any,
    delta_type: str,
    modified_modules: list[str] | None = None,
    exclude_modules: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sites a delta would have on ``model``, planned by the method itself but never attached.

    Returns:
        ``{"type", "sites", "shared_parameters", "parameters"}``: one ``{"module", "type", "parameters"}`` dict per
        site in model order, the count of parameters shared by all sites (Compacter's rules, a prefix
        reparameterization; stored once) and the total.

    Raises:
        DeltaError: unknown delta type, bad option, or a pattern that matches nothing (as the method would).
    """
    from .errors import DeltaConfigError
    from .web.preview import plan_preview

    registry = _registry()
    if delta_type not in registry:
        raise DeltaConfigError(f"Unknown delta type {delta_type!r}; known: {', '.join(sorted(registry))}.")
    # the picker's live preview runs this same planning (build_detached), so the two always agree
    return plan_preview(registry[delta_type], model, modified_modules, exclude_modules, options)


def _registry() -> dict[str, Any]:
    from . import deltas  # noqa: F401  (registers the methods)
    from .registry import DELTA_REGISTRY

    return dict(DELTA_REGISTRY)


def _show(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options = _parse_options(args.option, parser)
    if args.delta is None and (args.modified_modules or args.exclude_modules or options):
        parser.error("--modified-modules, --exclude-modules and --option need --delta TYPE")  # exits with code 2
    model = load_structure(args.model, args.layers)
    preview = None
    if args.delta is not None:  # plan first: a bad pattern fails before anything is printed
        preview = preview_delta(model, args.delta, args.modified_modules, args.exclude_modules, options)
    roles = role_map(model) if args.roles else None
    if args.json:
        out: dict[str, Any] = {"model": type(model).__name__}
        if roles is not None:
            out["roles"] = roles
        if preview is not None:
            out["delta"] = preview
        print(json.dumps(out, indent=2))
        return 0
    from rich.table import Table

    from .visualization import Visualization

    console = _console()
    if not args.no_tree:
        console.print(Visualization(model).structure_graph(printTree=False))
    if roles is not None:
        table = Table(title=f"Common-structure roles ({roles['source']})")
        for column in ("role", "modules", "first module"):
            table.add_column(column)
        for role, names in roles["roles"].items():
            table.add_row(role, str(len(names)), names[0] if names else "-")
        for role, why in roles["ambiguous"].items():
            table.add_row(role, "ambiguous", why)
        console.print(table)
    if preview is not None:
        sites = preview["sites"]
        shared = f", {preview['shared_parameters']:,} shared by all sites" if preview["shared_parameters"] else ""
        table = Table(title=f"{args.delta} would modify {len(sites)} modules ({preview['parameters']:,} delta "
                      f"parameters{shared}); nothing was changed")
        table.add_column("module", no_wrap=True)
        table.add_column("type")
        table.add_column("delta parameters", justify="right")
        for site in sites:
            table.add_row(site["module"], site["type"], f"{site['parameters']:,}")
        console.print(table)
    return 0


# ------------------------------------------------------------------------------------------------------ pick
def _pick(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .web.picker import Picker, selection_json

    options = _parse_options(args.option, parser)
    model = load_structure(args.model, args.layers)
    picker = Picker(model, _registry()[args.delta], options=options, modified_modules=args.modified_modules,
                    exclude_modules=args.exclude_modules, host=args.host, port=args.port,
                    allowed_hosts=tuple(args.allow_host))
    picker.start(open_browser=args.open)
    try:
        print(f"deltakit pick: open {picker.url}", file=sys.stderr, flush=True)
        result = picker.wait(args.timeout)
    finally:
        picker.stop()
    if result is None:
        raise CliError(f"nothing was submitted within {args.timeout} seconds.")
    print(selection_json(result))
    return 0


# ------------------------------------------------------------------------------------------------------ report
def load_backbone(model: str, layers: int = 2) -> Any:
    """The backbone a report loads a checkpoint onto: an architecture name's tiny random model, or a local model
    directory loaded with its weights (``from_pretrained``; the class from ``architectures``, else ``AutoModel``)."""
    if not os.path.isdir(model):
        return load_structure(model, layers)
    import transformers

    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CliError(f"{model!r} is a directory without config.json: not a transformers model directory.")
    config = transformers.AutoConfig.from_pretrained(model)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    return cls.from_pretrained(model).eval()


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .web.report import delta_report

    if not (args.html or args.png or args.json):
        parser.error("report needs --html FILE, --png FILE or --json")  # exits with code 2
    if not os.path.isdir(args.directory):
        raise CliError(f"No checkpoint directory at {args.directory!r}.")
    model = load_backbone(args.model, args.layers) if args.model else None
    data = delta_report(args.directory, html_path=args.html, png_path=args.png, model=model)
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k != "tree"}, indent=2))
    for kind, path in (("HTML", args.html), ("PNG", args.png)):
        if path:
            print(f"deltakit report: wrote the {kind} report to {path}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------ inspect
def read_safetensors_header(file: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Tensor entries (``{name: {"dtype", "shape", "bytes"}}``) and metadata of a safetensors file, read from its
    header only (no tensor data is read; the header is bounded and validated: dtypes, shapes and byte ranges).

    Raises:
        CheckpointError: the file is missing, not a regular file, truncated, corrupt or hostile.
    """
    from .io.files import open_regular
    from .io.tensor_file import read_header

    with open_regular(file, "the weights file") as (fd, size):
        header, _ = read_header(fd, size, file)
    return _rows(header), header.metadata


def _rows(header: Any) -> dict[str, dict[str, Any]]:
    return {
        name: {"dtype": e.dtype, "shape": list(e.shape), "bytes": e.end - e.begin}
        for name, e in sorted(header.entries.items())
    }


def _read_deltakit_checkpoint(directory: str) -> tuple[dict[str, Any], Any, str, str, str]:
    """Config, weights header and SHA-256 of the weights bytes of a deltakit checkpoint, read consistently (under
    the directory's shared lock) without decoding any tensor: the data is only streamed through the hash."""
    import hashlib

    from .checkpoint import MAX_CONFIG_BYTES, WEIGHTS_NAME, parse_meta
    from .config import CONFIG_NAME
    from .errors import CheckpointError
    from .io.files import open_regular, read_regular_file
    from .io.tensor_file import read_header
    from .io.transaction import locked_view

    with locked_view(directory) as find:
        config_file, weights = find(CONFIG_NAME), find(WEIGHTS_NAME)
        meta = parse_meta(read_regular_file(config_file, "the delta config", MAX_CONFIG_BYTES), config_file)
        with open_regular(weights, "the weights file") as (fd, size):
            header, head = read_header(fd, size, weights)
            digest = hashlib.sha256(head)
            remaining = header.data_bytes
            while remaining:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    raise CheckpointError(f"{weights!r} ended early while being read (truncated).")
                digest.update(chunk)
                remaining -= len(chunk)
    return meta, header, digest.hexdigest(), config_file, weights


def _inspect_deltakit(directory: str) -> tuple[dict[str, Any], Any, str]:
    """``(facts, weights header, weights file)`` of a deltakit checkpoint directory."""
    from .checkpoint import config_from_meta, saved_sites

    meta, header, sha, config_file, weights = _read_deltakit_checkpoint(directory)
    config_from_meta(meta, config_file)  # hyper-parameters a loader would refuse are refused here too
    out = {
        "kind": "deltakit delta checkpoint",
        "delta_type": meta["delta_type"],
        "format_version": meta.get("format_version"),
        "deltakit_version": meta.get("deltakit_version"),
        "config": meta["config"],
        "sites": saved_sites(meta, config_file),
        "backbone_tensors": meta["backbone_tensors"],
        "fingerprint": meta.get("fingerprint"),
        "weights_sha256": meta.get("weights_sha256"),
    }
    if out["weights_sha256"] is None:
        out["weights_sha256_ok"] = None
    else:
        out["weights_sha256_ok"] = sha == out["weights_sha256"]
        if not out["weights_sha256_ok"]:
            out["weights_sha256_error"] = (
                f"{weights!r} does not match the SHA-256 recorded in {config_file!r} when it was saved: the "
                f"weights file is corrupt or was modified (or the two files come from different saves)."
            )
    if "stacks" in header.metadata:
        out["note"] = "stacked tensors of a development format; deltakit no longer loads it: save it again"
    return out, header, weights


def _inspect_peft(directory: str) -> tuple[dict[str, Any], str]:
    """``(facts, weights file)`` of a PEFT adapter directory (shown even when deltakit cannot import it)."""
    from .config import load_json
    from .integrations.peft import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, read_peft_config

    raw = load_json(os.path.join(directory, PEFT_CONFIG_NAME))  # regular, bounded, strict: checked first
    try:
        config = read_peft_config(directory)
        note = "loads with deltakit.integrations.peft.from_peft"
    except Exception as exc:  # noqa: BLE001 - still show what the file holds
        config, note = raw, f"not importable into deltakit: {exc}"
    out = {"kind": "PEFT adapter", "note": note, "config": config, "fingerprint": None}
    return out, os.path.join(directory, PEFT_WEIGHTS_NAME)


def inspect_checkpoint(directory: str) -> dict[str, Any]:
    """Everything ``deltakit inspect`` shows, as a dict: kind, config, sites, tensors, totals, fingerprint.

    Only headers are parsed and no tensor is built; hostile files (huge declared shapes or site ranges, FIFOs,
    devices, malformed JSON) end in one :class:`~deltakit.errors.CheckpointError`. For a deltakit checkpoint,
    ``weights_sha256`` is the hash its config records (``None`` for checkpoints saved before it was recorded) and
    ``weights_sha256_ok`` whether the weights file matches it (``None``: nothing to compare; ``False`` comes with
    the reason in ``weights_sha256_error``).
    """
    from .config import CONFIG_NAME
    from .integrations.peft import PEFT_CONFIG_NAME
    from .io.transaction import resolve

    if not os.path.isdir(directory):
        raise CliError(f"No checkpoint directory at {directory!r}.")
    if os.path.lexists(resolve(directory, CONFIG_NAME)):
        out, header, weights = _inspect_deltakit(directory)
        tensors, metadata = _rows(header), header.metadata
    elif os.path.lexists(os.path.join(directory, PEFT_CONFIG_NAME)):
        out, weights = _inspect_peft(directory)
        tensors, metadata = read_safetensors_header(weights)
    else:
        raise CliError(
            f"{directory!r} holds neither {CONFIG_NAME} (a deltakit checkpoint) nor {PEFT_CONFIG_NAME} (a PEFT adapter)."
        )
    out["weights_file"] = weights
    out["metadata"] = metadata
    out["stored_tensors"] = len(tensors)
    out["tensors"] = tensors
    out["total_parameters"] = sum(_numel(t["shape"]) for t in tensors.values())
    out["total_bytes"] = sum(t["bytes"] for t in tensors.values())
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return _hash_verdict(info)
    from rich.table import Table

    console = _console()
    head = Table(title=f"{info['kind']}: {args.directory}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    for key in ("delta_type", "format_version", "deltakit_version", "note"):
        if info.get(key) is not None:
            head.add_row(key, str(info[key]))
    for key, value in info["config"].items():
        head.add_row(f"config.{key}", json.dumps(value))
    if "sites" in info:
        sites = info["sites"]
        head.add_row("sites", f"{len(sites)}: " + ", ".join(sites[:3]) + (" ..." if len(sites) > 3 else ""))
        head.add_row("backbone tensors", ", ".join(info["backbone_tensors"]) or "-")
    if "weights_sha256_ok" in info:
        verdict = {True: "matches the weights file", False: "MISMATCH: the weights file is corrupt or was modified"}
        head.add_row(
            "weights sha256",
            f"{info['weights_sha256']} ({verdict[info['weights_sha256_ok']]})"
            if info["weights_sha256_ok"] is not None else "not recorded (saved by an older deltakit)",
        )
    console.print(head)
    table = Table(title=f"Tensors in {os.path.basename(info['weights_file'])}")
    table.add_column("name", no_wrap=True)
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    for name, entry in info["tensors"].items():
        table.add_row(name, str(tuple(entry["shape"])), entry["dtype"], f"{entry['bytes']:,}")
    table.add_section()
    table.add_row(f"{len(info['tensors'])} tensors, {info['total_parameters']:,} parameters", "", "",
                  f"{info['total_bytes']:,}")
    console.print(table)
    fingerprint = info.get("fingerprint")
    if fingerprint:
        fp = Table(title="Backbone fingerprint", show_header=False)
        fp.add_column("key", style="bold")
        fp.add_column("value")
        for key, value in fingerprint.items():
            fp.add_row(key, json.dumps(value))
        console.print(fp)
    return _hash_verdict(info)


def _hash_verdict(info: dict[str, Any]) -> int:
    """Exit code 1, with the reason on stderr, when the weights file does not match its recorded SHA-256."""
    if info.get("weights_sha256_ok") is False:
        print(f"deltakit inspect: error: {info['weights_sha256_error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
