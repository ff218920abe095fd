"""The interactive module picker: a local page to choose which modules a delta modifies, with a live exact preview.

The page shows the model's folded tree (as :class:`deltakit.Visualization` folds it), role names and a checkbox per
module or folded group. Every change is sent to Python, which writes the selection as compact patterns
(:mod:`deltakit.web.patterns`), checks them with :func:`deltakit.find_modules`, and plans the delta with the method's
own ``build_detached`` (:mod:`deltakit.web.preview`): the sites, delta parameters and share of the backbone shown are
exactly what the constructor would build. Submit hands the patterns and the site list back to Python.

Example:
    >>> picker = Picker(model, LoraModel, options={"lora_r": 8}).start()
    >>> print(picker.url)          # open it in a browser
    >>> result = picker.wait()     # blocks until Submit (or timeout=...)
    >>> picker.stop()
    >>> LoraModel(model, modified_modules=result.modified_modules, lora_r=8)

``LoraModel(model, interactive_modify=True)`` does the same from the constructor (see :func:`pick_for_constructor`).
"""

from __future__ import annotations

import html
import json
import threading
import webbrowser
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from torch import nn

from ..errors import DeltaError
from .patterns import compact_patterns, verify_patterns
from .preview import backbone_parameters, plan_preview
from .server import LOOPBACK, LocalServer, RequestError
from .tree import module_tree, role_map, selectable_names


class PickerCancelled(DeltaError):
    """The user pressed Cancel on the picker page; nothing was changed."""


@dataclass
class PickResult:
    """What the user submitted.

    Attributes:
        modified_modules: Compact patterns matching exactly the chosen modules (verified by the matcher).
        sites: The modules the delta would modify, in model order (from the method's own planning).
        delta_type: The method chosen.
        options: The hyper-parameters the preview used.
        parameters: Delta parameters of that plan.
    """

    modified_modules: list[str]
    sites: list[str]
    delta_type: str
    options: dict[str, Any] = field(default_factory=dict)
    parameters: int = 0


def static_text(name: str) -> str:
    """A file shipped in ``deltakit/web/static`` (package data)."""
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _registry() -> dict[str, Any]:
    from ..registry import DELTA_REGISTRY  # filled by deltakit.deltas, imported by whoever made the picker

    return dict(DELTA_REGISTRY)


class Picker:
    """A picker page for ``model``; non-blocking (:meth:`start`, :attr:`url`, :meth:`wait`, :meth:`stop`).

    Args:
        model: The backbone (meta-device models work: nothing is computed with the weights).
        delta_class: The method class (``LoraModel``) or its delta type (``"lora"``).
        options: The method's other hyper-parameters for the preview (``{"lora_r": 16}``).
        modified_modules: Patterns ticked when the page opens (``None``: the method's default positions).
        exclude_modules: Removed from that first selection.
        editable: Whether the page may change the method and its options (the CLI); a constructor's are fixed.
        host, port, allowed_hosts: Where to serve (see :class:`~deltakit.web.server.LocalServer`): loopback and
            a free port by default.
    """

    def __init__(
        self,
        model: nn.Module,
        delta_class: Any = "lora",
        *,
        options: dict[str, Any] | None = None,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        editable: bool = True,
        host: str = LOOPBACK,
        port: int = 0,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise DeltaError(f"Picker needs the model (an nn.Module), got {type(model).__name__}.")
        self.model = model
        self.delta_class = self._method(delta_class)
        self.options = dict(options or {})
        self.editable = editable
        self._lock = threading.Lock()  # one plan at a time: build_detached reads the model from handler threads
        self._done = threading.Event()
        self._result: PickResult | None = None
        self._cancelled = False
        self.names = selectable_names(model)
        roles = role_map(model)["roles"]
        self.tree = module_tree(model, roles)
        index = {n: i for i, n in enumerate(self.tree["names"])}
        self.roles = {r: [index[n] for n in names if n in index] for r, names in roles.items()}
        self.roles = {r: ids for r, ids in self.roles.items() if ids}
        self.backbone = backbone_parameters(model)
        self.initial = self._initial_selection(modified_modules, exclude_modules)
        self.server = LocalServer(
            self._page,
            {"/api/tree": self._api_tree, "/api/preview": self._api_preview, "/api/submit": self._api_submit,
             "/api/cancel": self._api_cancel},
            host=host, port=port, allowed_hosts=allowed_hosts,
        )

    # ------------------------------------------------------------------ the API object
    def start(self, open_browser: bool = False) -> Picker:
        """Start serving (returns self); ``open_browser`` also opens :attr:`url` in the default browser."""
        self.server.start()
        if open_browser:
            webbrowser.open(self.url)
        return self

    @property
    def url(self) -> str:
        """The page's URL with its token."""
        return self.server.url

    def wait(self, timeout: float | None = None) -> PickResult | None:
        """Block until the user submits (the result), cancels (:class:`PickerCancelled`) or ``timeout`` seconds
        pass (``None``); the server keeps running until :meth:`stop`."""
        if not self._done.wait(timeout):
            return None
        if self._cancelled:
            raise PickerCancelled("The module picker was cancelled on its page; nothing was changed.")
        return self._result

    def stop(self) -> None:
        """Stop the server and end its thread (idempotent)."""
        self.server.stop()

    def __enter__(self) -> Picker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ planning
    def _method(self, delta_class: Any) -> Any:
        if isinstance(delta_class, str):
            registry = _registry()
            if delta_class not in registry:
                raise DeltaError(f"Unknown delta type {delta_class!r}; known: {', '.join(sorted(registry))}.")
            return registry[delta_class]
        if not (isinstance(delta_class, type) and hasattr(delta_class, "build_detached")):
            raise DeltaError(f"Picker needs a delta class (LoraModel) or type name ('lora'), got {delta_class!r}.")
        return delta_class

    def _initial_selection(self, modified: list[str] | None, exclude: list[str] | None) -> list[str]:
        """The sites the given patterns (or the defaults) give, ticked when the page opens; none if they fail."""
        try:
            return [s["module"] for s in plan_preview(self.delta_class, self.model, modified, exclude,
                                                      self.options)["sites"]]
        except DeltaError:
            return []

    def preview(self, selection: list[str], delta_class: Any = None, options: dict[str, Any] | None = None
                ) -> dict[str, Any]:
        """Patterns, sites and parameter counts for ``selection`` (what the page shows).

        Raises:
            DeltaError: the method refuses a module, an option is bad, or the selection cannot be written as
                patterns.
        """
        cls = self.delta_class if delta_class is None else self._method(delta_class)
        options = self.options if options is None else options
        answer: dict[str, Any] = {"delta_type": cls.delta_type, "backbone_parameters": self.backbone}
        if not selection:
            return {**answer, "patterns": [], "sites": [], "parameters": 0, "shared_parameters": 0, "share": 0.0}
        with self._lock:
            patterns = compact_patterns(self.names, selection)
            verify_patterns(self.model, patterns, selection)
            plan = plan_preview(cls, self.model, patterns, None, options)
        sites = [s["module"] for s in plan["sites"]]
        answer.update(
            patterns=patterns,
            sites=sites,
            parameters=plan["parameters"],
            shared_parameters=plan["shared_parameters"],
            share=100.0 * plan["parameters"] / self.backbone if self.backbone else 0.0,
        )
        if set(sites) != set(selection):
            answer["note"] = (f"{cls.__name__} places its sites itself: it modifies {len(sites)} modules for "
                              f"the {len(selection)} selected.")
        return answer

    # ------------------------------------------------------------------ the API
    def _read_request(self, body: dict[str, Any]) -> tuple[list[str], Any, dict[str, Any]]:
        selection = body.get("selection")
        if not isinstance(selection, list) or not all(isinstance(n, str) for n in selection):
            raise RequestError(400, "'selection' must be a list of module names")
        if len(selection) > len(self.names):
            raise RequestError(400, "'selection' is longer than the model's module list")
        delta_type, options = body.get("delta_type"), body.get("options")
        if not self.editable:
            if delta_type not in (None, self.delta_class.delta_type) or options not in (None, self.options):
                raise RequestError(400, "this picker's method and options are fixed by the constructor call")
            return list(dict.fromkeys(selection)), self.delta_class, self.options
        if delta_type is not None and not isinstance(delta_type, str):
            raise RequestError(400, "'delta_type' must be a string")
        if options is not None and not isinstance(options, dict):
            raise RequestError(400, "'options' must be a JSON object of hyper-parameters")
        cls = self._method(delta_type) if delta_type is not None else self.delta_class
        return list(dict.fromkeys(selection)), cls, self.options if options is None else options

    def _api_tree(self, body: dict[str, Any]) -> dict[str, Any]:
        index = {n: i for i, n in enumerate(self.tree["names"])}
        methods = sorted(_registry()) if self.editable else [self.delta_class.delta_type]
        return {
            "tree": self.tree,
            "roles": self.roles,
            "methods": methods,
            "delta_type": self.delta_class.delta_type,
            "options": self.options,
            "editable": self.editable,
            "initial": [index[n] for n in self.initial if n in index],
            "backbone_parameters": self.backbone,
        }

    def _api_preview(self, body: dict[str, Any]) -> dict[str, Any]:
        selection, cls, options = self._read_request(body)
        return self.preview(selection, cls, options)

    def _api_submit(self, body: dict[str, Any]) -> dict[str, Any]:
        selection, cls, options = self._read_request(body)
        if not selection:
            raise RequestError(400, "nothing is selected: tick at least one module")
        answer = self.preview(selection, cls, options)
        if not self._done.is_set():
            self._result = PickResult(answer["patterns"], answer["sites"], cls.delta_type, dict(options),
                                      answer["parameters"])
            self._done.set()
        return {**answer, "done": True}

    def _api_cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self._done.is_set():
            self._cancelled = True
            self._done.set()
        return {"done": True, "cancelled": self._cancelled}

    def _page(self, nonce: str) -> bytes:
        page = static_text("picker.html")
        parts = {
            "__TITLE__": html.escape(f"deltakit picker: {self.tree['model']}"),
            "__NONCE__": nonce,
            "__CSS__": static_text("tree.css") + static_text("picker.css"),
            "__JS__": static_text("picker.js"),
        }
        for key, value in parts.items():
            page = page.replace(key, value)
        return page.encode("utf-8")


def pick_for_constructor(delta_class: Any, model: nn.Module, values: dict[str, Any], interactive: Any) -> list[str]:
    """Run the picker for ``DeltaModel(model, ..., interactive_modify=...)`` and return the chosen patterns.

    Blocks until the page is submitted; the server always stops. ``values`` are the constructor's config fields
    (their ``modified_modules`` / ``exclude_modules`` give the first selection).

    Raises:
        PickerCancelled: the user pressed Cancel (the model is untouched).
        DeltaError: ``interactive`` is neither ``True`` nor a port number.
    """
    if interactive is True:
        port = 0
    elif isinstance(interactive, int) and not isinstance(interactive, bool) and 1 <= interactive <= 65535:
        port = interactive
    else:
        raise DeltaError(
            f"interactive_modify must be True (any free port) or a port number from 1 to 65535, got {interactive!r}."
        )
    if "modified_modules" not in values:
        raise DeltaError(f"{delta_class.__name__} places its sites itself (no modified_modules): nothing to pick.")
    options = {k: v for k, v in values.items() if k not in ("modified_modules", "exclude_modules")}
    picker = Picker(model, delta_class, options=options, modified_modules=values["modified_modules"],
                    exclude_modules=values.get("exclude_modules"), editable=False, port=port)
    picker.start()
    try:
        print(f"deltakit: choose the modules for {delta_class.__name__} at {picker.url}", flush=True)
        result = picker.wait()
    finally:
        picker.stop()
    assert result is not None  # wait() without a timeout returns only on submit (or raises on cancel)
    return result.modified_modules


def selection_json(result: PickResult) -> str:
    """The submitted selection as JSON (what ``deltakit pick`` prints)."""
    return json.dumps({"delta_type": result.delta_type, "modified_modules": result.modified_modules,
                       "sites": result.sites, "options": result.options, "parameters": result.parameters}, indent=2)
