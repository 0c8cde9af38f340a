"""render_token_heatmap writes a valid PNG whose pixels show the weights."""
import numpy as np
import pytest
from PIL import Image

from coso_jax.causal.render import render_token_heatmap


def test_writes_a_valid_png(tmp_path):
    tokens = [['{"', "thoughts", '":', " go", " right", '",', ' "action":', ' "+"', "}"],
              ["a", "$x$", "\n", "b"] * 20]  # long row wraps; '$' and newlines are escaped
    weights = np.zeros((2, 80))
    weights[0, :9] = np.linspace(0, 1, 9)
    weights[1, :80] = 0.3
    path = render_token_heatmap(tokens, weights, tmp_path / "sub" / "heatmap.png", title="demo")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[0] > 50 and image.shape[1] > 500
    # The weight-1 token's background (#cd5c5c, indian red) appears in the image.
    red = (np.abs(image - np.array([0xCD, 0x5C, 0x5C])).sum(-1) < 12).sum()
    assert red > 50


def test_rejects_mismatched_rows(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        render_token_heatmap([["a", "b", "c"]], [[0.1, 0.2]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one row"):
        render_token_heatmap([], [], tmp_path / "x.png")


def test_control_characters_are_drawn_escaped_without_font_warnings(tmp_path):
    import warnings

    from coso_jax.causal.render import _display

    assert _display("a\x01b") == "a\\x01b" and _display("x\n") == "x\\n" and _display("$5") == r"\$5"
    assert _display("") == " " and _display("é ok") == "é ok" and _display("\u2028") == "\\u2028"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph 1 missing from font(s)" would fail here
        render_token_heatmap([["go", "\x01", "\x7f", "\t"]], [[0.1, 0.5, 0.9, 0.2]], tmp_path / "h.png")
