"""Figures for the reports, drawn without pyplot, and the one figure → PNG → HTML path.

`new_figure` builds a `matplotlib.figure.Figure` on the Agg canvas directly: no pyplot, no figure
manager, no GUI, and nothing global is changed — the user's matplotlib backend, open pyplot figures and
rcParams are what they were. `figure_png` / `figure_data_uri` turn a figure into PNG bytes / a
``data:image/png;base64,...`` URI that an HTML page embeds (so a report has no outside references).

matplotlib is imported only here, inside the functions: ``pip install stabwatch[plot]``.
"""

from __future__ import annotations

import base64
import io
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stabwatch.errors import MissingExtraError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["figure_data_uri", "figure_png", "new_figure", "require_matplotlib"]


def require_matplotlib(what: str = "plotting") -> ModuleType:
    """Import matplotlib, or raise a `MissingExtraError` (a `StabwatchError` and an `ImportError`) that
    says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs matplotlib, which is not installed ({exc}): pip install stabwatch[plot]"
        ) from exc
    return matplotlib


def new_figure(figsize: tuple[float, float], what: str = "plotting") -> tuple[Figure, Axes]:
    """A figure with one axes on the Agg canvas (no pyplot; nothing global touched).

    Example:
        >>> fig, ax = new_figure((3, 2))
        >>> _ = ax.plot([0, 1], [1, 0]); figure_png(fig)[:4]
        b'\\x89PNG'
    """
    require_matplotlib(what)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def figure_png(fig: Any, dpi: float = 96, tight: bool = True) -> bytes:
    """The figure as PNG bytes (``tight``: cropped to what is drawn, as ``bbox_inches="tight"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def figure_data_uri(fig: Any, dpi: float = 96, tight: bool = True) -> str:
    """The figure as a ``data:image/png;base64,...`` URI, for an ``<img src=...>`` in a self-contained page."""
    return "data:image/png;base64," + base64.b64encode(figure_png(fig, dpi, tight)).decode("ascii")
