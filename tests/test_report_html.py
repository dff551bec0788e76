"""report.html (report_html.py): self-contained, names shown literally, thumbnails capped, optional calibration.

The page in a real browser is tested in test_report_html_browser.py, from :func:`write_tiny_report` below.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import report_html
from common import REPORT_FILES
from conftest import PREDICT_FLAGS, ColourData, colour_image, run_script, tiny_train, weightless_checkpoint
from engine import Predictions
from report import write_evaluation_report

NASTY = 'Ankle <boot> & "x"'
TINY_CLASSES = ["T-shirt", NASTY, "Bag", "Coat"]
# true class of each image (3 a class) and the class it is predicted as: some mistakes, and empty cells such as
# (Bag, T-shirt) or (T-shirt, Bag).
TINY_TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
TINY_PRED = [0, 0, 1, 1, 1, 3, 2, 3, 2, 3, 1, 3]
COLOURS = [(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40)]


@dataclass(frozen=True)
class TinyReport:
    """A report folder written by report.py from synthetic predictions on real image files."""

    report_dir: Path
    predictions: Predictions
    class_names: list[str]

    @property
    def html(self) -> Path:
        return self.report_dir / "report.html"


def synthetic_probabilities(predicted: list[int], num_classes: int, seed: int = 0) -> np.ndarray:
    """One softmax-like row per image, its largest value at ``predicted`` (distinct values: no ties)."""
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.ones(num_classes), len(predicted)) * 0.4
    rows[np.arange(len(predicted)), predicted] += 0.6
    return rows / rows.sum(axis=1, keepdims=True)


def write_tiny_report(root: Path, **report_options) -> TinyReport:
    """12 real 40 px JPEGs in 4 class folders (one named ``NASTY``), an undecodable file, and report.py's report of
    synthetic predictions on them (no model): the page the browser tests open."""
    rng = np.random.default_rng(0)
    paths = []
    for position, label in enumerate(TINY_TRUE):
        folder = root / "val" / TINY_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(str(folder / f"img_{position}.jpg"))
        colour_image(COLOURS[label], rng, size=40).save(paths[-1])
    (root / "val" / "Bag" / "broken.jpg").write_bytes(b"not a jpeg")
    predictions = Predictions(paths=paths, targets=np.array(TINY_TRUE),
                              probabilities=synthetic_probabilities(TINY_PRED, len(TINY_CLASSES)),
                              failed=[(str(root / "val" / "Bag" / "broken.jpg"), "cannot identify image file")])
    checkpoint = weightless_checkpoint(TINY_CLASSES, epoch=3, config={"arch": "resnet18", "lr": 0.001, "epochs": 3,
                                                                      "note": "</script><b>x</b>"})
    write_evaluation_report(predictions, checkpoint, root / "report", source=str(root / "val"), **report_options)
    return TinyReport(root / "report", predictions, TINY_CLASSES)


class PageParts(HTMLParser):
    """What a page loads and runs: every src and href, the elements used, and the JSON data block."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.meta: dict[str, str] = {}
        self.data_json = ""
        self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "action", "srcset")]
        if tag == "meta" and values.get("http-equiv"):
            self.meta[values["http-equiv"]] = values.get("content") or ""
        self._in_data = tag == "script" and values.get("id") == "report-data"

    def handle_data(self, data: str) -> None:
        if self._in_data:
            self.data_json += data

    def handle_endtag(self, tag: str) -> None:
        self._in_data = False


def page_parts(path: Path) -> PageParts:
    parser = PageParts()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> TinyReport:
    return write_tiny_report(tmp_path_factory.mktemp("html"))


# --------------------------------------------------------------------------- self-contained and literal


def test_report_html_is_one_of_the_report_files(tiny_report: TinyReport) -> None:
    assert "report.html" in REPORT_FILES
    assert sorted(path.name for path in tiny_report.report_dir.iterdir()) == sorted(REPORT_FILES)


def test_the_page_loads_nothing_from_outside(tiny_report: TinyReport) -> None:
    parts = page_parts(tiny_report.html)
    assert parts.meta["Content-Security-Policy"] == report_html.CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in parts.meta["Content-Security-Policy"]
    assert [url for url in parts.urls if not url.startswith(("data:", "#"))] == []
    assert {"link", "iframe", "object", "embed"} & parts.tags == set()
    assert not re.search(r"https?://", tiny_report.html.read_text(encoding="utf-8"))


def test_the_data_block_cannot_close_its_script(tiny_report: TinyReport) -> None:
    data = {"name": "</script><script>alert(1)</script>", "other": "<!-- & -->"}
    text = report_html.script_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data


def test_class_names_and_config_are_escaped_in_the_html(tiny_report: TinyReport) -> None:
    text = tiny_report.html.read_text(encoding="utf-8")
    assert "<boot>" not in text and "<b>x</b>" not in text
    assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in text  # the config value, as text in the <details> table
    data = json.loads(page_parts(tiny_report.html).data_json)
    assert data["classes"] == TINY_CLASSES  # the literal name, for the script to set as textContent


def test_the_page_data_matches_the_predictions(tiny_report: TinyReport) -> None:
    data = json.loads(page_parts(tiny_report.html).data_json)
    assert data["order"] == [0, 1, 2, 3]  # class_order.auto_class_order: folder order for few classes
    matrix = np.zeros((4, 4), dtype=int)
    np.add.at(matrix, (TINY_TRUE, TINY_PRED), 1)
    assert data["matrix"] == matrix.tolist()
    assert [data["root"] + record["path"] for record in data["images"]] == tiny_report.predictions.paths
    pairs = list(zip(TINY_TRUE, TINY_PRED, strict=True))
    assert [(record["true"], record["pred"]) for record in data["images"]] == pairs
    probabilities = tiny_report.predictions.probabilities
    first = data["images"][2]  # a T-shirt predicted as NASTY
    assert [label for label, _ in first["top"]] == np.argsort(-probabilities[2])[:3].tolist()
    assert first["top"][0][1] == pytest.approx(probabilities[2, 1], abs=1e-4)
    rows = {row["name"]: row for row in data["rows"]}
    assert rows[NASTY]["support"] == 3 and rows[NASTY]["predicted"] == 4
    assert rows["T-shirt"]["confused_with"] == NASTY


def test_thumbnails_are_small_jpegs_and_the_cap_is_stated(tiny_report: TinyReport) -> None:
    data = json.loads(page_parts(tiny_report.html).data_json)
    assert len(data["thumbs"]) == 12 and all(record["thumb"] >= 0 for record in data["images"])
    assert decoded(data["thumbs"][0]).size == (40, 40)  # never enlarged
    assert "Thumbnails (64 px): 12 of 12 images embedded, at most 500" in tiny_report.html.read_text()


def decoded(data_uri: str) -> Image.Image:
    header, encoded = data_uri.split(",", 1)
    assert header == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "JPEG"
    return image


def test_a_thumbnail_is_shrunk_to_64_px_keeping_its_shape(tmp_path: Path) -> None:
    Image.new("RGB", (300, 150), (10, 200, 30)).save(tmp_path / "wide.png")
    assert decoded(report_html.thumbnail_data_uri(str(tmp_path / "wide.png"))).size == (64, 32)


def test_the_thumbnail_cap_keeps_the_most_confident_mistakes_then_every_class_in_turn() -> None:
    # Mistakes at 1 (confidence 0.6) and 4 (0.9); the correct images of class 0 are 0 and 2, of class 1 only 3.
    probabilities = np.array([[0.8, 0.2], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7], [0.9, 0.1]])
    predictions = Predictions(paths=[f"{index}.jpg" for index in range(5)], targets=np.array([0, 0, 0, 1, 1]),
                              probabilities=probabilities, failed=[])
    assert report_html.thumbnail_positions(predictions, 10) == [4, 1, 0, 3, 2]
    assert report_html.thumbnail_positions(predictions, 3) == [4, 1, 0]
    assert report_html.thumbnail_positions(predictions, 0) == []


def test_an_image_gone_since_the_inference_gets_no_thumbnail(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert report_html.thumbnail_data_uri(str(tmp_path / "gone.jpg")) is None
    assert f"no thumbnail of {tmp_path / 'gone.jpg'}" in capsys.readouterr().out


def test_a_split_beyond_the_cap_says_how_many_are_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_html, "MAX_THUMBNAILS", 5)
    written = write_tiny_report(tmp_path)
    data = json.loads(page_parts(written.html).data_json)
    assert len(data["thumbs"]) == 5 and sum(record["thumb"] >= 0 for record in data["images"]) == 5
    mistakes = [record["true"] != record["pred"] for record in data["images"] if record["thumb"] >= 0]
    assert mistakes.count(True) == 4  # every mistake, then one correct image
    assert "5 of 12 images embedded, at most 5" in written.html.read_text()


def test_many_classes_get_the_figure_and_the_largest_cells_instead_of_the_matrix(tmp_path: Path) -> None:
    classes = [f"c{index}" for index in range(report_html.MAX_MATRIX_CLASSES + 1)]
    targets = np.arange(len(classes))
    predictions = Predictions(paths=[str(tmp_path / f"{index}.jpg") for index in targets], targets=targets,
                              probabilities=synthetic_probabilities(list(np.roll(targets, 1)), len(classes)),
                              failed=[])
    Image.new("RGB", (4, 4)).save(tmp_path / "confusion_matrix.png")
    summary = {"images": len(classes), "classes": len(classes), "split": "", "classes_without_images": [],
               "undecodable": [], "accuracy": 0.0, "balanced_accuracy": 0.0, "macro_f1": 0.0, "top_k": 5,
               "top_k_accuracy": 0.0, "loss": 1.0}
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    confusion[targets, np.roll(targets, 1)] = 1
    page = report_html.report_html(predictions, confusion, summary, weightless_checkpoint(classes), tmp_path)
    assert '"matrix":null' in page and 'id="matrix"' not in page
    assert 'alt="confusion matrix"' in page and len(json.loads(page_parts_of(page).data_json)["largest"]) == 15


def page_parts_of(text: str) -> PageParts:
    parser = PageParts()
    parser.feed(text)
    return parser


# --------------------------------------------------------------------------- optional parts


def test_calibration_is_shown_when_present(tmp_path: Path, tiny_report: TinyReport) -> None:
    summary = json.loads((tiny_report.report_dir / "metrics.json").read_text())
    assert 'id="calibration"' in tiny_report.html.read_text()  # report.py writes ece and reliability.png
    uncalibrated = {key: value for key, value in summary.items() if key not in ("ece", "ece_calibrated", "temperature")}
    assert "ece" not in {card["key"] for card in report_html.metric_cards(uncalibrated)}

    calibrated = {**summary, "ece": 0.0812, "ece_calibrated": 0.0234, "temperature": 1.7}
    cards = {card["key"]: card for card in report_html.metric_cards(calibrated)}
    assert cards["ece"]["text"] == "8.1%" and "(T = 1.7): 2.3%" in cards["ece"]["how"]
    Image.new("RGB", (8, 8)).save(tmp_path / "reliability.png")
    assert report_html.figures(tmp_path, None, matrix_drawn=True)["reliability"] is not None
    assert report_html.figures(tmp_path / "absent", None, matrix_drawn=True)["reliability"] is None


def test_the_checkpoint_is_named_when_given(tmp_path: Path) -> None:
    written = write_tiny_report(tmp_path, checkpoint_path="runs/a/best.pt")
    assert "<dd>runs/a/best.pt</dd>" in written.html.read_text()


# --------------------------------------------------------------------------- end to end


def test_train_and_evaluate_write_report_html(small_data: ColourData, tmp_path: Path) -> None:
    tiny_train(small_data, tmp_path / "run", "--epochs", "1")
    trained = tmp_path / "run" / "report" / "report.html"
    assert trained.is_file()
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "run" / "best.pt", "--data-dir", small_data.root,
                        "--report-dir", tmp_path / "eval", *PREDICT_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert "report.html" in result.stdout
    data = json.loads(page_parts_of(page).data_json)
    assert len(data["images"]) == 3 and data["classes"] == ["0", "1", "2"]
    assert all(uri.startswith("data:image/png;base64,") for uri in re.findall(r'<img src="([^"]+)"', page))
    assert page.count("<figure><img") == 3  # the loss and accuracy curves of the run folder, the reliability diagram


def test_top_k_gets_a_card_only_when_the_summary_has_it() -> None:
    """metrics.json leaves top-k out where k is not below the class count (it would always be 100%)."""
    summary = {"images": 10, "classes": 3, "classes_without_images": [], "accuracy": 0.5, "balanced_accuracy": 0.5,
               "macro_f1": 0.5, "loss": 1.0}
    assert "top_k_accuracy" not in {card["key"] for card in report_html.metric_cards(summary)}
    with_top = {card["key"]: card for card in report_html.metric_cards({**summary, "top_k": 2, "top_k_accuracy": 0.9})}
    assert with_top["top_k_accuracy"]["label"] == "top-2 accuracy"
