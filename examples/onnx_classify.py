"""Classifies an image with an exported Mixer and onnxruntime alone: no mixer.py, no framework.

    python convert.py Mixer-B_16.npz mixer-b16.onnx          # once, where mixer.py is
    python examples/onnx_classify.py mixer-b16.onnx examples/chelsea.jpg

Needs Pillow, numpy and onnxruntime. The model's metadata names its classes and says how its
images were prepared: the shorter side to int(size / crop_pct) with bicubic resampling, the
centre size x size, then x / 127.5 - 1 (or, for "squash", the whole image to size x size).
"""

import json
import sys

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

model_path, image_path = sys.argv[1:3]
session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size = json.loads(meta["mixer.config"])["image_size"]
prep = json.loads(meta["mixer.preprocessing"])
labels = json.loads(meta.get("mixer.labels", "null"))

image = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
w, h = image.size
if prep["resize"] == "crop":
    short = int(size / prep["crop_pct"])
    new = (short, max(short, round(h * short / w))) if w <= h else \
        (max(short, round(w * short / h)), short)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    image = image.resize(new, Image.BICUBIC).crop((left, top, left + size, top + size))
else:
    image = image.resize((size, size), Image.BICUBIC)
x = np.asarray(image, np.float32)[None] / 127.5 - 1  # (1, size, size, 3) in [-1, 1]

logits = session.run(["logits"], {"images": x})[0][0].astype(np.float64)
probs = np.exp(logits - logits.max())
probs /= probs.sum()
for i in np.argsort(-probs)[:5]:
    print(f"{probs[i]:.4f}  {labels[i] if labels else i}")
