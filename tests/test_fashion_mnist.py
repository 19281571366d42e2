"""benchmarks/fashion_mnist.py: Debian's Fashion-MNIST files as an image folder quickstart reads (one sub-folder per
class name, 28x28 grayscale PNG files, the draw fixed by the seed); without the package, one line naming it."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image


def _script():
    spec = importlib.util.spec_from_file_location("fashion_mnist", Path(ROOT) / "benchmarks" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FM = _script()


def test_classes_parse_as_ranges_and_lists():
    assert FM.parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert FM.parse_classes("5,7, 9") == [5, 7, 9] and FM.parse_classes("0-2,8,1") == [0, 1, 2, 8]
    for bad, needle in (("3-12", "outside the classes 0-9"), ("a", "not an index"), ("4-2", "outside")):
        with pytest.raises(ValueError, match=needle):
            FM.parse_classes(bad)


def test_without_the_package_it_says_how_to_install_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        FM.main(["--out", str(tmp_path / "out"), "--root", str(tmp_path / "absent")])
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_anything_else_is_refused_not_replaced(tmp_path):
    """The draw replaces --out as a whole: only an earlier draw's folder (class folders of PNG files) may be there;
    a user's files are refused in one line, before the package is read, and kept."""
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        FM.main(["--out", str(tmp_path / "data"), "--root", str(tmp_path / "absent")])
    assert str(e.value).startswith(f"error: --out '{tmp_path / 'data'}' holds 'raw', which this writer does not")
    assert (tmp_path / "data" / "raw" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not (FM.ROOT / FM.FILES[0][0]).is_file(),
                    reason=f"Debian's dataset-fashion-mnist is not installed ({FM.ROOT}): apt-get install "
                           f"dataset-fashion-mnist")
@pytest.mark.slow
def test_a_draw_is_an_image_folder_of_the_classes_asked(tmp_path, capsys):
    assert FM.main(["--classes", "1,3", "--per-class", "4", "--seed", "5", "--out", str(tmp_path / "a")]) == 0
    assert "2 classes (trouser, dress), 4 photos each" in capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert folders == ["dress", "trouser"]
    files = sorted((tmp_path / "a" / "dress").iterdir())
    assert len(files) == 4 and all(f.suffix == ".png" for f in files)
    with Image.open(files[0]) as im:
        assert im.size == (28, 28) and im.mode == "L"
        pixels = np.asarray(im)
    images, labels = FM.load()
    assert len(images) == 70000 and labels[int(files[0].stem)] == 3  # the file names the photo it holds
    assert np.array_equal(images[int(files[0].stem)], pixels)
    FM.main(["--classes", "1,3", "--per-class", "4", "--seed", "5", "--out", str(tmp_path / "b")])
    FM.main(["--classes", "1,3", "--per-class", "4", "--seed", "6", "--out", str(tmp_path / "c")])
    names = lambda d: sorted(f.name for f in (tmp_path / d / "dress").iterdir())  # noqa: E731
    assert names("a") == names("b") and names("a") != names("c")  # the seed decides the draw
