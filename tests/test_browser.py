"""The page in Debian's Chromium, driven by Playwright: a person's path through the app.

Chromium comes from the system package (``apt-get install chromium``, done by ``.ci/run``), never from
a Playwright browser download; without /usr/bin/chromium these tests skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.fakes import make_db
from tests.ui_helpers import fit_ensemble_keep_planted

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_curation = pytest.mark.skipif(
    not all(_has(m) for m in ("search_ui.selections", "search_ui.export", "diagnosis.explain")),
    reason="search_ui.selections / search_ui.export / diagnosis.explain not written yet")
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from search_ui.app import serve

    folder = tmp_path_factory.mktemp("browser")
    db = make_db(folder, n=120)
    fit_ensemble_keep_planted(db)
    server = serve(db, port=None, block=False)  # what `llm2loss serve` runs: the page mounted beside the API
    yield server, server.local_url, db
    server.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served[1])
    page.wait_for_selector("#search-text textarea")
    yield page
    page.close()


def _search(page, text: str) -> None:
    page.fill("#search-text textarea", text)
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-gallery img")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_page_loads_with_every_tab(page):
    assert page.title() == "llm2loss"
    for name in ("Search", "Similar", "Failure modes", "Curate", "Model health"):
        assert page.get_by_role("tab", name=name).is_visible()
    assert "120 samples" in page.inner_text("body")


def test_query_shows_ranked_images_and_a_click_shows_details(page):
    _search(page, "a blue circle")
    status = page.inner_text("#search-status")
    assert "24 results" in status
    images = page.locator("#search-gallery .thumbnail-item img")
    assert images.count() == 24
    captions = page.locator("#search-gallery .thumbnail-item").all_inner_texts()
    assert all("loss" in c and "pred" in c for c in captions[:24])
    # The default weight (0.5) ranks the planted failures (blue circles, loss ~2.5) above the rest.
    assert captions[0].startswith("circle")
    page.locator("#search-gallery .thumbnail-item").first.click()
    page.wait_for_selector(".details table")
    assert "predicted_loss" in page.inner_text(".details")
    page.wait_for_selector(".similar-gallery .thumbnail-item img")
    assert page.locator(".similar-gallery .thumbnail-item img").count() == 8


def test_bad_filter_shows_a_readable_message(page):
    page.get_by_text("Options").click()
    page.get_by_label("Filter").first.fill("no_such_column > 1")
    page.fill("#search-text textarea", "a dog")
    page.keyboard.press("Enter")
    toast = page.locator(".toast-body").first
    toast.wait_for()
    text = toast.inner_text()
    assert "has no column 'no_such_column'" in text and "Traceback" not in text


def test_model_health_draws_and_the_map_answers_a_click(page, served):
    from search_ui.ui import health as H

    _tab(page, "Model health")
    page.get_by_role("button", name="Draw").click()
    page.wait_for_selector("#health-map img")
    assert "Spearman rho" in page.inner_text("body")
    # Click on the worst sample's dot: its region's images appear, the worst first.
    handlers_h, geom, _ = served[0].llm2loss_handlers.health_data()
    worst = int(handlers_h.pred.argmax())
    px, py = geom.to_pixel(*handlers_h.xy[worst])
    img = page.locator("#health-map img")
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    img.click(position={"x": px * box["width"] / natural[0], "y": py * box["height"] / natural[1]})
    page.wait_for_selector("#health-region .thumbnail-item img")
    assert page.locator("#health-region .thumbnail-item img").count() >= 1
    ids = H.ids_near(handlers_h, geom, px, py)
    assert str(handlers_h.ids[worst]) == ids[0]
    assert "samples near the click" in page.inner_text("body")


@needs_curation
def test_failure_mode_becomes_a_selection_and_downloads_as_an_indexable_manifest(page, served, tmp_path,
                                                                                  tiny_clip_spec):
    import pandas as pd

    from indexer.pipeline import index_dataset

    _tab(page, "Failure modes")
    page.click("#explain-button")
    # this small table's groups are under 20 samples: the status says why none is shown
    page.wait_for_function("() => /costliest first|No failure mode is shown/.test("
                           "document.querySelector('#modes-status')?.innerText)")
    first = served[0].llm2loss_context.modes(10)[0]
    assert first["description"] in page.inner_text("#modes-table")
    page.wait_for_selector("#mode-gallery .thumbnail-item img")
    page.fill("#mode-selection-name textarea", "worst-mode")
    page.click("#mode-add")
    page.locator(".toast-body").filter(has_text="worst-mode").first.wait_for()
    _tab(page, "Curate")
    page.wait_for_function(
        "() => document.querySelector('#curate-summary')?.innerText.includes('worst-mode')")
    summary = page.inner_text("#curate-summary")
    assert f"{len(first['ids'])} samples" in summary
    page.click("#download-button")
    link = page.locator("#download-file a").first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    manifest = tmp_path / "worst-mode.csv"
    dl.value.save_as(manifest)
    df = pd.read_csv(manifest)
    assert sorted(df["id"]) == sorted(first["ids"]) and "image" in df.columns
    report = index_dataset(str(manifest), str(tmp_path / "reindexed"), clip=tiny_clip_spec, device="cpu")
    from indexer.store import Database

    assert Database(tmp_path / "reindexed").count_rows() == len(df)
    assert report is not None


def test_screenshots_of_each_tab(page, tmp_path):
    """Every tab renders (a screenshot each); docs/screenshots come from scripts/ui_screenshots.py."""
    for name in ("Search", "Similar", "Failure modes", "Curate", "Model health"):
        _tab(page, name)
        page.wait_for_timeout(200)
        out = Path(tmp_path) / f"{name}.png"
        page.screenshot(path=str(out), full_page=True)
        assert out.stat().st_size > 5_000
