"""Screenshot each tab of the web UI (for the README) by driving it in Debian's Chromium.

    python scripts/ui_screenshots.py --db DIR [--query "a blue circle"] [--out docs/screenshots]

Starts the app on a free local port, walks a person's path (a search and a click, a similar-image
query, the failure modes, a selection made from the worst one, the model-health pictures and a click
on the map) and writes one PNG per tab. The temporary selection is removed again afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
SELECTION = "screenshot-example"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="database folder to serve")
    p.add_argument("--query", default=None, help="search text (default: the worst failure mode's description)")
    p.add_argument("--out", default="docs/screenshots", help="folder for the PNGs")
    p.add_argument("--width", type=int, default=1400)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from playwright.sync_api import sync_playwright

    from search_ui.app import build_app, launch_kwargs
    from search_ui.selections import Selections

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = build_app(args.db)
    app.launch(prevent_thread_lock=True, **launch_kwargs(app, port=None))
    ui = app.llm2loss_handlers
    modes = ui.ctx.modes(10)
    query = args.query or (modes[0]["description"] if modes else "a photo")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(app.local_url)
            page.wait_for_selector("#search-text textarea")

            def tab(name):
                page.get_by_role("tab", name=name).click()

            def shot(name):
                page.wait_for_timeout(800)  # let images finish fading in
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                print(out / f"{name}.png")

            page.fill("#search-text textarea", query)
            page.keyboard.press("Enter")
            page.wait_for_selector("#search-gallery .thumbnail-item img")
            page.locator("#search-gallery .thumbnail-item").first.click()
            page.wait_for_selector(".similar-gallery .thumbnail-item img")
            shot("search")

            first_id = ui.search_records(query, 1)[0]["id"]
            tab("Similar")
            page.fill("#similar-id textarea", first_id)
            page.click("#similar-button")
            page.wait_for_selector("#similar-gallery .thumbnail-item img")
            shot("similar")

            tab("Failure modes")
            page.click("#explain-button")
            page.wait_for_function("() => document.querySelector('#modes-status')?.innerText.includes('worst first')")
            page.wait_for_selector("#mode-gallery .thumbnail-item img")
            shot("failure_modes")

            page.fill("#mode-selection-name textarea", SELECTION)
            page.click("#mode-add")
            # Notifications would cover the top of the remaining screenshots.
            page.add_style_tag(content=".toast-wrap { display: none !important; }")
            tab("Curate")
            page.wait_for_function(
                f"() => document.querySelector('#curate-summary')?.innerText.includes('{SELECTION}')")
            page.wait_for_selector("#curate-gallery .thumbnail-item img")
            shot("curate")

            tab("Model health")
            page.get_by_role("button", name="Draw").click()
            page.wait_for_selector("#health-map img")
            h, geom, _ = ui.health_data()
            worst = int(h.pred.argmax()) if h.has_predictions else int(h.loss.argmax())
            px, py = geom.to_pixel(*h.xy[worst])
            img = page.locator("#health-map img")
            img.scroll_into_view_if_needed()
            box = img.bounding_box()
            nat = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
            img.click(position={"x": px * box["width"] / nat[0], "y": py * box["height"] / nat[1]})
            page.wait_for_selector("#health-region .thumbnail-item img")
            page.evaluate("window.scrollTo(0, 0)")
            shot("model_health")
            browser.close()
    finally:
        if SELECTION in Selections(ui.ctx.db).all():
            Selections(ui.ctx.db).remove(SELECTION)
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
