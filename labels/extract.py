"""Regenerates imagenet1k.txt and imagenet21k.txt: one class name per line, in class-index order;
and imagenet1k_wnids.txt: the 1000 WordNet ids in the same order (train.py --eval-only matches
ImageNet-style folders, one per id, to a 1000-class head through it).

The facts come from timm's data files (Apache-2.0, in the timm wheel under timm/data/_info/):
the 1000 ILSVRC-2012 WordNet ids and Google's 21843 ImageNet-21k ids, both sorted (a head's
class index is the position in the sorted id list), each mapped to its WordNet lemma.

    pip download --no-deps timm -d /tmp/timm
    python labels/extract.py /tmp/timm/timm-*.whl
"""

import argparse
import os
import sys
import zipfile

INFO = "timm/data/_info/"
OUTPUTS = {"imagenet1k.txt": "imagenet_synsets.txt",
           "imagenet21k.txt": "imagenet21k_goog_synsets.txt"}
WNIDS = {"imagenet1k_wnids.txt": "imagenet_synsets.txt"}  # the ids themselves, not their lemmas


def extract(wheel: str, folder: str) -> dict[str, int]:
    """Writes the label files into folder; returns {file name: number of labels}."""
    written = {}
    with zipfile.ZipFile(wheel) as z:
        read = lambda name: z.read(INFO + name).decode("utf-8").splitlines()  # noqa: E731
        lemma = dict(line.split("\t", 1) for line in read("imagenet_synset_to_lemma.txt"))
        for out, synsets in {**OUTPUTS, **WNIDS}.items():
            wnids = read(synsets)
            if wnids != sorted(wnids) or len(set(wnids)) != len(wnids):
                raise ValueError(f"{synsets} is not a sorted list of distinct WordNet ids")
            names = wnids if out in WNIDS else [lemma[w].strip() for w in wnids]
            with open(os.path.join(folder, out), "w", encoding="utf-8") as f:
                f.write("".join(name + "\n" for name in names))
            written[out] = len(wnids)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="extract", description="Write labels/imagenet1k.txt, labels/imagenet21k.txt and "
                                    "labels/imagenet1k_wnids.txt from the label data inside a "
                                    "timm wheel.")
    parser.add_argument("wheel", metavar="TIMM_WHEEL", help="a timm-*.whl (pip download --no-deps "
                                                            "timm)")
    args = parser.parse_args(argv)
    try:
        written = extract(args.wheel, os.path.dirname(os.path.abspath(__file__)))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
        print(f"extract: error: {args.wheel}: {e}", file=sys.stderr)
        return 2
    for out, n in written.items():
        print(f"{out}: {n} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
