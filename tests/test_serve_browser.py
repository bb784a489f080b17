"""The search page in a real browser (Debian's chromium driven by Playwright): type a query, results
appear as images with scores; click one and an image search runs with it, the clicked image first."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lipkit[search]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'lipkit[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
)

from lipkit.search.embed import run_embed  # noqa: E402
from lipkit.search.index import build_index  # noqa: E402
from test_search_index import image_collection, tiny_checkpoint  # noqa: E402
from test_serve_http import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium); Playwright drives it"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    ckpt = tiny_checkpoint(root / "ckpt")
    run_embed(ckpt, image_collection(root, n=30), root / "emb", batch_size=16, progress=False)
    items = json.loads((root / "emb" / "ids.json").read_text())
    build_index(np.load(root / "emb" / "image_emb.npy"), "hnsw", items).save(root / "index")
    with running_server(ckpt, root / "index") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.goto(server + "/")
            pg.errors = errors  # type: ignore[attr-defined]
            yield pg
        finally:
            browser.close()


def test_type_query_then_click_result_runs_image_search(page, tmp_path):
    page.wait_for_function("document.getElementById('info').textContent.includes('30 items')")
    page.fill("#q", "a red star")
    page.select_option("#k", "10")
    page.press("#q", "Enter")
    cards = page.locator("#results .card")
    cards.first.wait_for()
    assert cards.count() == 10
    page.wait_for_function(
        "[...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert "a red star" in page.inner_text("#status") and "10 results" in page.inner_text("#status")
    page.screenshot(path=str(tmp_path / "text-search.png"), full_page=True)

    target = cards.nth(4)
    clicked = int(target.get_attribute("data-id"))
    target.click()
    page.wait_for_function(
        f"document.getElementById('status').textContent.includes('Images like #{clicked}')"
    )
    page.wait_for_function(f"document.querySelector('#results .card').dataset.id === '{clicked}'")
    first_score = float(page.locator("#results .score").first.inner_text())
    assert first_score == pytest.approx(1.0, abs=1e-3)  # the clicked image itself comes first
    assert "image_id=" in page.url
    page.screenshot(path=str(tmp_path / "image-search.png"), full_page=True)
    assert (tmp_path / "image-search.png").stat().st_size > 1000
    print(f"\nscreenshots: {tmp_path / 'text-search.png'} {tmp_path / 'image-search.png'}")


def test_errors_show_on_the_page(page):
    page.fill("#q", "x" * 1001)  # maxlength stops typing past 1000; the server's limit is 1000 too
    assert len(page.input_value("#q")) == 1000
    page.evaluate("document.getElementById('q').removeAttribute('maxlength')")
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "Type a few words" in page.inner_text("#status")
    # an upload that is not an image: the server's JSON error is shown, the page keeps working
    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}]
    )
    page.wait_for_function("document.getElementById('status').textContent.includes('not an image')")
    assert page.locator("#status").evaluate("e => e.classList.contains('error')")
    assert not [e for e in page.errors if "400" not in e and "Failed to load resource" not in e]


def test_heat_maps_show_over_the_results(page, tmp_path):
    page.select_option("#where", "gradcam")
    page.select_option("#k", "10")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('a blue square')")
    n = page.locator("#results .card img").count()
    page.wait_for_function(f"document.querySelectorAll('#results canvas.heat').length === {n}")
    kinds = {c.get_attribute("data-kind") for c in page.locator("#results canvas.heat").all()}
    assert kinds == {"gradcam"}
    drawn = page.evaluate(  # some pixel of every map has colour (a map drawn, not an empty canvas)
        "[...document.querySelectorAll('canvas.heat')].every(c => c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0))"
    )
    assert drawn
    page.screenshot(path=str(tmp_path / "heat-maps.png"), full_page=True)
    page.select_option("#where", "off")
    page.wait_for_function("document.querySelectorAll('#results canvas.heat').length === 0")


def test_composed_query_from_a_result_and_words(page, tmp_path):
    """Click a result, then "+ words" and type: the image changed by the words is searched (a composed
    query), the URL keeps both; "✕" goes back to plain text search."""
    page.select_option("#where", "off")
    page.select_option("#k", "10")
    page.fill("#q", "a red star")
    page.press("#q", "Enter")
    cards = page.locator("#results .card")
    page.wait_for_function("document.getElementById('status').textContent.includes('a red star')")
    assert page.locator("#ref").is_hidden()  # a text search offers no image to change
    clicked = int(cards.nth(2).get_attribute("data-id"))
    cards.nth(2).click()
    page.wait_for_function(
        f"document.getElementById('status').textContent.includes('Images like #{clicked}')"
    )
    assert page.locator("#ref").is_visible()
    page.click("#compose")
    page.fill("#q", "a blue square")
    page.press("#q", "Enter")
    page.wait_for_function(
        f"document.getElementById('status').textContent.includes('#{clicked} + “a blue square”')"
    )
    assert cards.count() == 10 and "image_id=" in page.url and "q=a+blue+square" in page.url
    page.screenshot(path=str(tmp_path / "composed-search.png"), full_page=True)
    page.click("#unref")
    page.fill("#q", "a green circle")
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('“a green circle”')")
    assert page.locator("#ref").is_hidden()
