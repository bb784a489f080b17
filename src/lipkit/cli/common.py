"""What the command modules share: the error console and the results table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def print_results(results: dict) -> None:
    table = Table(title="evaluation")
    splits = list(results["splits"])
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    names = sorted({k for s in splits for k in results["splits"][s]["metrics"]})
    for name in names:
        cells = []
        for s in splits:
            r = results["splits"][s]
            v, c = r["metrics"].get(name), r["chance"].get(name)
            if v is None:
                cells.append("")
            elif c is None:  # a count, not a rate (e.g. the lexicon's non-zero terms)
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{100 * v:.1f}%  [dim](chance {100 * c:.1f}%)[/]")
        table.add_row(name, *cells)
    Console().print(table)
