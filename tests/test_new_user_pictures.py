"""Issue 17, round two, as a new user sees it: misclassified.png captions stay in their column, the curves of a
--train-on-all run show no empty val entry, --ema runs show the EMA val curve, emoji class names get no CJK-font
note, and scripts/ablate.py's --help and run folder names say what they mean."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.font_manager import FontEntry

import figures
import fonts
import image_grids
import plots
from conftest import load_script

# 36 classes whose names share a long head and tail, so that their caption labels grow well past 18 characters
# to stay distinct (as report.plot_misclassified shortens them).
SUBSPECIES = ["pedunculata", "brutia", "imeretina", "pyrenaica", "WWMMWide", "estremadurensis"]
FORMS = ["forma_fastigiata", "forma_pendula", "forma_purpurea", "forma_WWMMWW", "forma_normalis", "cultivar_Aurea"]
OAK_NAMES = [f"Quercus_robur_subspecies_{sub}_{form}" for sub in SUBSPECIES for form in FORMS]
CAPTION_NAME_CHARS = 18  # report.MAX_CAPTION_NAME_CHARS


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """A matplotlib warning (a missing glyph, a layout problem) should fail the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture
def rendered(monkeypatch) -> list[dict]:
    """Each figure drawn with Agg instead of written: pixel boxes of its image axes and texts, and its legend."""
    recorded = []

    def record(fig, path):
        renderer = FigureCanvasAgg(fig).get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        axes = [ax.get_position(original=True).transformed(fig.transFigure) for ax in fig.axes]
        main = fig.axes[0]
        legend = main.get_legend()
        recorded.append({
            "size": (width, height),
            "image_boxes": axes,
            "texts": [(text.get_text(), text.get_window_extent(renderer)) for text in fig.texts],
            "legend": [text.get_text() for text in legend.get_texts()] if legend else [],
            "lines": {line.get_label(): line.get_ydata() for line in main.get_lines()},
            "title": main.get_title(),
        })

    monkeypatch.setattr(figures, "save_figure", record)
    return recorded


def mistake_captions(count: int) -> list[str]:
    """Captions as report.mistake_caption writes them, for the classes with the longest shortened labels."""
    labels = figures.shorten_labels(OAK_NAMES, CAPTION_NAME_CHARS)
    order = sorted(range(len(labels)), key=lambda index: -len(labels[index]))
    return [f"true: {labels[order[i]]}\npred: {labels[order[i + 1]]} (97%)\np(true) = 1.2%\n"
            f"{OAK_NAMES[order[i]][:20]}/IMG_20240101_120000.jpg" for i in range(count)]


# --------------------------------------------------------------------------- misclassified.png


def test_misclassified_captions_stay_in_their_column_with_36_long_class_names(tmp_path, rendered):
    captions = mistake_captions(12)
    images = [np.zeros((64, 64, 3), dtype=np.uint8)] * len(captions)
    image_grids.plot_image_grid(images, captions, tmp_path / "misclassified.png", "Most confident mistakes")
    (figure,) = rendered
    boxes = figure["image_boxes"]
    column_width = boxes[1].x0 - boxes[0].x0
    drawn = figure["texts"][:len(captions)]  # the title comes last
    for index, ((_text, extent), box) in enumerate(zip(drawn, boxes, strict=True)):
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x0 + column_width, f"caption {index} leaves its column"
        assert extent.y0 >= box.y1 - 1, f"caption {index} overlaps its image"
        if index >= image_grids.GRID_COLUMNS:  # below the row above
            assert extent.y1 <= boxes[index - image_grids.GRID_COLUMNS].y0, f"caption {index} overlaps the image above"
    # wrapped, not cut: every class name is still there in full
    for (text, _), caption in zip(drawn, captions, strict=True):
        unwrapped = text.replace("\n" + image_grids.CAPTION_CONTINUATION, "")
        assert unwrapped == caption


def test_a_caption_line_too_long_to_wrap_is_shortened_in_the_middle():
    name = "_".join(OAK_NAMES)  # far too long for two lines
    layout = image_grids.fit_captions([f"true: {name}\np(true) = 1.2%"], image_grids.CAPTION_WIDTH_INCHES * 72)
    lines = layout.captions[0].split("\n")
    assert layout.fontsize == min(image_grids.CAPTION_POINTS)
    assert len(lines) == image_grids.CAPTION_MAX_WRAPS + 1 and lines[-1] == "p(true) = 1.2%"
    shown = "".join(lines[:-1]).replace(image_grids.CAPTION_CONTINUATION, "")
    head, _, tail = shown.partition("…")
    assert f"true: {name}".startswith(head) and name.endswith(tail) and tail


def test_short_captions_keep_their_size_and_lines():
    captions = ["true: cat\npred: dog (90%)\np(true) = 5.0%\ncat/1.jpg"]
    layout = image_grids.fit_captions(captions, image_grids.CAPTION_WIDTH_INCHES * 72)
    assert layout == (captions, max(image_grids.CAPTION_POINTS))


# --------------------------------------------------------------------------- training curves


def history(epochs: int, validated: bool = True, ema: bool = False) -> list[dict]:
    """A history as train.py keeps it: val values None with --train-on-all, ema_val_* columns with --ema."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": 1 - 0.9 / epoch, "lr": 1e-3,
               "val_loss": 2.2 / epoch + 0.2 if validated else None,
               "val_acc": 0.9 - 0.8 / epoch if validated else None}
        if ema:
            row.update(ema_val_loss=2.0 / epoch + 0.3, ema_val_acc=0.92 - 0.85 / epoch)
        rows.append(row)
    return rows


@pytest.mark.parametrize("plot", [plots.plot_loss_curve, plots.plot_accuracy_curve])
def test_a_train_on_all_run_draws_no_val_line_legend_entry_or_best_marker(tmp_path, rendered, plot):
    plot(history(5, validated=False), tmp_path / "curve.png", best_epoch=5)  # train.py: best.pt is the last epoch
    (figure,) = rendered
    assert "val" not in figure["lines"] and "val" not in figure["legend"]
    assert not any(label.startswith("best") for label in figure["legend"])
    assert "train" in figure["legend"] and "nothing validated" in figure["title"]


def test_an_ema_run_draws_the_ema_val_loss_and_accuracy(tmp_path, rendered):
    rows = history(4, ema=True)
    plots.plot_loss_curve(rows, tmp_path / "loss.png", best_epoch=4)
    plots.plot_accuracy_curve(rows, tmp_path / "acc.png", best_epoch=4)
    loss, accuracy = rendered
    label = "val (EMA weights)"
    assert label in loss["legend"] and label in accuracy["legend"] and "val" in loss["legend"]
    np.testing.assert_allclose(loss["lines"][label], [row["ema_val_loss"] for row in rows])
    np.testing.assert_allclose(accuracy["lines"][label], [row["ema_val_acc"] * 100 for row in rows])
    plots.plot_loss_curve(history(3), tmp_path / "plain.png")  # without --ema: no EMA line
    assert rendered[-1]["legend"][:2] == ["train", "val"] and label not in rendered[-1]["legend"]


# --------------------------------------------------------------------------- fonts


def test_emoji_class_names_get_no_cjk_font_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fonts, "_REPORTED_MISSING_GLYPHS", set())
    plots.plot_confusion_matrix(np.eye(3, dtype=int) * 5, ["🐶 dog", "🦊 fox", "bird"], tmp_path / "cm.png")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert not any("CJK" in note or "cjk" in note for note in notes)  # no note at all where an emoji font exists
    assert all("emoji" in note for note in notes)


def test_the_font_note_names_what_fits_the_missing_characters():
    emoji = fonts.missing_glyphs_note(["🐶 dog"], frozenset("🐶"))
    cjk = fonts.missing_glyphs_note(["猫 cat"], frozenset("猫"))
    both = fonts.missing_glyphs_note(["猫 cat", "🐶 dog"], frozenset("猫🐶"))
    assert "emoji" in emoji and "fonts-symbola" in emoji and "CJK" not in emoji and "🐶" in emoji
    assert "fonts-noto-cjk" in cjk and "emoji" not in cjk
    assert "fonts-noto-cjk" in both and "fonts-symbola" in both and "2 label(s)" in both


def test_every_script_gets_a_font_that_has_it_and_only_glyphs_no_font_has_are_missing(monkeypatch):
    installed = [FontEntry(fname="/fonts/NotoSansCJK.ttc", name="Noto Sans CJK JP"),
                 FontEntry(fname="/fonts/NotoSansDevanagari.ttf", name="Noto Sans Devanagari")]
    glyphs = {"/fonts/NotoSansCJK.ttc": "猫狗", "/fonts/NotoSansDevanagari.ttf": "बिल्ली"}
    monkeypatch.setattr(fonts, "_glyphs_in_font", lambda path, chars: frozenset(chars & set(glyphs[path])))
    families, missing = fonts.fallback_font_families(frozenset("猫बि🐶"), installed)
    assert sorted(families) == ["Noto Sans CJK JP", "Noto Sans Devanagari"] and missing == frozenset("🐶")


def test_a_colour_emoji_font_is_never_a_fallback(monkeypatch):
    """A bitmap-only font (Noto Color Emoji) has the glyphs, but matplotlib fails drawing it at any size."""

    class BitmapFont:
        face_flags = 0  # no FT_FACE_FLAG_SCALABLE

        def __init__(self, path: str) -> None:
            self.path = path

        def get_char_index(self, code: int) -> int:
            return 1

    monkeypatch.setattr(fonts, "FT2Font", BitmapFont)
    assert fonts._glyphs_in_font("/fonts/NotoColorEmoji.ttf", frozenset("🐶")) == frozenset()


# --------------------------------------------------------------------------- scripts/ablate.py


def test_ablate_help_shows_each_default_once() -> None:
    help_text = " ".join(load_script("scripts/ablate.py").get_args_parser().format_help().split())
    assert "(default: None)" not in help_text and "(default: )" not in help_text
    assert "train.py --data-dir for every run (default: each config's) --epochs" in help_text
    assert "(default: runs/ablation)" in help_text
    assert help_text.count("(default: each config's)") == 3


LONG_RECIPES = [f"configs/reference.yaml --trainable layer3,layer4,fc --img-size 224 --label-smoothing 0.1 "
                f"--batch-size {size}" for size in (32, 64)]


def test_long_recipe_folders_say_what_differs_and_stay_the_same() -> None:
    ablate = load_script("scripts/ablate.py")
    recipes = ablate.parse_recipes(LONG_RECIPES)
    for recipe, size in zip(recipes, (32, 64), strict=True):
        assert len(recipe.slug) <= ablate.MAX_SLUG_CHARS
        assert recipe.slug.startswith("reference-") and f"-batch-size-{size}-" in recipe.slug  # whole flag and value
        assert recipe.slug.endswith(f"-{ablate.name_hash(recipe.name)}")
    # Deterministic: the same folders in another call, alone or in another order, so complete runs are reused.
    assert [recipe.slug for recipe in ablate.parse_recipes(LONG_RECIPES[::-1])] == [r.slug for r in recipes[::-1]]
    assert ablate.parse_recipes(LONG_RECIPES[1:])[0].slug == recipes[1].slug


def test_a_long_label_is_cut_at_a_word_boundary() -> None:
    ablate = load_script("scripts/ablate.py")
    label = "label smoothing with the reference recipe and a much larger batch"
    (recipe,) = ablate.parse_recipes([f"'name={label}' --lr 1"])
    readable = recipe.slug.removesuffix(f"-{ablate.name_hash(recipe.name)}")
    assert readable == "label-smoothing-with-the-reference-recipe-and-a-much"
