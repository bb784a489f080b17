"""Every command line in a fenced block of README.md and docs/*.md either runs, as written, on the
fixture dataset, or sits in ALLOWED_NOT_RUN with the reason it cannot run here.

A document's commands depend on each other in order (train writes runs/x, eval reads it): they run
in order in one temporary working directory per document, holding a copy of configs/ and, for the
documents after README.md, the runs/demo its quick start (`make demo`) wrote. The only changes to a
line are the SUBSTITUTIONS below.

The default subset (DEFAULT_PREFIXES) is the path a new reader walks first: the quick start (`make
demo`), `--help`, the dataset, eval and report, shard conversion and inspection, and the embed → index
→ search walk-through of README.md and docs/serving.md; it took 85–130 s on 2 cores shared with other
jobs. Every other runnable line (each training recipe, torchrun, checkpoint conversion and export:
each a lipkit start-up plus a training budget and a final evaluation) runs with `-m slow` (5–8 min).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from emoji_fixture import make_fixture_packages
from lipkit.data.emoji import build_emoji

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("lipkit", "torchrun", "python", "python3", "pip", "make", "srun", "sbatch", "cat")

# What the test changes in a documented line, and nothing else — written out for readers: shell_line() and
# the `dataset`/HOME set-up below are what apply it.
SUBSTITUTIONS = {
    "~/.cache/lipkit/datasets/emoji": "the fixture dataset: HOME is a temporary folder in which this path "
    "is a link to the emoji dataset built offline from the suite's fake packages (tests/emoji_fixture.py; "
    "100 concepts, enough rows for the docs' batch size of 256), so the docs' paths and the configs' "
    "defaults resolve to it unchanged",
    "lipkit train|demo|refine|distill, torchrun … -m lipkit train": "BUDGET appended: a short time budget",
    "make demo": "`lipkit demo`, the Makefile's demo recipe (checked), with the time budget",
}
BUDGET = "--set train.max_minutes=0.02"  # 1.2 s of training: a step or two, then the final eval

# Lines that cannot run here (prefix match after whitespace normalisation) → why. A prefix that no
# longer appears in any document fails the test: delete it here when the docs change.
ALLOWED_NOT_RUN = {
    "make test": "runs the whole suite (this test included)",
    "python3 -m venv": "creates a virtual environment",
    "pip install": "installs packages (no network here)",
    "cat > pairs.csv": "a heredoc the extraction cannot carry; the pairs.csv example names images "
    "(img/0001.jpg) the docs do not ship",
    "lipkit train --config configs/pairs.yaml": "trains on the illustrative pairs.csv whose images do not exist",
    "lipkit data validate my_pairs.csv": "the reader's own table",
    "lipkit search runs/demo/checkpoint runs/index --image some.png": "the reader's own image",
    "lipkit serve": "a blocking server (tests/test_serve_http.py runs it)",
    "lipkit checkpoint convert --from open_clip": "needs OpenCLIP weights downloaded by the reader",
    "lipkit checkpoint convert --from hf": "needs a Hugging Face CLIP folder downloaded by the reader",
    "python bench/": "benchmarks: minutes to hours, measured on purpose (bench/)",
    "torchrun --nproc-per-node 4": "4 processes (nccl on GPUs)",
    "torchrun --nproc-per-node 8": "8 processes (nccl on GPUs)",
    "srun torchrun": "a SLURM allocation",
    "lipkit train --config configs/demo.yaml --set train.batch_size=2048": "a 2048 batch is larger than "
    "the fixture's training table",
    'lipkit train --config configs/demo.yaml --set "data.train=shards/{00000..00006}.tar"': "names the "
    "seven 1000-sample shards of the full dataset; the fixture's table fills one (the convert and "
    "inspect lines before it run)",
}

# The default subset: lines starting with these run in every suite (with what they need before them).
DEFAULT_PREFIXES = (
    "lipkit --help",
    "lipkit data build emoji",
    "lipkit data build composed",
    "make demo",
    "lipkit eval runs/demo/checkpoint",
    "lipkit report runs/demo",
    "lipkit data convert ~/.cache/lipkit/datasets/emoji/",  # (the motion clips' convert runs with -m slow)
    "lipkit data inspect",
    "lipkit data export-eval",
    "lipkit embed runs/demo/checkpoint",
    "lipkit index build runs/emb ",
    "lipkit search runs/demo/checkpoint runs/index ",
)


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int
    text: str  # continuation lines joined, whitespace normalised

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.text}"


def extract(doc: Path) -> list[Command]:
    """The command lines of the fenced blocks of `doc`, continuation lines (ending in `\\`) joined."""
    out: list[Command] = []
    fenced, pending, start = False, "", 0
    for n, raw in enumerate(doc.read_text().splitlines(), 1):
        if raw.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        line = raw.strip()
        if not pending and (not line or line.split()[0] not in COMMANDS):
            continue
        start = start if pending else n
        pending += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            out.append(Command(doc, start, " ".join(pending.split())))
            pending = ""
    return out


def allowed_reason(cmd: Command) -> str | None:
    return next((why for prefix, why in ALLOWED_NOT_RUN.items() if cmd.text.startswith(prefix)), None)


def shell_line(cmd: Command) -> str:
    """The line as run: the substitutions and nothing else."""
    text = cmd.text
    if text.startswith("make demo"):
        recipe = re.search(r"^demo:.*\n\t\$\(BIN\)/(.+)$", (ROOT / "Makefile").read_text(), re.M)
        assert recipe and recipe.group(1).strip() == "lipkit demo", "the Makefile's demo recipe changed"
        text = "lipkit demo"
    code, hash_, comment = text.partition(" #")
    trains = re.match(r"lipkit (train|demo|refine|distill)\b", code) or re.search(r"-m lipkit train\b", code)
    if trains:
        code = f"{code.rstrip()} {BUDGET}"
    return code + (hash_ + comment if hash_ else "")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The emoji dataset built offline from the fake packages, large enough for a batch of 256."""
    root = tmp_path_factory.mktemp("docs-emoji")
    make_fixture_packages(root / "packages", n_concepts=100)
    build_emoji(root / "emoji", cache_dir=root, progress=False)
    return root / "emoji"


def run_commands(commands: list[Command], dataset: Path, tmp: Path) -> list[str]:
    """Run each document's `commands` in order in its own working directory (a copy of configs/; the
    documents after README.md also start with the runs/demo its quick start wrote); the failures."""
    home, quickstart = tmp / "home", tmp / "quickstart-runs-demo"
    (home / ".cache" / "lipkit" / "datasets").mkdir(parents=True)
    (home / ".cache" / "lipkit" / "datasets" / "emoji").symlink_to(dataset)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    failures = []
    for doc in DOCS:
        work = tmp / doc.stem
        shutil.copytree(ROOT / "configs", work / "configs")
        if quickstart.exists():
            shutil.copytree(quickstart, work / "runs" / "demo")
        for cmd in (c for c in commands if c.doc == doc):
            line = shell_line(cmd)
            r = subprocess.run(
                ["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=900
            )
            if r.returncode != 0:
                failures.append(
                    f"{cmd}\n  ran: {line}\n  exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"
                )
            elif cmd.text.startswith("make demo"):
                shutil.copytree(work / "runs" / "demo", quickstart)
    return failures


def runnable(default_only: bool) -> list[Command]:
    """The lines to run, in document order."""
    cmds = [c for doc in DOCS for c in extract(doc) if allowed_reason(c) is None]
    return [c for c in cmds if c.text.startswith(DEFAULT_PREFIXES)] if default_only else cmds


def test_every_documented_command_runs_or_is_allowed_with_a_reason():
    every = [c for doc in DOCS for c in extract(doc)]
    assert any(c.text.startswith("lipkit train") for c in every)  # the extraction finds commands
    stale = [p for p in ALLOWED_NOT_RUN if not any(c.text.startswith(p) for c in every)]
    assert not stale, f"ALLOWED_NOT_RUN lists lines no document has any more: {stale}"
    unused = [p for p in DEFAULT_PREFIXES if not any(c.text.startswith(p) for c in every)]
    assert not unused, f"DEFAULT_PREFIXES lists lines no document has any more: {unused}"


def test_continuation_lines_are_joined(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\nlipkit eval a \\\n  --data b \\\n  --data c\nls\n```\nlipkit not-fenced\n")
    assert [c.text for c in extract(doc)] == ["lipkit eval a --data b --data c"]


def test_default_documented_commands_run(dataset, tmp_path):
    failures = run_commands(runnable(default_only=True), dataset, tmp_path)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_documented_command_runs(dataset, tmp_path):
    failures = run_commands(runnable(default_only=False), dataset, tmp_path)
    assert not failures, "\n".join(failures)
