"""What a pruning run chose and why, as one self-contained HTML page plus PNG files.

``write_report([DIR, ...], OUT)`` reads each folder's sparsity.json and writes ``OUT/index.html``
with, per result: the sparsity of every layer (one bar each), the statistics behind it (OWL's
outlier ratios, the sensitivity measurements), each layer's reconstruction error; and, across
results: perplexity against sparsity (search candidates included) and the size on disk. Figures
are inline SVG, so the page opens from a file without a server; each is also written as a PNG
next to it, linked from the page.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # no pyplot: no global state, PNGs through Agg
from matplotlib.patches import Rectangle
from matplotlib.ticker import FormatStrFormatter

from .checkpoint import METADATA_FILE, atomic_folder, folder_bytes, read_metadata
from .errors import SparseLLMError
from .logging_utils import logger

REPORT_FILE = "index.html"
KIND_COLORS = matplotlib.colormaps["tab10"].colors


@dataclass
class Result:
    """One pruned folder: its sparsity.json and its bytes on disk."""

    folder: Path
    label: str
    metadata: dict
    bytes_on_disk: int
    weight_bytes: int

    @property
    def perplexity(self) -> float | None:
        return (self.metadata.get("evaluation") or {}).get("pruned", {}).get("perplexity")

    @property
    def dense_perplexity(self) -> float | None:
        return (self.metadata.get("evaluation") or {}).get("dense", {}).get("perplexity")

    @property
    def allocation(self) -> dict:
        return self.metadata.get("allocation") or {"name": "uniform", "statistics": {}}

    @property
    def series(self) -> str:
        pattern = self.metadata.get("pattern", "?")
        return f"{self.metadata.get('method', '?')} {pattern} {self.allocation['name']}"


def load_result(folder: str | os.PathLike, label: str | None = None) -> Result:
    folder = Path(folder)
    if not folder.is_dir():
        raise SparseLLMError(f"not a folder: {folder}")
    metadata = read_metadata(folder)
    if metadata is None:
        raise SparseLLMError(f"{folder} holds no {METADATA_FILE}: is it a sparsellm output?")
    return Result(folder, label or folder.name, metadata, folder_bytes(folder), folder_bytes(folder, ".safetensors"))


def _layer_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _block_of(name: str, blocks: Sequence[str]) -> int:
    return next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), -1)


def _shade_blocks(axis, layers: Sequence[dict], blocks: Sequence[str]) -> None:
    """Alternate grey bands per decoder block behind per-layer bars."""
    owners = [_block_of(layer["name"], blocks) for layer in layers]
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            if owners[start] % 2:
                axis.axvspan(start - 0.5, i - 0.5, color="0.93", zorder=0)
            start = i


def _per_layer_bars(axis, layers: Sequence[dict], values: Sequence[float], blocks: Sequence[str], gid: str) -> None:
    kinds = list(dict.fromkeys(_layer_kind(layer["name"]) for layer in layers))
    colors = [KIND_COLORS[kinds.index(_layer_kind(layer["name"])) % len(KIND_COLORS)] for layer in layers]
    bars = axis.bar(range(len(layers)), values, width=0.85, color=colors, zorder=2)
    for bar, layer in zip(bars, layers, strict=True):
        bar.set_gid(f"{gid}:{layer['name']}")
    handles = [Rectangle((0, 0), 1, 1, color=KIND_COLORS[i % len(KIND_COLORS)]) for i in range(len(kinds))]
    axis.legend(handles, kinds, ncol=min(len(kinds), 7), fontsize=7, loc="upper right", framealpha=0.9)
    _shade_blocks(axis, layers, blocks)
    ticks = [i for i, layer in enumerate(layers) if i == 0 or _block_of(layer["name"], blocks)
             != _block_of(layers[i - 1]["name"], blocks)]
    axis.set_xticks(ticks, [str(max(_block_of(layers[i]["name"], blocks), 0)) for i in ticks], fontsize=7)
    axis.set_xlabel("layer (ticks: first layer of each block)")
    axis.set_xlim(-0.7, len(layers) - 0.3)


def _block_names(metadata: dict) -> list[str]:
    names = [block["block"] for block in metadata.get("blocks", [])]
    return names or list(dict.fromkeys(layer["name"].rsplit(".", 2)[0] for layer in metadata.get("layers", [])))


def sparsity_figure(result: Result, gid: str):
    layers = result.metadata.get("layers", [])
    figure = Figure(figsize=(12, 3.6))
    axis = figure.subplots()
    _per_layer_bars(axis, layers, [layer["sparsity"] for layer in layers], _block_names(result.metadata), gid)
    target = result.metadata.get("sparsity")
    if target is not None:
        axis.axhline(target, color="black", linestyle="--", linewidth=1, label="target", zorder=3)
    axis.set_ylabel("sparsity")
    axis.set_ylim(0, 1)
    axis.set_title(f"{result.label}: sparsity per layer ({result.series}; mean "
                   f"{result.metadata.get('achieved_sparsity', 0):.4f})")
    return figure


def error_figure(result: Result, gid: str):
    layers = [layer for layer in result.metadata.get("layers", []) if layer.get("relative_error") is not None]
    figure = Figure(figsize=(12, 3.2))
    axis = figure.subplots()
    _per_layer_bars(axis, layers, [layer["relative_error"] for layer in layers], _block_names(result.metadata), gid)
    axis.set_ylabel("||(W - W')X|| / ||WX||")
    axis.set_title(f"{result.label}: reconstruction error per layer (first calibration tokens)")
    return figure


def _allocated_per_group(result: Result, groups: Sequence[str]) -> list[float]:
    """Parameter-weighted sparsity target of each group (a block, or one layer)."""
    shares = []
    for group in groups:
        members = [layer for layer in result.metadata.get("layers", [])
                   if layer["name"] == group or layer["name"].startswith(group + ".")]
        size = sum(layer["shape"][0] * layer["shape"][1] for layer in members)
        shares.append(sum(layer["target"] * layer["shape"][0] * layer["shape"][1] for layer in members) / size
                      if size else float("nan"))
    return shares


def profile_figure(result: Result):
    """The statistics that led to the allocation (None for allocations that measure nothing)."""
    allocation = result.allocation
    statistics = allocation.get("statistics") or {}
    if allocation["name"] == "owl" and statistics:
        groups, values = statistics["blocks"], statistics["outlier_ratio"]
        figure = Figure(figsize=(12, 3.4))
        axis = figure.subplots()
        axis.bar(range(len(groups)), values, color="tab:orange", zorder=2)
        axis.set_ylabel(f"outlier ratio D (%), M = {allocation['options'].get('m', '?')}")
        title = f"{result.label}: OWL outlier ratio per block, and the sparsity it gave"
    elif allocation["name"] == "sensitivity" and statistics:
        groups = statistics["groups"]
        figure = Figure(figsize=(12, 3.4))
        axis = figure.subplots()
        for index, level in enumerate(statistics["levels"]):
            axis.plot(range(len(groups)), [max(row[index], 1e-9) for row in statistics["loss_increase"]],
                      marker="o", markersize=3, label=f"pruned alone to {level:.2f}", zorder=2)
        axis.set_yscale("log")
        axis.set_ylabel(f"loss increase ({statistics['loss']})")
        axis.legend(fontsize=7, loc="upper left")
        title = f"{result.label}: measured sensitivity per {statistics['granularity']}, and the sparsity it gave"
    else:
        return None
    twin = axis.twinx()
    twin.plot(range(len(groups)), _allocated_per_group(result, groups), color="black", marker="s", markersize=3,
              linewidth=1, label="allocated sparsity", zorder=3)
    twin.set_ylabel("allocated sparsity")
    twin.legend(fontsize=7, loc="upper right")
    axis.set_xticks(range(len(groups)), [g.rsplit(".", 1)[-1] if len(groups) < 60 else "" for g in groups],
                    fontsize=7, rotation=90 if len(groups) > 40 else 0)
    axis.set_xlabel("block" if statistics.get("granularity", "block") == "block" else "layer")
    axis.set_title(title)
    return figure


def perplexity_figure(results: Sequence[Result]):
    """Perplexity against sparsity: one line per (method, pattern, allocation), search candidates as dots."""
    figure = Figure(figsize=(8, 4.5))
    axis = figure.subplots()
    series: dict[str, list[tuple[float, float]]] = {}
    dense = [r.dense_perplexity for r in results if r.dense_perplexity is not None]
    for result in results:
        if result.perplexity is not None:
            series.setdefault(result.series, []).append((result.metadata.get("achieved_sparsity", 0.0),
                                                         result.perplexity))
    for name, points in series.items():
        points = sorted(([(0.0, dense[0])] if dense else []) + points)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for result in results:
        candidates = (result.metadata.get("search") or {}).get("candidates", [])
        if candidates:
            axis.scatter([c["achieved_sparsity"] for c in candidates], [c["perplexity"] for c in candidates],
                         marker="x", s=25, label=f"{result.label}: search candidates", zorder=3)
            limit = result.metadata["search"]["dense_perplexity"] * (1 + result.metadata["search"]["max_increase"])
            axis.axhline(limit, color="grey", linestyle=":", linewidth=1)
    if dense:
        axis.axhline(dense[0], color="black", linestyle="--", linewidth=1, label=f"dense {dense[0]:.2f}")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    axis.tick_params(axis="y", which="minor", labelsize=7)
    axis.set_xlabel("sparsity of the pruned layers")
    axis.set_ylabel("perplexity (log scale)")
    axis.set_title("perplexity vs sparsity")
    axis.legend(fontsize=7)
    return figure


def size_figure(results: Sequence[Result]):
    figure = Figure(figsize=(8, 0.5 + 0.45 * len(results)))
    axis = figure.subplots()
    labels = [r.label for r in results]
    axis.barh(labels, [r.weight_bytes / 1e6 for r in results], color="tab:blue", label="weights (.safetensors)")
    axis.barh(labels, [(r.bytes_on_disk - r.weight_bytes) / 1e6 for r in results],
              left=[r.weight_bytes / 1e6 for r in results], color="tab:gray", label="other files")
    axis.invert_yaxis()
    axis.set_xlabel("MB on disk")
    axis.set_title("size on disk")
    axis.legend(fontsize=7)
    return figure


def _svg(figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, searchable
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _table(results: Sequence[Result]) -> str:
    head = ("folder", "method", "pattern", "allocation", "target", "sparsity", "perplexity (dense → pruned)",
            "MB on disk", "seconds")
    rows = []
    for r in results:
        m = r.metadata
        ppl = f"{r.dense_perplexity:.3f} → {r.perplexity:.3f}" if r.perplexity and r.dense_perplexity else (
            f"{r.perplexity:.3f}" if r.perplexity else "not measured (sparsellm prune --eval)")
        target = m.get("sparsity")
        if m.get("search"):
            target = f"ppl +{100 * m['search']['max_increase']:g} % → {m['search']['chosen']:g}"
        elif m.get("size_search"):
            target = f"≤ {m['size_search']['max_bytes'] / 1e6:g} MB → {m['size_search']['chosen']:g}"
        cells = (r.label, m.get("method", "—"), m.get("pattern", "—"), r.allocation["name"],
                 "—" if target is None else (f"{target:g}" if isinstance(target, float) else target),
                 f"{m.get('achieved_sparsity', 0):.4f}", ppl, f"{r.bytes_on_disk / 1e6:.1f}",
                 f"{m.get('seconds', 0):.0f}")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f3f3f3}figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}svg{max-width:100%;height:auto}
h2{border-bottom:1px solid #ddd;padding-bottom:4px}"""


def write_report(folders: Sequence[str | os.PathLike], output: str | os.PathLike | None = None,
                 overwrite: bool = True) -> Path:
    """Write ``output/index.html`` and its PNG figures for one or several pruned folders."""
    if not folders:
        raise SparseLLMError("give at least one pruned folder")
    results = [load_result(folder) for folder in folders]
    labels = [r.label for r in results]
    if len(set(labels)) < len(labels):  # same folder names under different parents
        for index, result in enumerate(results):
            result.label = f"{index + 1}:{result.label}"
    if output is None:
        if len(results) > 1:
            raise SparseLLMError("comparing several results: say where the report goes (--output)")
        output = results[0].folder / "report"
    sections: list[str] = []
    with atomic_folder(output, overwrite=overwrite) as staging:
        def add(figure, filename: str, caption: str) -> None:
            figure.savefig(staging / filename, dpi=110, bbox_inches="tight", metadata={"Software": None})
            sections.append(f'<figure id="{filename[:-4]}">{_svg(figure)}<figcaption>{html.escape(caption)} '
                            f'<a href="{filename}">{filename}</a></figcaption></figure>')

        sections.append("<h2>Summary</h2>" + _table(results))
        if any(r.perplexity is not None for r in results):
            add(perplexity_figure(results), "perplexity.png", "Perplexity on the evaluation text against sparsity.")
        add(size_figure(results), "size.png", "Bytes on disk of each folder.")
        for index, result in enumerate(results, 1):
            sections.append(f"<h2>{html.escape(result.label)}</h2><p>{html.escape(str(result.folder))}: "
                            f"{html.escape(result.series)}, {len(result.metadata.get('layers', []))} layers</p>")
            if not result.metadata.get("layers"):
                sections.append("<p>No layer was pruned (the search kept the dense model).</p>")
                continue
            add(sparsity_figure(result, f"sparsity-{index}"), f"sparsity-{index}.png",
                "Sparsity of every pruned layer (one bar per layer, coloured by kind; grey bands: blocks).")
            profile = profile_figure(result)
            if profile is not None:
                add(profile, f"allocation-{index}.png", "What the allocation measured on the dense model.")
            add(error_figure(result, f"error-{index}"), f"error-{index}.png",
                "Relative output error of every layer after pruning.")
            options = json.dumps(result.allocation.get("options", {}))
            sections.append(f"<p>allocation options: <code>{html.escape(options)}</code></p>")
        page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>sparsellm report</title>"
                f"<style>{STYLE}</style></head><body><h1>sparsellm report</h1>{''.join(sections)}</body></html>")
        (staging / REPORT_FILE).write_text(page, encoding="utf-8")
    logger.info("report written to %s", Path(output) / REPORT_FILE)
    return Path(output) / REPORT_FILE
