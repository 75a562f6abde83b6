"""Saving a benchmark's PNG: matplotlib is optional (the `bench` extra); without it the JSON still lands and
the tool says how to draw the plot later with `--plot JSON`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(draw: Callable[[Any], Any], png: Path, tool: str, json_path: Path | None = None) -> bool:
    """Call draw(plt) -> figure and save it to png; warn (and return False) when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        again = f"python tools/{tool} --plot {json_path}" if json_path else f"rerun tools/{tool}"
        print(f"warning: matplotlib is not installed, {png} not drawn: pip install -e '.[bench]', then {again}",
              file=sys.stderr)
        return False
    fig = draw(plt)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
