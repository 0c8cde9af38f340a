"""Token heatmap: each token drawn on a background coloured by its causal weight (PNG).

Like the reference's visualisation (white -> indian red, a colour bar labelled "Weight"), but it
builds its own ``Figure`` on the Agg canvas (no pyplot global state, no display needed) and wraps
long rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure

__all__ = ["render_token_heatmap", "WEIGHT_COLORMAP"]

WEIGHT_COLORMAP = LinearSegmentedColormap.from_list("coso_weights", ["#ffffff", "#cd5c5c"])


def _display(token: str) -> str:
    # Make newlines and other control characters visible (the font has no glyph for them: matplotlib
    # warns once per character) and keep mathtext from interpreting '$'.
    token = token.replace("\n", "\\n").replace("$", r"\$")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in token) or " "


def render_token_heatmap(tokens: Sequence[Sequence[str]], weights, path, *,
                         title: str | None = None, max_rows: int = 10,
                         width_inches: float = 14.0, font_size: int = 10) -> Path:
    """Writes a PNG with one block of text per row, each token's background = its weight.

    Args:
      tokens: per row, the decoded token strings to draw (padding already dropped).
      weights: per row, one weight in [0, 1] per token (array [B, L] or ragged lists; extra
        trailing entries, e.g. padding, are ignored).
      path: where to write the PNG (parent directories are created).
      title: optional figure title.
      max_rows: draw at most this many rows.
      width_inches: line width before a row wraps onto the next line.
    Returns:
      The path written.
    """
    path = Path(path)
    rows = list(tokens)[:max_rows]
    if not rows:
        raise ValueError("render_token_heatmap needs at least one row of tokens")
    row_weights = [np.clip(np.asarray(weights[i], np.float64)[:len(r)], 0.0, 1.0)
                   for i, r in enumerate(rows)]
    for i, (r, w) in enumerate(zip(rows, row_weights)):
        if len(w) != len(r):
            raise ValueError(f"row {i} has {len(r)} tokens but only {len(w)} weights")

    line_height = 0.32  # inches per text line
    fig = Figure(figsize=(width_inches + 1.5, 4.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    ax = fig.add_axes((0.01, 0.02, width_inches / (width_inches + 1.5), 0.9))
    ax.axis("off")
    # Lay out in inches: x grows with each token's measured width; wrap at width_inches.
    placed, y = [], 0.0
    for r, w in zip(rows, row_weights):
        x = 0.0
        for token, weight in zip(r, w):
            text = ax.text(0, 0, _display(token), fontsize=font_size, family="monospace")
            width = text.get_window_extent(renderer=renderer).width / fig.dpi + 0.04
            text.remove()
            if x > 0 and x + width > width_inches:
                x, y = 0.0, y + line_height
            placed.append((x, y, _display(token), weight))
            x += width
        y += 1.6 * line_height  # a gap between rows
    # One data unit = one inch on both axes, so measured widths stay true after resizing.
    content_height = y + line_height
    fig_width, fig_height = width_inches + 1.5, content_height + 0.6
    fig.set_size_inches(fig_width, fig_height)
    ax.set_position((0.1 / fig_width, 0.1 / fig_height, width_inches / fig_width,
                     content_height / fig_height))
    ax.set_xlim(0, width_inches)
    ax.set_ylim(y, -line_height)
    for x, y_pos, token, weight in placed:
        ax.text(x, y_pos, token, fontsize=font_size, family="monospace", ha="left", va="center",
                bbox=dict(facecolor=WEIGHT_COLORMAP(weight), edgecolor="none", pad=0.2))
    colorbar_ax = fig.add_axes((1 - 1.1 / fig_width, 0.1, 0.15 / fig_width, 0.8))
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=WEIGHT_COLORMAP)
    fig.colorbar(mappable, cax=colorbar_ax).set_label("Weight")
    if title:
        fig.suptitle(title, fontsize=font_size + 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
