"""Drawing for the gym_cards games: fonts, playing-card faces, card backs, text strips.

Everything here is drawn by us with PIL (no image assets). Fonts are matplotlib's bundled DejaVu
TrueType files. Rendering must not slow training down, so every card image and text strip is
drawn once and cached; an env step only copies cached numpy arrays into a canvas.

Card faces are drawn at 4x their size and downsampled (LANCZOS) so that small cards stay crisp.
A card shows its rank and suit in the top-left corner (and rotated in the bottom-right corner),
and a large suit sign (number cards, aces) or a framed letter (J, Q, K) in the middle.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "TABLE_GREEN",
    "SUITS",
    "RANKS",
    "SUIT_SYMBOLS",
    "font",
    "card_face",
    "card_back",
    "text_strip",
    "paste",
]

CANVAS = 300
TABLE_GREEN = (0x35, 0x65, 0x4D)  # the card table colour of the reference games
SUITS: tuple[str, ...] = ("C", "D", "H", "S")
SUIT_SYMBOLS: dict[str, str] = {"C": "\u2663", "D": "\u2666", "H": "\u2665", "S": "\u2660"}
SUIT_NAMES: dict[str, str] = {"C": "clubs", "D": "diamonds", "H": "hearts", "S": "spades"}
RANKS: tuple[str, ...] = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
_RED = (200, 30, 40)
_BLACK = (20, 20, 20)
_SUPERSAMPLE = 4


def _font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@functools.lru_cache(maxsize=64)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (bold or regular) at ``size`` pixels, from matplotlib's bundled fonts."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = os.path.join(_font_dir(), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"font {name} not found in matplotlib's data dir ({_font_dir()})")
    return ImageFont.truetype(path, size)


def rank_name(value: int) -> str:
    """Rank string for 1..13 (1 -> 'A', 10 -> '10', 11..13 -> J, Q, K)."""
    if not 1 <= value <= 13:
        raise ValueError(f"card rank must be in 1..13, got {value}")
    return RANKS[value - 1]


def _check_card(rank: str, suit: str) -> None:
    if rank not in RANKS:
        raise ValueError(f"unknown card rank {rank!r}; expected one of {RANKS}")
    if suit not in SUITS:
        raise ValueError(f"unknown suit {suit!r}; expected one of {SUITS}")


def _centered_text(draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str,
                   fnt: ImageFont.FreeTypeFont, fill) -> None:
    draw.text(center, text, font=fnt, fill=fill, anchor="mm")


def _fit_font(text: str, max_w: float, max_h: float, bold: bool = True) -> ImageFont.FreeTypeFont:
    """The largest DejaVu font (by pixel size) whose rendering of ``text`` fits in max_w x max_h."""
    size = max(int(max_h), 4)
    while size > 4:
        f = font(size, bold)
        left, top, right, bottom = f.getbbox(text)
        if right - left <= max_w and bottom - top <= max_h:
            return f
        size -= 1
    return font(4, bold)


def _rounded_card(w: int, h: int, background: tuple[int, int, int], fill, outline) -> Image.Image:
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    radius = max(2, int(0.08 * w))
    draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=radius, fill=fill, outline=outline,
                           width=max(1, w // 60))
    return img


@functools.lru_cache(maxsize=512)
def card_face(rank: str, suit: str, width: int, height: int,
              background: tuple[int, int, int] = TABLE_GREEN) -> np.ndarray:
    """uint8 [height, width, 3] image of one card face (read-only; copy before editing).

    Args:
      rank: one of ``RANKS`` ('A', '2'..'10', 'J', 'Q', 'K').
      suit: one of ``SUITS`` ('C', 'D', 'H', 'S').
      width, height: pixel size (the games use 5:7 cards).
      background: colour of the pixels outside the rounded corners (the table).
    """
    _check_card(rank, suit)
    if width < 8 or height < 8:
        raise ValueError(f"card size must be at least 8x8 pixels, got {width}x{height}")
    s = _SUPERSAMPLE
    w, h = width * s, height * s
    img = _rounded_card(w, h, background, fill=(252, 252, 248), outline=(90, 90, 90))
    draw = ImageDraw.Draw(img)
    colour = _RED if suit in ("D", "H") else _BLACK
    symbol = SUIT_SYMBOLS[suit]

    # Corner index: rank above a small suit sign, top-left; the same rotated in the bottom-right.
    corner_w = 0.34 * w
    rank_font = _fit_font(rank, corner_w, 0.2 * h)
    suit_font = font(max(int(0.13 * h), 4), False)
    corner = Image.new("RGBA", (int(corner_w) + 2, int(0.36 * h)), (0, 0, 0, 0))
    cdraw = ImageDraw.Draw(corner)
    cx = corner.width / 2
    cdraw.text((cx, 0.11 * h), rank, font=rank_font, fill=colour, anchor="mm")
    cdraw.text((cx, 0.27 * h), symbol, font=suit_font, fill=colour, anchor="mm")
    pad = int(0.03 * w)
    img.paste(corner, (pad, pad), corner)
    flipped = corner.rotate(180)
    img.paste(flipped, (w - corner.width - pad, h - corner.height - pad), flipped)

    # Centre: a large suit sign, or a framed letter for the court cards.
    cx, cy = w / 2, h / 2
    if rank in ("J", "Q", "K"):
        box = (0.3 * w, 0.24 * h, 0.7 * w, 0.76 * h)
        draw.rectangle(box, outline=colour, width=max(2, w // 40), fill=(245, 236, 200))
        _centered_text(draw, (cx, cy - 0.07 * h), rank, _fit_font(rank, 0.3 * w, 0.22 * h), colour)
        _centered_text(draw, (cx, cy + 0.13 * h), symbol, font(max(int(0.14 * h), 4)), colour)
    else:
        size = 0.36 * h if rank == "A" else 0.28 * h
        _centered_text(draw, (cx + 0.04 * w, cy + 0.03 * h), symbol, font(max(int(size), 4)), colour)
    small = img.resize((width, height), Image.LANCZOS)
    arr = np.asarray(small, dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=16)
def card_back(width: int, height: int, background: tuple[int, int, int] = TABLE_GREEN) -> np.ndarray:
    """uint8 [height, width, 3] image of a face-down card: a blue lattice inside a white border."""
    s = _SUPERSAMPLE
    w, h = width * s, height * s
    img = _rounded_card(w, h, background, fill=(250, 250, 250), outline=(90, 90, 90))
    draw = ImageDraw.Draw(img)
    m = int(0.08 * w)
    draw.rectangle((m, m, w - m, h - m), fill=(40, 70, 160))
    step = max(w // 8, 4)
    line = (150, 175, 235)
    for off in range(-h, w + h, step):
        draw.line((m + off, m, m + off + (h - 2 * m), h - m), fill=line, width=max(1, s))
        draw.line((m + off, h - m, m + off + (h - 2 * m), m), fill=line, width=max(1, s))
    draw.rectangle((0, 0, w - 1, m), fill=(250, 250, 250))
    draw.rectangle((0, h - m, w - 1, h - 1), fill=(250, 250, 250))
    draw.rectangle((0, 0, m, h - 1), fill=(250, 250, 250))
    draw.rectangle((w - m, 0, w - 1, h - 1), fill=(250, 250, 250))
    draw.rounded_rectangle((0, 0, w - 1, h - 1), radius=max(2, int(0.08 * w)), outline=(90, 90, 90),
                           width=max(1, w // 60))
    # restore the table colour outside the rounded corners
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, w - 1, h - 1), radius=max(2, int(0.08 * w)), fill=255)
    img = Image.composite(img, Image.new("RGB", (w, h), background), mask)
    arr = np.asarray(img.resize((width, height), Image.LANCZOS), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


class _LRU:
    """A small least-recently-used cache (text strips are keyed by their string)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        if len(self.data) > self.maxsize:
            self.data.popitem(last=False)


_STRIPS = _LRU(8192)


def text_strip(lines: tuple[tuple[int, str], ...], width: int, height: int, *, size: int,
               bold: bool = False, fill=(255, 255, 255),
               background: tuple[int, int, int] = TABLE_GREEN, x: int = 10) -> np.ndarray:
    """uint8 [height, width, 3] band with text lines drawn at (x, y) for each ``(y, text)``.

    Cached by its arguments: a game redraws only the band that holds its changing text.
    """
    key = (lines, width, height, size, bold, fill, background, x)
    arr = _STRIPS.get(key)
    if arr is None:
        img = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(img)
        fnt = font(size, bold)
        for y, text in lines:
            draw.text((x, y), text, font=fnt, fill=fill)
        arr = np.asarray(img, dtype=np.uint8).copy()
        arr.setflags(write=False)
        _STRIPS.put(key, arr)
    return arr


def paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    """Copies ``image`` into ``canvas`` with its top-left corner at (x, y), clipped to the canvas."""
    h, w = image.shape[:2]
    H, W = canvas.shape[:2]
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return
    canvas[y0:y1, x0:x1] = image[y0 - y:y1 - y, x0 - x:x1 - x]


def wrap_tokens(tokens: list[str], fnt: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Joins tokens with single spaces, breaking into several lines where a line would be too wide."""
    lines: list[str] = []
    current = ""
    for tok in tokens:
        candidate = tok if not current else current + " " + tok
        if current and fnt.getlength(candidate) > max_width:
            lines.append(current)
            current = tok
        else:
            current = candidate
    lines.append(current)
    return lines
