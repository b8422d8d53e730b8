"""Every figure kiln writes (run pictures, TensorBoard figures, the LR plot, compare's report) is made and written
through here, so that its titles, labels, tick labels and legends lie inside the image at the size it is written.

`subplots` lays figures out with matplotlib's constrained layout, which makes room for titles, labels, ticks,
colorbars and legends. What a layout cannot fix, `fit` does before anything is written: a title or axis label longer
than what it describes is wrapped onto more lines (font sizes are never shrunk), and a figure whose texts still
reach past its edges grows until they fit. `save` (PNG files) and `add_figure` (TensorBoard) both fit first.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

ROUNDS = 4  # wrap and regrow until nothing moves; two rounds settle every figure kiln draws
MIN_CHARS = 8  # lines are wrapped no shorter than this; a figure grows for what still does not fit


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """`plt.subplots` on the Agg backend (no display needed) with constrained layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, layout="constrained", **kwargs)


def save(fig: Any, path: str | Path, dpi: int) -> Path:
    """Fit the figure at `dpi`, write it as a PNG (the whole canvas: nothing is cropped) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fit(fig, dpi)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def add_figure(writer: Any, tag: str, fig: Any, step: int) -> None:
    """Fit the figure at its own dpi (what TensorBoard renders it at) and log it; the writer closes it."""
    fit(fig, fig.dpi)
    writer.add_figure(tag, fig, step)


def fit(fig: Any, dpi: float) -> Any:
    """Wrap titles and axis labels longer than their axes, then grow the figure until every text is inside it."""
    fig.set_dpi(dpi)
    if fig.get_layout_engine() is None:  # a figure made elsewhere: growing it only helps with a layout
        fig.set_layout_engine("constrained")
    texts = _wrappable(fig)
    with warnings.catch_warnings():  # a layout that does not fit yet is what the rounds below fix
        warnings.filterwarnings("ignore", "constrained_layout not applied", UserWarning)
        fig.draw_without_rendering()  # runs the layout and places every text; no pixels drawn
        renderer = fig.canvas.get_renderer()
        for _ in range(ROUNDS):
            wrapped = any([_wrap(text, label, room(), along, renderer) for text, label, room, along in texts])
            if wrapped:
                fig.draw_without_rendering()
            grown = _grow_to_content(fig, renderer)
            if grown:
                fig.draw_without_rendering()
                renderer = fig.canvas.get_renderer()  # a new size: a new renderer
            if not (wrapped or grown):
                break
    return fig


def _wrappable(fig: Any) -> list[tuple[Any, str, Any, str]]:
    """(text, its label as written, its room in pixels as laid out now, the extent that must fit the room):
    titles and x labels are as wide as their axes' place in the layout at most, y labels as tall, the suptitle
    as wide as the figure. The place, not the axes' box: an image's axes shrink to its aspect, and more title
    lines would shrink it further."""
    def place(ax: Any, along: str) -> Any:
        return lambda: getattr(ax.get_position(original=True), along) * getattr(fig.bbox, along)

    texts = [(t, t.get_text(), place(ax, along), along) for ax in fig.axes
             for t, along in ((ax.title, "width"), (ax.xaxis.label, "width"), (ax.yaxis.label, "height"))]
    if fig._suptitle is not None:
        texts.append((fig._suptitle, fig._suptitle.get_text(), lambda: fig.bbox.width, "width"))
    return [t for t in texts if t[0].get_visible() and t[1].strip()]


def _wrap(text: Any, label: str, room: float, along: str, renderer: Any) -> bool:
    """Wrap `label` (its own line breaks kept) onto lines as long as fit `room` pixels; whether `text` changed."""
    before = text.get_text()
    text.set_text(label)
    length = getattr(text.get_window_extent(renderer), along)
    lines = label.split("\n")
    chars = max(len(line) for line in lines)
    while length > room and chars > MIN_CHARS:
        chars = max(MIN_CHARS, min(chars - 1, math.floor(chars * room / length)))
        text.set_text("\n".join(part for line in lines for part in textwrap.wrap(line, chars) or [""]))
        length = getattr(text.get_window_extent(renderer), along)
    return text.get_text() != before


def _grow_to_content(fig: Any, renderer: Any) -> bool:
    """Enlarge the figure by however far its contents reach past each edge (the layout then spreads into it)."""
    inside = fig.get_tightbbox(renderer)  # inches
    w, h = fig.get_size_inches()
    left, bottom = max(0.0, -inside.x0), max(0.0, -inside.y0)
    right, top = max(0.0, inside.x1 - w), max(0.0, inside.y1 - h)
    if max(left, bottom, right, top) * fig.dpi < 0.5:
        return False
    fig.set_size_inches(w + left + right, h + bottom + top)
    return True
