"""nin.tools.visualize: the maps are the model's own pre-pooling output, the statistic counts right, every figure has
its print size (at most 7 in wide, no text under 9 pt) in the format asked for."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from nin.engine.metrics import read_metrics
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from nin.tools import curves, figures, visualize  # noqa: E402
from nin.pretrained import load  # noqa: E402
from nin.cli import main  # noqa: E402
from nin.data import load_dataset  # noqa: E402
from nin.errors import NinError  # noqa: E402
from nin.models import get_model  # noqa: E402
from nin.transforms import Preprocessing  # noqa: E402

CLASSES = [f"class {k}" for k in range(10)]


def _png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("nin_mnist", batch_norm=True, class_map_relu=False)  # the fast recipe's variant


def test_confidence_maps_are_the_pre_pooling_output_and_average_to_the_logits():
    model = _model().train()
    images = torch.randn(4, 1, 28, 28)
    maps = visualize.confidence_maps(model, images)
    assert model.training, "confidence_maps must leave the model's mode as it found it"
    model.eval()
    with torch.no_grad():
        expected = model.forward_features(images)
        logits = model(images)
    assert maps.shape == (4, 10, 7, 7) and not maps.requires_grad
    torch.testing.assert_close(maps, expected, rtol=0, atol=0)
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, rtol=1e-5, atol=1e-6)


def test_map_scores_in_batches_match_one_pass():
    model = _model().eval()
    images = torch.randint(0, 256, (13, 1, 28, 28), dtype=torch.uint8)
    preprocessing = Preprocessing("scale")
    peaks, logits = visualize.map_scores(model, preprocessing, images, batch_size=5)
    maps = visualize.confidence_maps(model, preprocessing(images))
    torch.testing.assert_close(peaks, maps.amax(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_map_statistics_counts():
    peaks = torch.tensor([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.0, 1.0, 3.0], [2.0, 0.0, 0.0]])
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    # max map: 0, 1, 2, 0 -> true 3/4; GAP: 0, 2, 2, 1 -> agree 2/4, accurate 3/4
    stats = visualize.map_statistics(peaks, logits, labels)
    assert stats == {"n": 4, "max_map_true_class": 0.75, "max_map_agrees_with_gap": 0.5, "gap_accuracy": 0.75,
                     "chance": pytest.approx(1 / 3)}


def test_upsample_maps_takes_the_chosen_class_bilinearly():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 2] = 7.0
    maps[1, 1, 0, 0] = 1.0
    heat = figures.upsample_maps(maps, torch.tensor([2, 1]), (32, 32))
    assert heat.shape == (2, 32, 32)
    torch.testing.assert_close(heat[0], torch.full((32, 32), 7.0))  # a constant map stays constant
    assert heat[1, 0, 0] == heat[1].max() and heat[1, -1, -1] == 0 and 0 < heat[1, 5, 5] < 1


def test_first_per_class_takes_the_first_images_of_each_class():
    from nin.data.datasets import first_per_class

    labels = torch.tensor([3, 0, 3, 3, 1, 0])
    assert first_per_class(labels, 2, 4).tolist() == [1, 5, 4, 0, 2]  # class 2 absent: skipped


WIDTH_PX = int(figures.TEXT_WIDTH_IN * figures.PNG_DPI)  # 2100: 7 in at 300 dpi


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved during the test, drawn, so that its text can be inspected."""
    saved = []
    save = figures.save_figure

    def keep(figure, path):
        saved.append(figure)
        return save(figure, path)

    monkeypatch.setattr(figures, "save_figure", keep)
    return saved


def _small_text(figure) -> list[tuple[str, float]]:
    from matplotlib.text import Text

    figure.canvas.draw()  # tick labels exist once drawn
    return [(t.get_text(), t.get_fontsize()) for t in figure.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < figures.FONT_PT]


@pytest.mark.parametrize("channels", [1, 3])
def test_map_figures_print_at_text_width_with_legible_text(tmp_path, channels, drawn):
    images = torch.randint(0, 256, (3, channels, 32, 32), dtype=torch.uint8)
    maps = torch.randn(3, 10, 8, 8)
    labels, predictions = torch.tensor([0, 1, 2]), torch.tensor([0, 4, 2])
    path = figures.plot_confidence_maps(images, maps, labels, predictions, CLASSES, tmp_path / "maps.png")
    assert _png_size(path)[0] == WIDTH_PX
    path = figures.plot_overlays(images, maps, predictions, CLASSES, tmp_path / "overlays.png", labels=labels)
    assert _png_size(path)[0] == WIDTH_PX
    for figure in drawn:
        assert _small_text(figure) == []
        assert figure.get_size_inches()[0] <= figures.TEXT_WIDTH_IN
    assert "no ReLU" in " ".join(t.get_text() for t in drawn[0].texts)  # signed maps say so


@pytest.mark.parametrize("names", [[str(k) for k in range(10)], CLASSES, [f"golden_retriever_{k}" for k in range(10)]])
def test_class_names_fit_between_the_title_and_the_first_row(tmp_path, drawn, names):
    """The 45° class names over the first row take the room they need: inside the figure, under the title and
    clear of it, and no more than a line of air above them (digits: a short header; long names: a taller one)."""
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    figures.plot_confidence_maps(images, torch.randn(2, 10, 7, 7), torch.tensor([0, 1]), torch.tensor([0, 1]), names,
                                 tmp_path / "maps.png")
    figure = drawn[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    title = next(t for t in figure.texts if t.get_text().startswith("Confidence maps"))
    title_bottom = title.get_window_extent(renderer).y0
    name_boxes = [t.get_window_extent(renderer) for ax in figure.axes for t in ax.texts if t.get_text() in names]
    assert len(name_boxes) == 10
    top = max(box.y1 for box in name_boxes)
    assert top < title_bottom < figure.bbox.y1
    assert title_bottom - top < figure.dpi * (figures.LINE_IN + 0.2)  # no empty band between title and names


def test_signed_maps_use_a_diverging_scale_centred_at_zero(tmp_path, drawn):
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    maps = torch.randn(1, 10, 8, 8) + 0.5
    figures.plot_confidence_maps(images, maps, torch.tensor([0]), torch.tensor([0]), CLASSES, tmp_path / "m.png")
    pictures = [image for ax in drawn[0].axes for image in ax.get_images()][1:]  # the maps, after the input
    assert {p.get_cmap().name for p in pictures} == {"RdBu_r"}
    low, high = pictures[0].get_clim()
    assert low == -high and high == pytest.approx(float(maps.abs().max()))
    rectified = figures.plot_confidence_maps(images, maps.clamp_min(0), torch.tensor([0]), torch.tensor([0]),
                                               CLASSES, tmp_path / "r.png")
    assert rectified.is_file()
    assert {i.get_cmap().name for ax in drawn[1].axes for i in ax.get_images()[:1]} >= {"viridis"}


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_vector_formats(tmp_path, fmt, magic):
    confusion = torch.diag(torch.full((10,), 90)) + 1
    path = figures.plot_confusion(confusion, CLASSES, tmp_path / f"confusion.{fmt}")
    assert path.read_bytes()[:5].startswith(magic)
    with pytest.raises(NinError, match="confusion.jpg"):
        figures.plot_confusion(confusion, CLASSES, tmp_path / "confusion.jpg")


def test_many_images_and_many_classes(tmp_path, drawn):
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    maps = torch.randn(10, 100, 8, 8)
    predictions = torch.arange(10)
    classes = [f"class_with_a_long_name_{k}" for k in range(100)]
    path = figures.plot_overlays(images, maps, predictions, classes, tmp_path / "overlays.png",
                                   names=[f"image_{i}.png" for i in range(10)])
    assert _png_size(path)[0] == WIDTH_PX
    path = figures.plot_confidence_maps(images[:2], maps[:2], torch.tensor([50, 99]), predictions[:2], classes,
                                          tmp_path / "maps.png")
    assert _png_size(path)[0] == WIDTH_PX
    titles = [ax.get_title() for ax in drawn[-1].axes if ax.get_title()]
    assert len(titles) == 2 * figures.MANY_CLASS_PANELS and titles[0].startswith("class_w")  # cut to fit
    confusion = torch.randint(0, 5, (100, 100))
    assert _png_size(figures.plot_confusion(confusion, classes, tmp_path / "confusion.png")) == (WIDTH_PX, WIDTH_PX)
    for figure in drawn:
        assert _small_text(figure) == []


def test_confusion_figure(tmp_path, drawn):
    confusion = torch.diag(torch.full((10,), 90)) + 1
    side = int(round((2.3 + 0.42 * 10) * figures.PNG_DPI))
    assert _png_size(figures.plot_confusion(confusion, CLASSES, tmp_path / "confusion.png")) == (side, side)
    assert _small_text(drawn[0]) == []
    assert "910/1000" in drawn[0].axes[0].get_title()  # 10 × (90 + 1) on the diagonal of 10 × 100


def test_photo_overlay_is_drawn_on_the_photo_at_its_resolution(tmp_path, drawn):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    maps = torch.zeros(1, 10, 8, 8)
    maps[0, 3, :, :4] = 1.0  # the left half of class 3's map is hot
    figures.plot_photo_overlays([photo], maps, torch.tensor([3]), CLASSES, tmp_path / "photo.png",
                                  probabilities=torch.tensor([0.9]), names=["wide.png"])
    ax = drawn[0].axes[0]
    shown, heat = ax.get_images()
    assert shown.get_array().shape[:2] == (200, 300)  # the photo itself, not a 32×32 copy
    assert heat.get_array().shape == (200, 200)  # the map upsampled to the centre square the model saw
    assert heat.get_extent() == [49.5, 249.5, 199.5, -0.5]
    values = np.asarray(heat.get_array())
    assert values[:, :90].mean() > 0.9 and values[:, 110:].mean() < 0.1  # hot on the left, where the map is
    assert "300×200 px" in ax.get_title() and "90%" in ax.get_title()


def test_lr_per_step_follows_the_schedule():
    from nin.engine.config import recipe
    from nin.engine.schedule import lr_at

    cfg = dataclasses.replace(recipe("fast", "mnist"), epochs=3, batch_size=20_000)  # 3 steps an epoch
    records = [{"epoch": e, "step": 3 * e, "lr": lr_at(3 * e - 1, cfg, 3)} for e in (1, 2, 3)]
    xs, ys = curves.lr_per_step(records, cfg.to_dict())
    assert xs == [s / 3 for s in range(9)] and ys == [lr_at(s, cfg, 3) for s in range(9)]
    assert max(ys) == pytest.approx(cfg.lr)
    plateau = dataclasses.replace(cfg, schedule="plateau").to_dict()
    records = [{"epoch": 1, "step": 3, "lr": 0.1}, {"epoch": 2, "step": 6, "lr": 0.01}]
    assert curves.lr_per_step(records, plateau) == ([0, 1, 1, 2], [0.1, 0.1, 0.01, 0.01])
    assert curves.lr_per_step(records, None) == ([1, 2], [0.1, 0.01])  # no config: the recorded points


def _write_run(folder, split, errors):
    folder.mkdir()
    lines = [json.dumps({"epoch": e + 1, "step": 4 * (e + 1), "lr": 0.1 / 10**e, "train_loss": 2.0 - e / 2,
                         "train_error": error + 0.05, f"{split}_loss": 2.1 - e / 2, f"{split}_error": error})
             for e, error in enumerate(errors)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "tr')  # a torn last line
    return folder


def test_curves_of_several_runs(tmp_path, drawn):
    first = _write_run(tmp_path / "a", "test", [0.5, 0.3, 0.2])
    second = _write_run(tmp_path / "b", "val", [0.6, 0.4])
    assert [r["epoch"] for r in read_metrics(first)] == [1, 2, 3]
    assert _png_size(curves.plot_curves([first, second], tmp_path / "curves.png",
                                           reference=[0.25, None]))[0] == WIDTH_PX
    assert _small_text(drawn[0]) == []
    error_axis = drawn[0].axes[1]
    assert [line.get_ydata()[0] for line in error_axis.get_lines() if line.get_linestyle() == ":"] == [25.0]
    assert all(float(t).is_integer() for t in error_axis.get_xticks())  # whole epochs


def test_map_scores_logits_are_the_ones_evaluate_counts(tiny_run):
    # through nin's inference path in bf16 the maps' mean is taken in bf16, as `model(images)` takes it: the map
    # statistic's logits are bit for bit the ones `nin evaluate` counts (an fp32 mean parts bf16 ties differently)
    from nin.inference import inference_model, predict_logits

    model, preprocessing, _ = load(tiny_run)
    served = inference_model(model, torch.bfloat16)
    images = load_dataset("mnist", "test").images[:300]
    _, logits = visualize.map_scores(served, preprocessing, images, batch_size=128, amp_dtype=torch.bfloat16)
    expected = torch.cat([predict_logits(served, batch) for batch in preprocessing(images).split(128)])
    assert torch.equal(logits, expected)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root):
    from nin.engine import recipe, train

    cfg = dataclasses.replace(recipe("fast", "mnist"), train_subset=256, eval_subset=200, epochs=2, batch_size=64)
    out = tmp_path_factory.mktemp("visualize") / "run"
    train(cfg, out, log=lambda *_: None)
    return out


def test_command_on_a_tiny_run(tiny_run, tmp_path, capsys, monkeypatch):
    odd = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 45, 4), dtype=np.uint8), "RGBA").save(odd)
    palette = tmp_path / "palette.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)).convert("P").save(palette)
    out = tmp_path / "figures"
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "200", "--per-class", "1",
                 "--images", str(odd), str(palette), "--runs", str(tiny_run), str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert "largest activation is the true class" in printed

    sizes = {name: _png_size(out / name) for name in
             ["confidence_maps.png", "overlays.png", "overlays_images.png", "curves.png", "confusion.png"]}
    assert {width for width, _ in sizes.values()} <= {WIDTH_PX, int(round((2.3 + 0.42 * 10) * 300))}
    assert main(["visualize", str(tiny_run), "--out", str(tmp_path / "pdf"), "--limit", "50", "--format", "pdf"]) == 0
    assert (tmp_path / "pdf" / "confidence_maps.pdf").read_bytes()[:4] == b"%PDF"

    stats = json.loads((out / "maps.json").read_text())
    assert {"n", "max_map_true_class", "max_map_agrees_with_gap", "gap_accuracy", "chance", "weights",
            "dataset", "precision"} <= set(stats)
    assert stats["n"] == 200 and stats["dataset"] == "mnist"
    for key in ("max_map_true_class", "max_map_agrees_with_gap", "gap_accuracy"):
        assert 0.0 <= stats[key] <= 1.0
    model, preprocessing, _ = load(tiny_run)
    test = load_dataset("mnist", "test")
    with torch.no_grad():
        predictions = model(preprocessing(test.images[:200])).argmax(dim=1)
    accuracy = float((predictions == test.labels[:200]).double().mean())
    assert stats["gap_accuracy"] == pytest.approx(accuracy, abs=0.02)  # the command may run in bf16
    assert not stats["accuracy_tta_flip"] and stats["gap_accuracy"] == stats["accuracy"]  # one pass, one count

    # a second call without --images: the folder shows that call alone (no stale overlays_images.png), and a user's
    # file stays
    (out / "notes.txt").write_text("mine")
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50", "--per-class", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["confidence_maps.png", "confusion.png", "curves.png", "maps.json",
                                                     "notes.txt", "overlays.png"]
    assert json.loads((out / "maps.json").read_text())["files"] == ["maps.json", "confusion.png",
                                                                   "confidence_maps.png", "overlays.png", "curves.png"]

    # maps.json names only what it wrote: a name it never writes, put in its list, is not removed
    report = json.loads((out / "maps.json").read_text())
    (out / "maps.json").write_text(json.dumps({**report, "files": [*report["files"], "notes.txt", "../x", "x" * 300]}))
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50", "--per-class", "1"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    # a call that fails midway (an --images file that is not there) stops before any work; one that fails after
    # the report is written still lists the earlier figures, so the next call removes them
    assert main(["visualize", str(tiny_run), "--out", str(out), "--images", str(tmp_path / "absent.png")]) == 1
    assert "--images" in capsys.readouterr().err and (out / "overlays.png").is_file()
    # a damaged photo, or a folder that is no run, is said before any figure is drawn: a new folder is not left
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(odd.read_bytes()[:60])
    for flags, named in ((["--images", str(damaged)], "damaged.png"), (["--runs", str(tmp_path)], "metrics.jsonl")):
        fresh = tmp_path / "fresh"
        assert main(["visualize", str(tiny_run), "--out", str(fresh), "--limit", "50", *flags]) == 1
        assert named in capsys.readouterr().err and not fresh.exists(), flags

    def broken(*args, **kwargs):
        raise NinError("broken")

    monkeypatch.setattr(visualize, "plot_overlays", broken)
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50", "--format", "svg"]) == 1
    assert "overlays.png" in json.loads((out / "maps.json").read_text())["files"]
    monkeypatch.undo()
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50", "--format", "svg"]) == 0
    assert not list(out.glob("*.png")) and (out / "notes.txt").is_file()


def test_images_inverted_as_nin_predict_inverts_them(data_root, tmp_path, capsys):
    """A real MNIST test digit in dark ink on grey paper: `--invert` predicts it as `nin predict --invert` does."""
    test = load_dataset("mnist", "test", data_root)
    scan = tmp_path / "scan.png"
    Image.fromarray(np.round(210 - 190 * test.images[0, 0].numpy() / 255).astype(np.uint8)).resize((90, 90)).save(scan)
    weights = str(Path(__file__).resolve().parents[1] / "weights" / "fast-mnist.safetensors")
    assert main(["predict", weights, str(scan), "--invert", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["predictions"][0]["top"][0]
    assert expected["class"] == str(int(test.labels[0]))
    for flags, right in (([], False), (["--invert"], True)):
        assert main(["visualize", weights, "--data-dir", str(data_root), "--out", str(tmp_path / f"f{len(flags)}"),
                     "--limit", "20", "--images", str(scan), *flags]) == 0
        captured = capsys.readouterr()
        line = next(x for x in captured.out.splitlines() if x.startswith(f"{scan}: "))
        assert (line == f"{scan}: {expected['class']} ({expected['probability']:.1%})") == right, line
        # without --invert, the hint `nin predict` gives: dark on light, score it with --invert
        assert (f"nin visualize: {scan} looks dark on a light background" in captured.err) == (not right)


def test_invert_without_images_is_an_error(tmp_path, capsys):
    assert main(["visualize", "fast-mnist", "--out", str(tmp_path / "out"), "--invert"]) == 1
    assert "--invert applies to --images" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["visualize", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 1
    assert "error" in capsys.readouterr().err


def test_two_calls_into_one_folder_take_turns(tiny_run, tmp_path, capsys):
    """A second `nin visualize` into a folder another one is writing is refused in one line naming the holder,
    before any work; the folder is left as it was (a new one removed again)."""
    import os

    from nin.files import folder_lock

    out = tmp_path / "figures"
    out.mkdir()
    with folder_lock(out):  # as another process holds it (flock: per open file, so this process conflicts too)
        assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50"]) == 1
        err = capsys.readouterr().err
        assert f"another nin process (PID {os.getpid()}) is writing figures into this folder" in err
        assert err.count("\n") == 1 and list(out.iterdir()) == []
    assert main(["visualize", str(tiny_run), "--out", str(out), "--limit", "50"]) == 0  # free again
    fresh = tmp_path / "new" / "figures"
    assert main(["visualize", str(tiny_run), "--out", str(fresh), "--data-dir", str(tmp_path / "no-data")]) == 1
    assert "no-data" in capsys.readouterr().err and not fresh.exists()  # failed inside the held folder: removed
