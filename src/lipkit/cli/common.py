"""What the command modules share: the error console and the results table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def report_to_trackers(run_dir: Path, index: Path) -> None:
    """The report's images (beside `index`) to the experiment trackers the run reported to, if any; what
    goes wrong there is a printed note (the report is written): never a traceback or an exit status."""
    from rich.markup import escape

    from lipkit.train.tracking import log_report

    try:
        notes = log_report(run_dir, index.parent)
    except Exception as e:  # log_report makes a note of each tracker's errors: this is anything else
        notes = [f"The report's images were not sent to the experiment trackers ({type(e).__name__}: {e})."]
    for note in notes:
        console.print(f"[yellow]{escape(note)}[/]")


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
