"""`lipkit embed | index build/add/info | search | serve`: registered on the main app by `register(app)`.
Each command parses its options, calls the library (`lipkit.search`) and prints."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lipkit.data.image_policy import MAX_PIXELS
from lipkit.errors import UserError

console = Console(stderr=True)
RERANK_HELP = (
    "Text queries: re-order the first N hits with the checkpoint's image–text matching head (train.objective=itm); "
    "default 20 when it has one, 0: off."
)
index_app = typer.Typer(help="Build, extend and inspect search indexes.", no_args_is_help=True)


def embed(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    source: Path = typer.Argument(
        ..., help="A CSV/TSV/JSONL captions table, or a folder of images (recursive)."
    ),
    out: Path = typer.Argument(
        ..., help="Output folder: image_emb.npy, text_emb.npy, ids.json, manifest.json."
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Images per saved chunk (the unit of resume)."),
    workers: int = typer.Option(0, "--workers", "-w", help="Image-decoding worker processes."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    image_column: str = typer.Option("image", help="Table column holding image paths."),
    caption_column: str = typer.Option("captions", help="Table column holding captions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace embeddings already in OUT."),
    int8: Path = typer.Option(
        None,
        "--int8",
        help="Embed with the ONNX towers `lipkit quantize CHECKPOINT DIR` wrote (onnxruntime on the CPU, "
        "int8 where its quality check kept int8) instead of PyTorch.",
    ),
) -> None:
    """Embed a collection's images (and first captions) into OUT; rerun the same command to resume."""
    from lipkit.search.embed import run_embed

    r = run_embed(
        checkpoint,
        source,
        out,
        image_column=image_column,
        caption_column=caption_column,
        device=device,
        int8=int8,
        batch_size=batch_size,
        chunk_size=chunk_size,
        workers=workers,
        overwrite=overwrite,
    )
    if r.n_embedded == 0 and r.n_skipped:
        raise UserError(
            f"None of the {r.n_skipped} images of '{source}' could be decoded (see {r.out / 'skipped.json'}); "
            "fix their paths or files and run the command again."
        )
    if r.chunks_computed == 0 and r.chunks_done_before:
        console.print(f"'{r.out}' is already complete ({r.n_embedded} items); nothing to do.")
    elif r.chunks_done_before:
        console.print(f"resumed: {r.chunks_done_before} chunk(s) were already done")
    if r.n_skipped:
        console.print(
            f"[yellow]skipped {r.n_skipped} image(s) that could not be decoded; see {r.out / 'skipped.json'}[/]"
        )
    console.print(
        f"[bold green]embedded[/] {r.n_embedded} items ({r.dim}-d"
        f"{', images + captions' if r.has_text else ', images'}) → {r.out}"
    )


def index_build(
    emb_dir: Path = typer.Argument(
        ...,
        help="Embeddings folder written by `lipkit embed` (lex.npy/npz for sparse, image_tokens.npy for tokens).",
    ),
    out: Path = typer.Argument(..., help="Index folder to write."),
    kind: str = typer.Option(
        "flat",
        "--kind",
        "-k",
        help="flat (exact), hnsw, ivfpq, sparse (lexical), or tokens (FILIP's late interaction, exact: how a "
        "checkpoint trained with filip or wukong ranks in `lipkit eval`).",
    ),
    nlist: int = typer.Option(None, min=1, help="IVF-PQ: inverted lists (default ≈ √N)."),
    m: int = typer.Option(
        None,
        "--m",
        min=1,
        max=1024,
        help="HNSW: links per node (default 32). IVF-PQ: sub-quantizers, dividing the dim (default dim/4).",
    ),
    nbits: int = typer.Option(None, min=1, max=16, help="IVF-PQ: bits per sub-quantizer code (default 8)."),
    ef: int = typer.Option(None, min=1, help="HNSW: search breadth efSearch (default 128)."),
    ef_construction: int = typer.Option(None, min=1, help="HNSW: build breadth (default 200)."),
    nprobe: int = typer.Option(
        None, min=1, help="IVF-PQ: lists visited per query (default max(8, nlist/8))."
    ),
) -> None:
    """Build a FAISS inner-product index (flat, hnsw, ivfpq), a sparse inverted index (sparse) or a token-wise
    index (tokens)."""
    from lipkit.search.index_build import build_from_embeddings, check_build_params, index_input

    given = dict(nlist=nlist, m=m, nbits=nbits, ef=ef, ef_construction=ef_construction, nprobe=nprobe)
    params = check_build_params(kind, given)
    x, items = index_input(emb_dir, kind)
    with console.status(f"building {kind} index over {x.shape[0]:,} vectors…"):
        ix = build_from_embeddings(emb_dir, out, kind, x, items, params)
    console.print(f"[bold green]index[/] {kind}: {ix.ntotal:,} items → {out}")
    if kind not in ("tokens", "sparse") and (emb_dir / "image_tokens.npy").is_file():
        console.print(
            "[yellow]these embeddings come from a checkpoint scored token-wise (filip, wukong), whose pooled "
            "vectors its loss did not train; `--kind tokens` ranks text queries as `lipkit eval` does[/]"
        )


def index_add(
    index: Path = typer.Argument(..., help="Index folder to extend."),
    emb_dir: Path = typer.Argument(..., help="Embeddings folder with the new items."),
    allow_duplicates: bool = typer.Option(False, help="Add even if this embeddings folder was added before."),
) -> None:
    """Append the vectors of another embeddings folder (new ids continue after the last)."""
    from lipkit.search.index import load_index
    from lipkit.search.index_build import add_to_index, index_input, new_source

    ix = load_index(index)
    entry = new_source(ix, emb_dir, allow_duplicates)
    x, items = index_input(emb_dir, ix.kind)
    if x.shape[0] == 0:
        raise UserError(f"'{emb_dir}' holds no vectors; embed some images into it with `lipkit embed` first.")
    before = ix.ntotal
    with console.status(f"adding {x.shape[0]:,} vectors…"):
        add_to_index(ix, index, x, items, entry)
    console.print(
        f"[bold green]added[/] {ix.ntotal - before:,} items (ids {before}..{ix.ntotal - 1}) → {index}"
    )


def index_info(index: Path = typer.Argument(..., help="Index folder.")) -> None:
    """Kind, size, parameters, memory and sources of an index."""
    from lipkit.search.index import load_index

    ix = load_index(index)
    size = sum(f.stat().st_size for f in Path(index).expanduser().iterdir() if f.is_file())
    t = Table(title=f"index {index}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    t.add_row("kind", ix.kind)
    t.add_row("items", f"{ix.ntotal:,}")
    t.add_row("dim" if ix.kind != "sparse" else "vocabulary", str(ix.dim))
    for k, v in ix.info.get("params", {}).items():
        t.add_row(k, str(v))
    if ix.kind == "sparse":
        t.add_row("non-zeros", f"{ix.nnz:,} ({ix.nnz / max(1, ix.ntotal):.1f} per item)")
    t.add_row("memory", f"{ix.memory_bytes() / 2**20:.1f} MiB")
    t.add_row("on disk", f"{size / 2**20:.1f} MiB")
    for s in ix.info.get("sources", []):
        t.add_row("source", str(s.get("path")))
    Console().print(t)


def _print_hits(title: str, hits: list[dict]) -> None:
    """The hits as a table; re-ranked hits (`--rerank`) also show the matching head's logit."""
    t = Table(title=title)
    matched = any("match" in h for h in hits)
    columns = [("#", "right"), ("id", "right"), ("score", "right")] + (
        [("match", "right")] if matched else []
    )
    for col, just in columns + [("caption", "left"), ("path", "left")]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r, h in enumerate(hits, 1):
        match = [f"{h['match']:.3f}" if "match" in h else ""] if matched else []
        t.add_row(
            str(r), str(h["id"]), f"{h['score']:.4f}", *match, h.get("caption") or "", h.get("path") or ""
        )
    Console().print(t)


def search(
    checkpoint: Path = typer.Argument(..., help="Checkpoint that embedded the collection."),
    index: Path = typer.Argument(..., help="Index folder written by `lipkit index build`."),
    query: str = typer.Argument(None, help='Text query, e.g. "a red heart".'),
    image: Path = typer.Option(
        None,
        "--image",
        "-i",
        help="Search with this image; with a QUERY too, for images like it changed by the words (a composed "
        "query: the checkpoint's pic2word/rtd mapping, else the sum of the two embeddings).",
    ),
    k: int = typer.Option(10, "-k", "--k", help="Number of results (1..1000)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ef: int = typer.Option(None, min=1, help="HNSW: override efSearch for this query."),
    nprobe: int = typer.Option(None, min=1, help="IVF-PQ: override nprobe for this query."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 (autocast)."),
    int8: Path = typer.Option(
        None, "--int8", help="Folder from `lipkit quantize`: query with its ONNX towers."
    ),
    rerank: int = typer.Option(None, "--rerank", help=RERANK_HELP),
) -> None:
    """Top-k items for a text query, an image (--image), or an image changed by words (both)."""
    from lipkit.search.query import Searcher, check_query_args

    check_query_args(query, image, k)
    if image is not None and rerank:
        raise UserError("--rerank re-orders the hits of a text query; drop it when searching by --image.")
    s = Searcher(checkpoint, index, device=device, precision=precision, onnx=int8, rerank=rerank)
    params = {k_: v for k_, v in {"ef": ef, "nprobe": nprobe}.items() if v is not None}
    text = query.strip() if query is not None else None
    if image is not None and text is not None:
        hits = s.search(s.composed_query(s.image_file(image), text), k, **params)
        what, title = {"image": str(image), "text": text, "composed": s.composed_way}, f'{image} + "{text}"'
    elif image is not None:
        hits = s.search(s.image_query(s.image_file(image)), k, **params)
        what, title = str(image), str(image)
    else:  # the matching head (when the checkpoint has one) re-orders the first --rerank hits
        hits = s.rerank(text, s.search(s.text_query(text), max(k, s.rerank_top), **params))[:k]
        what, title = query, f'"{text}"'
    if as_json:
        print(json.dumps({"query": what, "results": hits}, ensure_ascii=False))
        return
    _print_hits(f"top {k} for {title}", hits)


def serve(
    checkpoint: Path = typer.Argument(..., help="Checkpoint that embedded the collection."),
    index: Path = typer.Argument(..., help="Index folder written by `lipkit index build`."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all: add --api-keys)."),
    port: int = typer.Option(8000, help="TCP port."),
    max_upload_mb: float = typer.Option(5.0, help="Largest accepted upload, in MB."),
    max_pixels: int = typer.Option(
        MAX_PIXELS, help="Largest accepted image, in pixels (decompression-bomb guard)."
    ),
    max_query_chars: int = typer.Option(1000, help="Longest accepted text query."),
    max_video_frames: int = typer.Option(
        1800,
        min=1,
        help="Most frames decoded from an uploaded video query (the model's clip frames are sampled from them).",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    log_level: str = typer.Option("info", help="uvicorn log level: debug, info, warning, error."),
    threads: int = typer.Option(
        1, help="CPU threads per model call (torch, FAISS); 1 is the best throughput on a CPU under load."
    ),
    batching: bool = typer.Option(
        True, "--batching/--no-batching", help="Encode concurrent queries of one kind together."
    ),
    max_batch: int = typer.Option(32, min=1, help="Most queries encoded in one model call."),
    max_wait_ms: float = typer.Option(2.0, min=0, help="Longest a query waits for others to join its batch."),
    max_queue: int = typer.Option(
        128, min=1, help="Queries waiting or being encoded; beyond it requests get 503 with Retry-After."
    ),
    cache_size: int = typer.Option(10_000, min=0, help="Text embeddings kept in the LRU cache (0: none)."),
    api_keys: Path = typer.Option(
        None, "--api-keys", help="File of API keys, one per line: requests without one get 401."
    ),
    rate_limit: float = typer.Option(0.0, min=0, help="Requests per second per client (key or IP); 0: none."),
    burst: int = typer.Option(0, min=0, help="Requests a client may send at once; 0: 2 × --rate-limit."),
    precision: str = typer.Option(
        "fp32", help="fp32, or bf16 (autocast: ~2× faster on CPUs with AVX-512 BF16 or AMX, and on GPUs)."
    ),
    int8: Path = typer.Option(
        None, "--int8", help="Folder from `lipkit quantize`: its (int8) ONNX towers answer the queries."
    ),
    rerank: int = typer.Option(None, "--rerank", help=RERANK_HELP),
) -> None:
    """Serve search over HTTP: the page at /, the API at /search, /embed, /health, /metrics, docs at /docs."""
    from lipkit.search.access import AccessSettings, read_api_keys
    from lipkit.search.batcher import BatchSettings
    from lipkit.search.request_guards import Limits
    from lipkit.search.server import serve as run_server

    limits = Limits(
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        max_query_chars=max_query_chars,
        max_video_frames=max_video_frames,
    )
    keys = read_api_keys(api_keys) if api_keys is not None else ()
    if host not in ("127.0.0.1", "localhost", "::1") and not keys:
        console.print(
            f"[yellow]warning: listening on {host} without --api-keys: anyone who reaches this port can "
            "use the model.[/]"
        )
    settings = BatchSettings(max_batch, max_wait_ms, max_queue, cache_size) if batching else None
    run_server(
        checkpoint,
        index,
        host=host,
        port=port,
        limits=limits,
        device=device,
        log_level=log_level,
        threads=threads,
        batching=settings,
        access=AccessSettings(keys, rate_limit, burst),
        precision=precision,
        onnx=int8,
        rerank=rerank,
    )


index_app.command("build")(index_build)
index_app.command("add")(index_add)
index_app.command("info")(index_info)


def register(app: typer.Typer) -> None:
    """Add the search commands to the `lipkit` app."""
    app.add_typer(index_app, name="index")
    app.command()(embed)
    app.command()(search)
    app.command()(serve)
