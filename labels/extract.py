"""Regenerates imagenet1k.txt and imagenet21k.txt: one class name per line, in class-index order.

The facts come from timm's data files (Apache-2.0; MIXER.md §4): the 1000 ILSVRC-2012 WordNet ids
and Google's 21843 ImageNet-21k ids, both sorted, each mapped to its WordNet lemma.

    pip download --no-deps timm -d /tmp/timm
    python labels/extract.py /tmp/timm/timm-*.whl
"""

import os
import sys
import zipfile

INFO = "timm/data/_info/"
OUTPUTS = {"imagenet1k.txt": "imagenet_synsets.txt",
           "imagenet21k.txt": "imagenet21k_goog_synsets.txt"}


def main(wheel):
    with zipfile.ZipFile(wheel) as z:
        read = lambda name: z.read(INFO + name).decode("utf-8").splitlines()  # noqa: E731
        lemma = dict(line.split("\t", 1) for line in read("imagenet_synset_to_lemma.txt"))
        for out, synsets in OUTPUTS.items():
            wnids = read(synsets)
            # the head's class index is the position in the sorted id list (MIXER.md §4)
            assert wnids == sorted(wnids) and len(set(wnids)) == len(wnids), synsets
            with open(os.path.join(os.path.dirname(__file__), out), "w", encoding="utf-8") as f:
                f.write("".join(lemma[w].strip() + "\n" for w in wnids))
            print(f"{out}: {len(wnids)} labels")


if __name__ == "__main__":
    main(sys.argv[1])
