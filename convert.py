"""Converts an official MLP-Mixer checkpoint (.npz) to mixer.py's safetensors format.

The released files are at https://storage.googleapis.com/mixer_models/<dir>/<file> (see
mixer.OFFICIAL_CHECKPOINTS). The architecture is read off the arrays and every key and shape is
checked, so any released file converts without naming its variant. The output's metadata
carries the config, the label names and the source file, so the .safetensors is all that
`mixer.load` or `python mixer.py IMAGE --weights OUT` needs.

    python convert.py Mixer-B_16.npz weights/gsam-Mixer-B_16.safetensors
    python convert.py Mixer-L_16.npz weights/L_16-features.safetensors --no-head --dtype bfloat16

OUT is written atomically (a temporary file beside it, renamed into place when complete), so an
error or a signal leaves OUT as it was and no temporary file. What OUT may already be:
  - a regular file: replaced, also when another user owns it, as long as its folder is writable
    (replacing needs write access to the folder, not to the file, as for `mv`);
  - a symbolic link: the link itself is replaced by the new file and whatever it pointed to is
    left untouched (writing through the link would change a file elsewhere, perhaps a
    checkpoint that other links share);
  - IN itself (the same path, or a link or hard link to it), a folder, a device, a FIFO or a
    socket: refused, nothing is read or written.

The conversion itself is mixer.load_npz, so that a lone copy of mixer.py can do it too (that is
how `python mixer.py IMAGE --variant B/16` converts its download).
"""

import argparse
import os
import stat
import sys

if __name__ == "__main__":
    def _interrupted_while_starting(kind, value, tb, report=sys.excepthook):
        """Ctrl-C while numpy and mixer are imported (before run_main's handling begins): one
        line and status 130, as at any later moment."""
        if issubclass(kind, KeyboardInterrupt):
            print("convert: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        report(kind, value, tb)
    sys.excepthook = _interrupted_while_starting

import mixer  # noqa: E402 -- after the start-up handler above


def convert(npz: str, output: str, dtype: str = "float32", head: bool = True,
            labels: str | None = "auto", group_size: int | None = None) -> mixer.Mixer:
    """Reads npz, checks it, writes output atomically (never a partial file); returns the model.

    labels: "auto" (ImageNet names for 1000 or 21843 classes), "imagenet1k", "imagenet21k", a
    text file with one name per line, or "none". head=False drops the classifier. An output
    that is the input, a folder or not a regular file is refused (see the module's docstring).
    dtype "int8" or "int4" quantises the kernels in groups of group_size (default
    mixer.DEFAULT_GROUP_SIZE; see Mixer.save).
    """
    group_size = mixer.DEFAULT_GROUP_SIZE if group_size is None else group_size
    if dtype in mixer.QUANTIZED_DTYPES:  # before reading the checkpoint: fail at once
        mixer.check_quantization(dtype, group_size)
    elif group_size != mixer.DEFAULT_GROUP_SIZE:
        raise mixer.MixerError(f"--group-size goes with --dtype int8 or int4, not {dtype}")
    check_output(npz, output)
    model = mixer.load_npz(npz, backend="numpy", labels=labels, head=head)
    model.save(output, dtype=dtype, source=_source(npz), group_size=group_size)
    return model


def check_output(npz: str, output: str) -> None:
    """Refuses an output that must not be replaced: the input itself (by any name), a folder,
    or something that is not a regular file. A symbolic link is fine: the link is replaced."""
    try:
        info = os.lstat(output)
    except FileNotFoundError:
        return
    except OSError as e:  # e.g. a path through a file, or a folder we may not look into
        raise mixer.MixerError(f"cannot write {output}: {e.strerror or e}") from None
    try:
        same = os.path.exists(output) and os.path.samefile(npz, output)
    except OSError:  # npz is missing or unreadable: reading it will say so
        same = False
    if same:
        raise mixer.MixerError(f"{output} is the input {npz} itself (or a link to it); give "
                               f"another output file name")
    if stat.S_ISLNK(info.st_mode) or stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        raise mixer.MixerError(f"{output} is a folder; give a file name for the output, such as "
                               f"{os.path.join(output, 'model.safetensors')}")
    kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "not a regular file")
    raise mixer.MixerError(f"{output} is {kind}, not a regular file; refusing to replace it: "
                           f"give a file name for the output")


def _source(npz: str) -> str:
    """What the metadata records as the source: "gsam/Mixer-B_16.npz" when the file sits in a
    folder named like the release's folders, else just the file name."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(npz)))
    released = {path.split("/")[0] for s in mixer.OFFICIAL_CHECKPOINTS.values()
                for path in s.values()}
    name = os.path.basename(npz)
    return f"{folder}/{name}" if folder in released else name


def build_parser() -> argparse.ArgumentParser:
    parser = mixer.ArgumentParser(
        prog="convert", description="Convert an official MLP-Mixer .npz checkpoint to "
                                    "mixer.py's .safetensors (config, labels and source included).",
        epilog="OUT is written atomically. An existing regular file is replaced (another user's "
               "too, when the folder is writable); a symbolic link is replaced by the file, its "
               "target left untouched; OUT that is IN (or a link to it), a folder, a device, a "
               "FIFO or a socket is refused.")
    parser.add_argument("npz", metavar="IN.npz", help="an official checkpoint, e.g. Mixer-B_16.npz")
    parser.add_argument("output", metavar="OUT.safetensors")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8", "int4"],
                        default="float32",
                        help="storage type of the weights (computation stays float32); int8 and "
                             "int4 quantise the kernels group-wise (MLX's affine format)")
    parser.add_argument("--group-size", type=int, metavar="N",
                        help=f"with --dtype int8/int4: elements per scale and bias, one of "
                             f"{', '.join(map(str, mixer.GROUP_SIZES))} (default "
                             f"{mixer.DEFAULT_GROUP_SIZE})")
    parser.add_argument("--no-head", dest="head", action="store_false",
                        help="drop the classifier: a feature extractor (pre-logits)")
    parser.add_argument("--labels", default="auto", metavar="auto|imagenet1k|imagenet21k|FILE|none",
                        help="class names to store: auto = ImageNet-1k names for 1000 classes, "
                             "ImageNet-21k for 21843 (default)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return mixer.run_main("convert", lambda: _run(args))


def _run(args) -> int:
    model = convert(**vars(args))
    config = model.config
    name = f"Mixer-{config.variant}" if config.variant else f"custom Mixer {config.to_dict()}"
    classes = f"{config.num_classes} classes" if config.num_classes else "no head"
    names = "with label names" if model.labels else "no label names"
    size = os.path.getsize(args.output) / 2**20
    dtype = args.dtype
    if dtype in mixer.QUANTIZED_DTYPES:
        dtype += f" in groups of {args.group_size or mixer.DEFAULT_GROUP_SIZE}"
    print(f"{args.output}: {name}, {config.image_size}px, {classes}, {names}, {dtype}, "
          f"{size:.1f} MiB", flush=True)
    if model.labels is None and args.labels == "auto" and config.num_classes in \
            mixer.LABEL_SETS.values():
        print(f"convert: note: label files not found in {' or '.join(mixer.labels_dirs())}; "
              f"the output reports class indices", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
