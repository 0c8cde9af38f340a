"""A schematic picture of the room state, drawn by us with PIL (the paper's agent sees a rendered
3D frame from AI2-THOR; we have no 3D renderer, so the image is a top-down diagram instead).

300x300 RGB: a title line with the task; a grid of receptacle boxes placed like the scene's
floor plan (ALFRED's receptacle x/z positions snapped to the nearest free cell; appliances
without a layout position fill the remaining cells; 3 x 8 cells, more columns and rows for rooms
with more than 24 receptacles, as official ALFWorld kitchens have); each box names its receptacle and shows its
state by colour (white: not openable, grey: closed, green: open) and the agent's box has a thick
red frame and a red dot (no box framed: the agent stands in the middle of the room); a bottom
panel says what the agent holds and what it sees where it stands.
"""
from __future__ import annotations

import functools
import textwrap

import numpy as np
from PIL import Image, ImageDraw

from coso_jax.envs.alfworld.game import Game, display_name
from coso_jax.envs.gym_cards.render import font

__all__ = ["CANVAS", "grid_shape", "grid_cells", "draw_state"]

CANVAS = 300
_COLS, _ROWS = 3, 8
_TOP, _BOTTOM = 34, 244
_WHITE, _GREY, _GREEN = (250, 248, 240), (170, 170, 170), (170, 225, 170)
_RED = (210, 30, 30)


def grid_shape(num_receptacles: int) -> tuple[int, int]:
    """(columns, rows) of the schematic: 3 x 8, widened (up to 6 columns) and then lengthened so
    every receptacle gets its own cell."""
    cols = min(max(_COLS, -(-num_receptacles // _ROWS)), 6)
    return cols, max(_ROWS, -(-num_receptacles // cols))


@functools.lru_cache(maxsize=256)
def _cells_cached(key: str, items: tuple) -> dict[str, tuple[int, int]]:
    cols, rows = grid_shape(len(items))
    placed = [(r, p) for r, p in items if p is not None]
    free = [(c, rr) for rr in range(rows) for c in range(cols)]
    out: dict[str, tuple[int, int]] = {}
    if placed:
        xs = [p[0] for _, p in placed]
        zs = [p[1] for _, p in placed]
        x0, x1, z0, z1 = min(xs), max(xs), min(zs), max(zs)
        for r, (x, z) in sorted(placed, key=lambda it: (-it[1][1], it[1][0], it[0])):
            fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
            fz = (z1 - z) / (z1 - z0) if z1 > z0 else 0.5  # north (large z) at the top
            want = (fx * (cols - 1), fz * (rows - 1))
            cell = min(free, key=lambda c: ((c[0] - want[0]) ** 2 + (c[1] - want[1]) ** 2, c[1], c[0]))
            free.remove(cell)
            out[r] = cell
    for r, p in items:
        if p is None:
            out[r] = free.pop(0)
    return out


def grid_cells(game: Game) -> dict[str, tuple[int, int]]:
    """{receptacle id: (column, row)} of the schematic grid (deterministic per game)."""
    items = tuple(sorted(game.positions.items()))
    return _cells_cached(game.key, items)


def draw_state(game: Game, agent_at: str | None, holding: list[str], opened: set[str],
               contents: dict[str, list[str]], openable: set[str]) -> np.ndarray:
    """The schematic image (uint8 [300, 300, 3]) of one state."""
    img = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    d = ImageDraw.Draw(img)
    title = textwrap.shorten("Task: " + game.task, width=52, placeholder="...")
    d.text((6, 6), title, font=font(11, bold=True), fill=(0, 0, 0))
    d.line((0, 26, CANVAS, 26), fill=(0, 0, 0))
    cols, rows = grid_shape(len(game.positions))
    cw = (CANVAS - 8) / cols
    ch = (_BOTTOM - _TOP) / rows
    small = font(10 if rows <= _ROWS and cols <= _COLS else 8)
    for r, (c, row) in grid_cells(game).items():
        x0, y0 = 4 + c * cw + 2, _TOP + row * ch + 2
        x1, y1 = x0 + cw - 4, y0 + ch - 4
        fill = (_GREEN if r in opened else _GREY) if r in openable else _WHITE
        here = r == agent_at
        d.rectangle((x0, y0, x1, y1), fill=fill, outline=_RED if here else (60, 60, 60), width=3 if here else 1)
        d.text((x0 + 4, y0 + 5), display_name(r), font=small, fill=(0, 0, 0))
        if here:
            d.ellipse((x1 - 12, y0 + 6, x1 - 4, y0 + 14), fill=_RED)
    d.line((0, _BOTTOM + 4, CANVAS, _BOTTOM + 4), fill=(0, 0, 0))
    held = ", ".join(display_name(o) for o in holding) or "nothing"
    d.text((6, _BOTTOM + 10), f"Holding: {held}", font=font(11), fill=(0, 0, 0))
    if agent_at is None:
        where = "Agent: middle of the room"
    elif agent_at in openable and agent_at not in opened:
        where = f"At {display_name(agent_at)}: closed"
    else:
        seen = ", ".join(display_name(o) for o in contents.get(agent_at, [])) or "nothing"
        where = f"At {display_name(agent_at)}: {seen}"
    for k, line in enumerate(textwrap.wrap(where, width=50)[:2]):
        d.text((6, _BOTTOM + 26 + 13 * k), line, font=font(10), fill=(0, 0, 0))
    return np.asarray(img, dtype=np.uint8)
