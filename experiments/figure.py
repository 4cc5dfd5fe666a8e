"""
The figures of the experiment scripts (`compare_models.py`, `state_tracking.py`), drawn with matplotlib when it
is installed. matplotlib is not a dependency of the library: without it a script says so when it starts, writes
its table and JSON as usual and skips the PNG (`pip install matplotlib`, or the `test` extra, brings it).
"""

import importlib.util
import textwrap
from pathlib import Path
from typing import Any, Tuple

NO_MATPLOTLIB = 'matplotlib is not installed: the results are written without the plot (pip install matplotlib)'


def can_plot() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec('matplotlib') is not None


def new_figure() -> Tuple[Any, Any]:
    """A figure and its axes, drawn off-screen (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(8, 5))


def save_figure(fig: Any, ax: Any, path: Path, title: str, width: int = 100, fontsize: int = 8) -> None:
    """Give `ax` the wrapped `title` and a legend, and write `fig` to `path` as a PNG."""
    ax.set_title('\n'.join(textwrap.wrap(title, width)), fontsize=fontsize)
    ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
