"""report.html in a real browser (headless Chromium driven by Playwright), opened from file:// as a user would.

Every test checks, on the way out, that the page raised no error, logged no console error and requested nothing
but ``file:`` and ``data:`` URLs; a failing test leaves a screenshot (its path is printed).

Chromium: ``$CHROMIUM_PATH``, else the first of ``chromium-headless-shell``, ``chromium``, ``chromium-browser``
and ``google-chrome`` on the PATH (Debian: ``apt-get install chromium-headless-shell``). Without it, or without
the ``playwright`` package, these tests skip, except under ``CI=true``, where they fail: CI must not pass by
skipping them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report_html import NASTY, TINY_PRED, TINY_TRUE, TinyReport, write_tiny_report

import class_order
from conftest import read_csv_rows

CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    """The Chromium binary to drive: ``$CHROMIUM_PATH`` or the first known name on the PATH."""
    if os.environ.get("CHROMIUM_PATH"):
        return os.environ["CHROMIUM_PATH"]
    return next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)


def missing_browser(reason: str) -> None:
    """Skip, or fail under CI=true (so that CI cannot pass without running these tests)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}; install it (see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole module (a launch takes about a second)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_browser("the playwright package is not installed (pip install -r requirements-dev.txt)")
    executable = chromium_path()
    if executable is None or not Path(executable).is_file():
        missing_browser(f"no Chromium found (tried $CHROMIUM_PATH and {', '.join(CHROMIUM_NAMES)} on the PATH)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> TinyReport:
    return write_tiny_report(tmp_path_factory.mktemp("html"))


@dataclass
class PageLog:
    """What the page did that a self-contained, working page never does."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every attempt, blocked ones included
    failed: list[str] = field(default_factory=list)

    def outside_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(("file:", "data:"))]


@pytest.fixture
def page_log() -> PageLog:
    return PageLog()


@pytest.fixture
def page(browser: Any, tiny_report: TinyReport, page_log: PageLog, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The tiny report open in a new page; afterwards, no error and no outside request, else a screenshot."""
    opened = browser.new_page(viewport={"width": 1280, "height": 900})
    opened.on("pageerror", lambda error: page_log.errors.append(f"page error: {error}"))
    opened.on("console", lambda message: page_log.errors.append(f"console {message.type}: {message.text}")
              if message.type == "error" else None)
    opened.on("request", lambda sent: page_log.requests.append(sent.url))
    opened.on("requestfailed", lambda sent: page_log.failed.append(sent.url))
    opened.goto(tiny_report.html.as_uri())
    failed_before = request.session.testsfailed
    yield opened
    try:
        assert page_log.errors == []
        assert page_log.outside_requests() == []
    except AssertionError:
        save_screenshot(opened, request.node.name)
        raise
    else:
        if request.session.testsfailed > failed_before:  # the test's own assertion failed
            save_screenshot(opened, request.node.name)
    finally:
        opened.close()


def save_screenshot(page: Any, name: str) -> None:
    path = Path(tempfile.mkdtemp(prefix="report_html_")) / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot of the failing page: {path}")


def texts(page: Any, selector: str) -> list[str]:
    return [element.text_content() for element in page.query_selector_all(selector)]


def shown_paths(page: Any, container: str) -> list[str]:
    return [card.get_attribute("data-path") for card in page.query_selector_all(f"{container} .thumb-card")]


# --------------------------------------------------------------------------- the page as a whole


def test_the_page_requests_nothing_but_itself(page: Any, page_log: PageLog) -> None:
    assert page_log.requests[0] == page.url and page.url.startswith("file:")
    assert page_log.outside_requests() == []
    assert page.query_selector_all("#matrix td.cell")  # the script ran


def test_an_outside_request_is_refused_visibly(page: Any, page_log: PageLog) -> None:
    page.evaluate("""() => { const img = document.createElement("img");
                             img.src = "https://example.com/pixel.png"; document.body.append(img); }""")
    page.wait_for_timeout(200)
    refused = [error for error in page_log.errors if "Content Security Policy" in error]
    assert len(refused) == 1 and "example.com/pixel.png" in refused[0]
    assert page_log.failed == ["https://example.com/pixel.png"]
    page_log.errors.clear()  # expected here, as is the blocked attempt
    page_log.requests.remove("https://example.com/pixel.png")


def test_the_cards_equal_metrics_json(page: Any, tiny_report: TinyReport) -> None:
    summary = json.loads((tiny_report.report_dir / "metrics.json").read_text())
    cards = {card.get_attribute("data-metric"): card for card in page.query_selector_all("#cards .metric")}
    expected = {"accuracy", "balanced_accuracy", "macro_f1", "loss"} | ({"ece", "top_k_accuracy"} & summary.keys())
    assert set(cards) == expected
    for key, card in cards.items():
        assert float(card.get_attribute("data-value")) == summary[key], key
    assert cards["accuracy"].query_selector(".value").text_content() == f"{summary['accuracy']:.1%}"
    assert cards["macro_f1"].query_selector(".value").text_content() == f"{summary['macro_f1']:.3f}"
    assert "top_k_accuracy" not in cards  # top-5 of 4 classes is always 100%: left out
    assert "every class counts once" in cards["balanced_accuracy"].text_content()


def test_the_class_name_is_shown_literally(page: Any) -> None:
    assert NASTY in texts(page, "#class-table tbody td:first-child")
    assert page.query_selector("boot") is None
    assert NASTY in texts(page, "#matrix th.row")


def test_undecodable_files_and_the_config_are_listed(page: Any, tiny_report: TinyReport) -> None:
    assert texts(page, "#undecodable li") == [f"{tiny_report.report_dir.parent / 'val' / 'Bag' / 'broken.jpg'}: "
                                              "cannot identify image file"]
    assert not page.is_visible(".config")  # collapsed
    page.click("#configuration summary")
    assert "</script><b>x</b>" in texts(page, ".config td")


# --------------------------------------------------------------------------- the class table


def test_the_class_table_sorts_by_a_clicked_header(page: Any, tiny_report: TinyReport) -> None:
    rows = read_csv_rows(tiny_report.report_dir / "per_class.csv")
    by_f1 = [row["class"] for row in sorted(rows, key=lambda row: float(row["f1"]))]  # stable: folder order on ties
    page.click("#class-table th[data-key=f1] button")
    assert texts(page, "#class-table tbody td:first-child") == by_f1
    assert page.get_attribute("#class-table th[data-key=f1]", "aria-sort") == "ascending"
    page.click("#class-table th[data-key=f1] button")
    descending = [row["class"] for row in sorted(rows, key=lambda row: -float(row["f1"]))]
    assert texts(page, "#class-table tbody td:first-child") == descending
    page.click("#class-table th[data-key=name] button")
    assert texts(page, "#class-table tbody td:first-child") == sorted(row["class"] for row in rows)


def test_the_class_table_filters_by_name(page: Any) -> None:
    page.fill("#class-filter", "BOOT")
    assert texts(page, "#class-table tbody td:first-child") == [NASTY]
    assert page.text_content("#class-count") == "1 of 4 classes"
    page.fill("#class-filter", "no such class")
    assert texts(page, "#class-table tbody tr") == [] and page.text_content("#class-count") == "0 of 4 classes"
    page.fill("#class-filter", "")
    assert len(texts(page, "#class-table tbody tr")) == 4


# --------------------------------------------------------------------------- the confusion matrix


def test_every_confusion_cell_shows_exactly_its_images(page: Any, tiny_report: TinyReport) -> None:
    paths = np.array(tiny_report.predictions.paths)
    matrix = np.zeros((4, 4), dtype=int)
    np.add.at(matrix, (TINY_TRUE, TINY_PRED), 1)
    order = class_order.auto_class_order(matrix)
    assert texts(page, "#matrix th.col") == [tiny_report.class_names[index] for index in order]
    cells = page.query_selector_all("#matrix td.cell")
    assert len(cells) == 16
    for cell, (true, predicted) in zip(cells, [(row, column) for row in order for column in order], strict=True):
        assert (int(cell.get_attribute("data-true")), int(cell.get_attribute("data-pred"))) == (true, predicted)
        assert int(cell.get_attribute("data-count")) == matrix[true, predicted]
        assert cell.text_content() == (str(matrix[true, predicted]) if matrix[true, predicted] else "")
        cell.click()
        expected = paths[(np.array(TINY_TRUE) == true) & (np.array(TINY_PRED) == predicted)].tolist()
        assert shown_paths(page, "#cell-view") == expected, (true, predicted)
        if not expected:
            assert "No images in this cell" in page.text_content("#cell-view .empty")


def test_a_cells_images_show_their_top_3_probabilities(page: Any, tiny_report: TinyReport) -> None:
    page.click('#matrix td[data-true="0"][data-pred="1"]')  # the one T-shirt predicted as NASTY: image 2
    [card] = page.query_selector_all("#cell-view .thumb-card")
    probabilities = tiny_report.predictions.probabilities[2]
    top = np.argsort(-probabilities)[:3]
    expected = [f"{tiny_report.class_names[label]}{probabilities[label]:.1%}" for label in top]
    assert [item.text_content() for item in card.query_selector_all("li")] == expected
    assert card.query_selector("img").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert card.query_selector(".truth").text_content() == "true: T-shirt"


def test_a_largest_confusion_opens_its_cell(page: Any, tiny_report: TinyReport) -> None:
    page.click("#largest button >> nth=0")
    assert page.query_selector_all("#matrix td.selected")
    selected = page.query_selector("#matrix td.selected")
    true, predicted = int(selected.get_attribute("data-true")), int(selected.get_attribute("data-pred"))
    assert true != predicted
    assert len(shown_paths(page, "#cell-view")) == int(selected.get_attribute("data-count"))


# --------------------------------------------------------------------------- the mistakes


def test_the_mistakes_gallery_lists_every_mistake_with_its_full_path(page: Any, tiny_report: TinyReport) -> None:
    paths = tiny_report.predictions.paths
    wrong = [paths[index] for index, (true, guess) in enumerate(zip(TINY_TRUE, TINY_PRED, strict=True))
             if true != guess]
    assert sorted(shown_paths(page, "#mistake-gallery")) == sorted(wrong)
    assert set(texts(page, "#mistake-gallery .path")) == set(wrong)
    confidence = [float(text.rstrip("%")) for text in texts(page, "#mistake-gallery li:first-child .probability")]
    assert confidence == sorted(confidence, reverse=True)


def test_the_mistakes_filter_by_true_and_predicted_class(page: Any, tiny_report: TinyReport) -> None:
    paths = tiny_report.predictions.paths
    page.select_option("#mistake-true", label=NASTY)
    assert shown_paths(page, "#mistake-gallery") == [paths[5]]  # the NASTY image predicted as Coat
    page.select_option("#mistake-pred", label="T-shirt")
    assert shown_paths(page, "#mistake-gallery") == []
    assert page.text_content("#mistake-gallery .empty") == "No mistakes with these classes."
    page.select_option("#mistake-true", label="any")
    page.select_option("#mistake-pred", label=NASTY)
    assert sorted(shown_paths(page, "#mistake-gallery")) == sorted([paths[2], paths[10]])
