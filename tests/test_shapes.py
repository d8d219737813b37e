"""examples/shapes.py: the generated dataset that the quantisation fidelity figures use."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(HERE, "examples", "shapes.py")
sys.path.insert(0, os.path.join(HERE, "examples"))
import shapes  # noqa: E402
from test_train_hardening import snapshot  # noqa: E402


def test_layout_and_determinism(tmp_path):
    assert shapes.write(str(tmp_path / "a"), 2, 1, 32, seed=3) == 30
    shapes.write(str(tmp_path / "b"), 2, 1, 32, seed=3)
    shapes.write(str(tmp_path / "c"), 2, 1, 32, seed=4)
    a = snapshot(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a" / "train")) == sorted(shapes.CLASSES)
    assert len(a) == 30 and a == snapshot(tmp_path / "b") and a != snapshot(tmp_path / "c")
    img = Image.open(tmp_path / "a" / "val" / "ring" / "00000.png")
    assert img.size == (32, 32) and img.mode == "RGB"


def test_classes_differ_in_pixels(tmp_path):
    # every class draws something: the pictures of one seed and index differ between classes
    shapes.write(str(tmp_path), 1, 1, 48, seed=0)
    pixels = [np.asarray(Image.open(tmp_path / "train" / c / "00000.png")) for c in shapes.CLASSES]
    assert all(not np.array_equal(pixels[i], pixels[j])
               for i in range(len(pixels)) for j in range(i))


@pytest.mark.parametrize("args, message", [
    (["--train", "0"], "--train must be a positive int"),
    (["--size", "8"], "--size must be between 16 and 4096"),
    (["--seed", "-1"], "--seed must be >= 0"),
])
def test_bad_arguments(tmp_path, args, message):
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "out"), *args],
                          capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    done = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "not an empty folder" in done.stderr
    assert os.listdir(tmp_path) == ["mine.txt"]
