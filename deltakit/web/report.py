"""A visual report of a delta: where it sits, its parameters per layer and site kind, and how large each update is.

For a live delta (or a checkpoint loaded onto a given backbone) the update of a site is measured with the method's
own ``merge_deltas`` when it has one: the Frobenius norm of the weight change the site is equivalent to
(``||s B A||_F`` for LoRA, the bias for BitFit). Methods that are not a change of weights (adapters, prefixes) have
no such form, and there is no per-method hook for it, so their sites are measured by the norm of their own
parameters; the page says which measure it used. A checkpoint read without a backbone is measured by the norms of
its stored tensors.

Outputs: :func:`write_report_html` (one self-contained file: inline CSS, no script, no network) and
:func:`write_report_png` (matplotlib; ``pip install 'delta-tuning-kit[report]'``).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_checkpoint_meta, read_weights, saved_sites
from ..config import CONFIG_NAME
from ..errors import DeltaError
from .preview import backbone_parameters
from .tree import _Raw, _Viewer, module_tree, role_map

MEASURE_MERGE = "merge_deltas"
MEASURE_PARAMS = "parameter norm"
MEASURE_TEXT = {
    MEASURE_MERGE: "||ΔW||_F: the Frobenius norm of the weight change each site is equivalent to, from the method's "
                   "merge_deltas (for LoRA ||s·B·A||_F).",
    MEASURE_PARAMS: "the Frobenius norm of each site's own parameters (this method is not a change of host weights, "
                    "so there is no ΔW to measure; a per-method measure is not available).",
}


# ------------------------------------------------------------------------------------------------------ data
def split_site(name: str) -> tuple[str, str]:
    """``"model.layers.3.self_attn.q_proj"`` -> ``("model.layers.3", "model.layers.*.self_attn.q_proj")``: the layer
    (up to the first numeric part) and the kind (the name with that index starred). No index: ``("-", name)``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[:i] + ["*"] + parts[i + 1:])
    return "-", name


def _norm(tensors: Iterable[torch.Tensor]) -> float | None:
    total = 0.0
    for t in tensors:
        if t.is_meta:
            return None
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def _site_measure(site: Any) -> tuple[str, float | None, float | None]:
    """(measure, norm of the update, norm relative to the host weights it changes or None)."""
    merge = type(site.module).merge_deltas
    with torch.no_grad():
        if merge is not None:
            try:
                deltas = site.module.merge_deltas(site.host)
            except DeltaError:  # this host cannot take it (e.g. BitFit on a bias-less Linear, grouped conv LoRA)
                return MEASURE_PARAMS, _norm(site.module.parameters()), None
            norm = _norm(deltas.values())
            weights = [getattr(site.host, p) for p in deltas]
            base = _norm(weights)
            return MEASURE_MERGE, norm, (norm / base if norm is not None and base else None)
        return MEASURE_PARAMS, _norm(site.module.parameters()), None


def _summaries(sites: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    layers: dict[str, dict[str, Any]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for s in sites:
        for table, key in ((layers, s["layer"]), (kinds, s["kind"])):
            row = table.setdefault(key, {"key": key, "sites": 0, "parameters": 0, "_sq": 0.0, "max": 0.0,
                                         "host_type": s["host_type"], "_known": True})
            row["sites"] += 1
            row["parameters"] += s["parameters"]
            if s["update_norm"] is None:
                row["_known"] = False
            else:
                row["_sq"] += s["update_norm"] ** 2
                row["max"] = max(row["max"], s["update_norm"])
            if row["host_type"] != s["host_type"]:
                row["host_type"] = "mixed"
    out = []
    for table in (layers, kinds):
        rows = []
        for row in table.values():
            known = row.pop("_known")
            sq = row.pop("_sq")
            row["update_norm"] = math.sqrt(sq) if known else None
            row["mean_update_norm"] = math.sqrt(sq / row["sites"]) if known else None
            rows.append(row)
        out.append(rows)
    return out[0], out[1]


def _site_row(name: str, host_type: str, parameters: int, measure: str, norm: float | None,
              relative: float | None) -> dict[str, Any]:
    layer, kind = split_site(name)
    return {"module": name, "host_type": host_type, "layer": layer, "kind": kind, "parameters": parameters,
            "measure": measure, "update_norm": norm, "relative": relative}


def _live_data(delta: Any, source: str) -> dict[str, Any]:
    model = delta.backbone_model
    sites = []
    for site in delta.sites:
        measure, norm, relative = _site_measure(site)
        sites.append(_site_row(site.name, type(site.host).__name__,
                               sum(p.numel() for p in site.module.parameters()), measure, norm, relative))
    shared = sum(p.numel() for p in delta.shared.parameters()) if delta.shared is not None else 0
    roles = role_map(model)["roles"]
    tree = module_tree(model, roles)
    backbone = backbone_parameters(model)
    return _finish({
        "source": source,
        "model": type(model).__name__,
        "delta_type": delta.delta_type,
        "name": delta.child_name,
        "state": delta.state,
        "config": delta.config.to_dict() if hasattr(delta.config, "to_dict") else {},
        "backbone_parameters": backbone,
        "shared_parameters": shared,
        "shared_norm": _norm(delta.shared.parameters()) if delta.shared is not None else None,
        "unfrozen": list(getattr(delta, "unfrozen_parameter_names", [])),
        "sites": sites,
        "tree": tree,
    })


def _checkpoint_data(path: str) -> dict[str, Any]:
    meta = read_checkpoint_meta(path)
    where = os.path.join(path, CONFIG_NAME)
    # the config lists sites in its range form; without the model, layer order (numbers compared as numbers) is
    # the closest to model order
    names = sorted(saved_sites(meta, where), key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                                              for p in n.split(".")])
    tensors = read_weights(path)
    delta_type = meta["delta_type"]
    sites = []
    for name in names:
        prefix = f"{name}.{delta_type}."
        own = [t for key, t in tensors.items() if key.startswith(prefix)]
        sites.append(_site_row(name, "?", sum(t.numel() for t in own), MEASURE_PARAMS, _norm(own), None))
    shared = [t for key, t in tensors.items() if key.startswith(f"{delta_type}_shared.")]
    fingerprint = meta.get("fingerprint") or {}
    return _finish({
        "source": f"checkpoint {path} (read without a backbone: pass a model to measure merged updates)",
        "model": str(fingerprint.get("class", fingerprint.get("backbone_class", "?"))),
        "delta_type": delta_type,
        "name": delta_type,
        "state": "saved",
        "config": meta.get("config", {}),
        "backbone_parameters": None,
        "shared_parameters": sum(t.numel() for t in shared),
        "shared_norm": _norm(shared) if shared else None,
        "unfrozen": list(meta.get("backbone_tensors", [])),
        "sites": sites,
        "tree": names_tree(names),
    })


def _finish(data: dict[str, Any]) -> dict[str, Any]:
    sites = data["sites"]
    data["layers"], data["kinds"] = _summaries(sites)
    data["delta_parameters"] = data["shared_parameters"] + sum(s["parameters"] for s in sites)
    backbone = data["backbone_parameters"]
    data["share"] = 100.0 * data["delta_parameters"] / backbone if backbone else None
    measures = sorted({s["measure"] for s in sites})
    data["measure"] = measures[0] if len(measures) == 1 else "mixed"
    data["measure_text"] = " ".join(MEASURE_TEXT[m] for m in measures)
    norms = [s["update_norm"] for s in sites if s["update_norm"] is not None]
    data["untrained"] = bool(norms) and data["measure"] == MEASURE_MERGE and max(norms) == 0.0
    index = {n: i for i, n in enumerate(data["tree"]["names"])}
    data["site_indices"] = sorted(index[s["module"]] for s in sites if s["module"] in index)
    return data


def names_tree(names: list[str]) -> dict[str, Any]:
    """The folded tree of the modules on the paths to ``names`` (a checkpoint without its backbone): the same
    node format as :func:`~deltakit.web.tree.module_tree`, module types unknown."""
    trie: dict[str, Any] = {}
    for name in names:
        node = trie
        for part in name.split("."):
            node = node.setdefault(part, {})
    prints: dict[tuple[Any, ...], int] = {}

    def build(node: dict[str, Any], full: str, local: str) -> _Raw:
        raw = _Raw(full, local, "", "", 0)
        for part, sub in node.items():
            raw.children.append(build(sub, f"{full}.{part}" if full else part, part))
        key = ("", "", tuple((c.local, c.fingerprint) for c in raw.children))
        raw.fingerprint = prints.setdefault(key, len(prints))
        return raw

    viewer = _Viewer({})
    root = viewer.view([build(trie, "", "checkpoint")], "checkpoint")
    return {"root": root, "names": list(viewer.index), "model": "checkpoint"}


def report_data(source: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """Everything the report shows, as data.

    Args:
        source: A live delta object (``LoraModel(...)``), or a checkpoint directory written by ``save_finetuned``.
        model: For a checkpoint: the backbone to load it onto (the update of each site is then measured with
            ``merge_deltas``; the delta is detached again afterwards, leaving the model as it was). Without it the
            checkpoint's stored tensors are measured.

    Raises:
        DeltaError: the source is neither; CheckpointError for a bad checkpoint.
    """
    if hasattr(source, "sites") and hasattr(source, "backbone_model"):
        return _live_data(source, f"live delta '{source.child_name}' on {type(source.backbone_model).__name__}")
    if not isinstance(source, (str, os.PathLike)):
        raise DeltaError(f"A report needs a delta object or a checkpoint directory, got {type(source).__name__}.")
    path = os.fspath(source)
    if not os.path.isdir(path):
        raise DeltaError(f"No checkpoint directory at {path!r}: pass a directory written by save_finetuned.")
    if model is None:
        return _checkpoint_data(path)
    from ..auto import AutoDeltaModel

    delta = AutoDeltaModel.from_finetuned(path, model)
    try:
        data = _live_data(delta, f"checkpoint {path} loaded onto {type(model).__name__}")
    finally:
        delta.detach()
    data["state"] = "saved"
    return data


# ------------------------------------------------------------------------------------------------------ HTML
def _fmt(n: float | None, digits: int = 4) -> str:
    if n is None:
        return "-"
    if isinstance(n, int):
        return f"{n:,}"
    return f"{n:.{digits}g}"


def _tree_html(node: dict[str, Any], sites: set[int], depth: int = 0, root: bool = False) -> str:
    hits = sum(1 for i in node["n"] if i in sites)
    below = _subtree_hits(node, sites)
    classes = ["node"]
    if node["n"] and hits == len(node["n"]):
        classes.append("site")
    if "m" in node:
        classes.append("folded")
    label = (f'<span class="label">{html.escape(node["l"])}</span>'
             + (f' <span class="type">({html.escape(node["t"])})</span>' if node["t"] else "")
             + (f' <span class="count">×{len(node["n"])}</span>' if len(node["n"]) > 1 else "")
             + (f' <span class="shape">{html.escape(node["s"])}</span>' if node.get("s") else "")
             + "".join(f' <span class="role">{html.escape(r)}</span>' for r in node.get("r", ()))
             + (f' <span class="hits">{hits}/{len(node["n"])} sites</span>' if hits else "")
             + (f' <span class="below">{below} sites inside</span>' if below and not hits else ""))
    kids = node.get("c", [])
    if not kids and "m" not in node:
        return f'<li class="{" ".join(classes)}"><span class="row">{label}</span></li>'
    inner = "".join(_tree_html(k, sites, depth + 1) for k in kids)
    members = ""
    if "m" in node:
        members = (f'<li class="members"><details><summary>unfold ×{len(node["m"])}</summary><ul>'
                   + "".join(_tree_html(m, sites, depth + 1) for m in node["m"]) + "</ul></details></li>")
    opened = " open" if root or below else ""
    return (f'<li class="{" ".join(classes)}"><details{opened}><summary class="row">{label}</summary>'
            f"<ul>{inner}{members}</ul></details></li>")


def _subtree_hits(node: dict[str, Any], sites: set[int]) -> int:
    total = 0
    for kid in node.get("c", []):
        total += sum(1 for i in kid["n"] if i in sites) + _subtree_hits(kid, sites)
    return total


def _bars(rows: list[tuple[str, float | None]], unit: str, color: str) -> str:
    """A horizontal SVG bar chart (inline, no script)."""
    known = [v for _, v in rows if v is not None]
    top = max(known) if known else 0.0
    height, label_w, bar_w = 18, 260, 360
    parts = [f'<svg class="bars" width="{label_w + bar_w + 120}" height="{height * len(rows) + 4}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img">']
    for i, (label, value) in enumerate(rows):
        y = i * height + 2
        w = 0 if not value or not top else max(1.0, bar_w * value / top)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{html.escape(label[-40:])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{height - 5}" fill="{color}"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + 13}">{html.escape(_fmt(value))}{unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heat(data: dict[str, Any]) -> str:
    """Layers x site kinds, each cell shaded by the update size (or marked when sizes are unknown)."""
    layers = [r["key"] for r in data["layers"]]
    kinds = [r["key"] for r in data["kinds"]]
    cells = {(s["layer"], s["kind"]): s for s in data["sites"]}
    norms = [s["update_norm"] for s in data["sites"] if s["update_norm"] is not None]
    top = max(norms) if norms else 0.0
    head = "".join(f"<th>{html.escape(k.split('*.')[-1])}</th>" for k in kinds)
    rows = []
    for layer in layers:
        tds = []
        for kind in kinds:
            s = cells.get((layer, kind))
            if s is None:
                tds.append("<td></td>")
                continue
            v = s["update_norm"]
            alpha = 0.12 + 0.88 * (v / top) if v is not None and top else 0.12
            tds.append(f'<td class="cell" style="background: rgba(123,31,162,{alpha:.3f})" '
                       f'title="{html.escape(s["module"])}: {_fmt(v)}">{_fmt(v, 3)}</td>')
        rows.append(f"<tr><th>{html.escape(layer)}</th>{''.join(tds)}</tr>")
    return f'<table class="heat"><tr><th>layer \\ site</th>{head}</tr>{"".join(rows)}</table>'


def _table(headers: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def render_html(data: dict[str, Any]) -> str:
    """The report page as one self-contained HTML string (inline CSS, no script, nothing fetched)."""
    esc = html.escape
    share = f"{data['share']:.4f}%" if data["share"] is not None else "-"
    summary = [
        ["source", esc(data["source"])],
        ["backbone", esc(data["model"])],
        ["delta", f"{esc(data['delta_type'])} '{esc(data['name'])}' ({esc(data['state'])})"],
        ["sites", f"{len(data['sites']):,}"],
        ["delta parameters", f"{data['delta_parameters']:,}"
         + (f" ({data['shared_parameters']:,} shared by all sites)" if data["shared_parameters"] else "")],
        ["backbone parameters", _fmt(data["backbone_parameters"])],
        ["share of backbone", share],
        ["update measure", esc(data["measure_text"])],
    ]
    if data["unfrozen"]:
        summary.append(["unfrozen backbone tensors", esc(", ".join(data["unfrozen"]))])
    config = ", ".join(f"{esc(str(k))}={esc(str(v))}" for k, v in data["config"].items())
    summary.append(["config", config])
    warn = ('<p class="warn" id="untrained">Every update is exactly zero: this delta has not been trained yet '
            "(LoRA starts with B = 0).</p>") if data["untrained"] else ""
    site_rows = [[esc(s["module"]), esc(s["host_type"]), f"{s['parameters']:,}", _fmt(s["update_norm"]),
                  _fmt(s["relative"])] for s in data["sites"]]
    kind_rows = [[esc(k["key"]), esc(k["host_type"]), f"{k['sites']:,}", f"{k['parameters']:,}",
                  _fmt(k["mean_update_norm"]), _fmt(k["max"] if k["update_norm"] is not None else None)]
                 for k in data["kinds"]]
    sites = set(data["site_indices"])
    tree = _tree_html(data["tree"]["root"], sites, root=True)
    css = _static("tree.css") + _static("report.css")
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>deltakit report: {esc(data['delta_type'])} on {esc(data['model'])}</title>
<style>{css}</style></head>
<body><main class="report">
<h1>deltakit report: {esc(data['delta_type'])} on {esc(data['model'])}</h1>
{warn}
{_table(["", ""], summary, "summary")}
<h2>Where the delta sits</h2>
<div class="tree" id="tree"><ul>{tree}</ul></div>
<h2>Update size per layer and site</h2>
<p class="note">{esc(data['measure_text'])}</p>
{_heat(data)}
<h2>Trainable parameters per layer</h2>
<div id="per-layer">{_bars([(r['key'], r['parameters']) for r in data['layers']], '', '#7b1fa2')}</div>
<h2>Update size per layer</h2>
<div id="update-per-layer">{_bars([(r['key'], r['update_norm']) for r in data['layers']], '', '#0277bd')}</div>
<h2>Per site kind</h2>
{_table(["site kind", "host type", "sites", "parameters", "rms update", "max update"], kind_rows, "kinds")}
<h2>Every site</h2>
{_table(["module", "host type", "parameters", "update", "update / host weight"], site_rows, "sites")}
</main></body></html>
"""
    return body


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def write_report_html(data: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Write the self-contained HTML report to ``path``; returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(data))
    return path


# ------------------------------------------------------------------------------------------------------ PNG
def write_report_png(data: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Draw the report's figures into one PNG (needs matplotlib: ``pip install 'delta-tuning-kit[report]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise DeltaError(
            "The PNG report needs matplotlib, which is not installed: pip install 'delta-tuning-kit[report]' "
            "(or pip install matplotlib). The HTML report needs nothing extra."
        ) from None
    path = os.fspath(path)
    layers = [r["key"] for r in data["layers"]]
    kinds = [r["key"] for r in data["kinds"]]
    grid = [[math.nan] * len(kinds) for _ in layers]
    for s in data["sites"]:
        value = s["update_norm"] if s["update_norm"] is not None else 0.0
        grid[layers.index(s["layer"])][kinds.index(s["kind"])] = value
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.5, 0.28 * len(layers) + 1.5)),
                             gridspec_kw={"width_ratios": [max(2, len(kinds)), 3, 3]})
    heat, params_ax, norm_ax = axes
    image = heat.imshow(grid, aspect="auto", cmap="Purples", interpolation="nearest")
    heat.set_xticks(range(len(kinds)), [k.split("*.")[-1] for k in kinds], rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(len(layers)), layers, fontsize=7)
    heat.set_title(f"where the delta sits: update size\n({data['measure']})", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.046)
    ys = list(range(len(layers)))
    params_ax.barh(ys, [r["parameters"] for r in data["layers"]], color="#7b1fa2")
    params_ax.set_yticks(ys, [""] * len(ys))
    params_ax.invert_yaxis()
    params_ax.set_title("trainable parameters per layer", fontsize=10)
    norm_ax.barh(ys, [r["update_norm"] or 0.0 for r in data["layers"]], color="#0277bd")
    norm_ax.set_yticks(ys, [""] * len(ys))
    norm_ax.invert_yaxis()
    norm_ax.set_title("update size per layer", fontsize=10)
    fig.suptitle(f"deltakit: {data['delta_type']} on {data['model']} — {len(data['sites'])} sites, "
                 f"{data['delta_parameters']:,} parameters", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def delta_report(
    source: Any,
    html_path: str | os.PathLike[str] | None = None,
    png_path: str | os.PathLike[str] | None = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Build the report of a delta (live object or checkpoint directory) and write the files asked for.

    Example:
        >>> delta_report(delta, html_path="report.html", png_path="report.png")

    Returns:
        The report data (see :func:`report_data`).
    """
    data = report_data(source, model)
    if html_path is not None:
        write_report_html(data, html_path)
    if png_path is not None:
        write_report_png(data, png_path)
    return data
