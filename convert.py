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

An OUT ending in .onnx exports IN (an .npz or any of our safetensors files) to ONNX instead, for
onnxruntime, TensorRT or tinygrad's ONNX runner (export_onnx; needs the onnx package).
"""

import argparse
import dataclasses
import json
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

import numpy as np  # noqa: E402
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


# --------------------------------------------------------------------------------------------
# ONNX export: the same forward as mixer.forward, as an ONNX graph built with the onnx package's
# helpers. Opset 17 is the first with LayerNormalization and what onnxruntime-web, TensorRT 8.6+
# and tinygrad's OnnxRunner load; from opset 20 GELU is the native Gelu(approximate="tanh").

ONNX_OPSET = 17
GELU_OPSET = 20
ONNX_DTYPES = ("float32", "float16")


def export_onnx(weights: str, output: str, dtype: str = "float32", opset: int = ONNX_OPSET,
                head: bool = True, labels: str | None = "auto") -> mixer.Mixer:
    """Writes the model in `weights` (an official .npz or any mixer safetensors file, quantised
    ones included) to `output` as ONNX, atomically; returns the model (numpy backend).

    The graph takes float32 images (batch, H, W, 3) in [-1, 1], as Mixer.__call__ does, with a
    named dynamic batch dimension "batch", and gives "logits" (batch, num_classes) and
    "pre_logits" (batch, hidden_dim); a model without a head, or head=False, gives pre_logits
    only. metadata_props carry mixer.config, mixer.preprocessing and mixer.labels as our
    safetensors files do. dtype "float16" holds the weights and computes in half, LayerNorm and
    the token mean in float32; inputs and outputs stay float32. Quantised weights stay packed
    (uint8) and are dequantised in the graph (Cast, Mul, Add per group), exactly as mixer does.
    labels: see convert (None or "auto" keep the file's names, or look them up for an .npz).
    """
    try:
        import onnx
    except ImportError:
        raise mixer.MixerError("the ONNX export needs the onnx package: pip install onnx") from None
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not ONNX_OPSET <= opset <= newest:
        raise mixer.MixerError(f"opset must be an integer from {ONNX_OPSET} (LayerNormalization) "
                               f"to {newest} (this onnx package's newest), got {opset!r}")
    if dtype not in ONNX_DTYPES:
        raise mixer.MixerError(f"an ONNX export computes in {' or '.join(ONNX_DTYPES)}, not "
                               f"{dtype!r}; an int8/int4 .safetensors file exports quantised")
    check_output(weights, output)
    model = mixer.load(weights, backend="numpy")
    if model.quantization and dtype != "float32":
        raise mixer.MixerError(f"{weights} holds int{model.quantization['bits']} weights, which "
                               f"are computed in float32: drop --dtype {dtype}")
    if labels not in (None, "auto"):
        model.labels = mixer.find_labels(labels, model.config.num_classes)
    head = head and model.config.num_classes is not None
    graph = _OnnxGraph(onnx, model.params, dtype, opset)
    proto = graph.model(model.config, head, _onnx_metadata(model, head, dtype))
    try:
        data = proto.SerializeToString()
    except ValueError as e:  # protobuf's 2 GiB limit: beyond what any released Mixer needs
        raise mixer.MixerError(f"{weights}: too large for one ONNX file ({e})") from None
    with mixer.atomic_write(output) as f:
        f.write(data)
    return model


def _onnx_metadata(model: mixer.Mixer, head: bool, dtype: str) -> dict[str, str]:
    """What a deployed model needs to name its classes and prepare its inputs, under the keys
    of our safetensors files."""
    config = model.config if head else dataclasses.replace(model.config, num_classes=None)
    metadata = {"format": "mixer", "mixer.format_version": mixer.FORMAT_VERSION,
                "mixer.config": json.dumps(config.to_dict()),
                "mixer.preprocessing": json.dumps(model.preprocessing), "mixer.dtype": dtype}
    if head and model.labels is not None:
        metadata["mixer.labels"] = json.dumps(model.labels)
    if model.quantization:
        metadata["mixer.quantization"] = json.dumps(model.quantization)
    return metadata


class _OnnxGraph:
    """Builds the ONNX graph of a Mixer from its numpy-backend params, node by node; every
    method returns the name of the value it made."""

    def __init__(self, onnx, params: dict, dtype: str, opset: int):
        self.onnx, self.params, self.opset = onnx, params, opset
        self.half = dtype == "float16"
        self.quantized = any(isinstance(v, dict) for v in params.values())
        self.nodes, self.initializers, self.numbers = [], [], set()

    def add(self, op: str, *inputs: str, out: str | None = None, **attributes) -> str:
        """A node op(inputs) with its attributes; out names its output (else a fresh name)."""
        out = out or f"{op}_{len(self.nodes)}"
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attributes))
        return out

    def const(self, name: str, value) -> str:
        """An initialiser holding the array value as it is (its dtype kept)."""
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def number(self, value: float) -> str:
        """A scalar of the compute type, shared by every node that uses it."""
        name = f"const_{value!r}"
        if name not in self.numbers:
            self.numbers.add(name)
            self.const(name, np.array(value, np.float16 if self.half else np.float32))
        return name

    def cast(self, x: str, half: bool) -> str:
        """x cast to float16 (half) or float32."""
        to = self.onnx.TensorProto.FLOAT16 if half else self.onnx.TensorProto.FLOAT
        return self.add("Cast", x, to=to)

    def reshape(self, x: str, shape) -> str:
        """x reshaped to the constant shape (-1: the batch)."""
        shape = self.const(f"shape_{len(self.nodes)}", np.array(shape, np.int64))
        return self.add("Reshape", x, shape)

    def weight(self, name: str) -> str:
        """params[name] in the compute type: float16 initialisers in half; a quantised model's
        float16-kept kernels (the head) as float16 cast up; its packed kernels dequantised."""
        w = self.params[name]
        if isinstance(w, dict):
            return self.dequantized(name, w)
        if name == "stem/kernel":  # HWIO as the (P*P*3, C) matrix of the flattened patches
            w = w.reshape(-1, w.shape[-1])
        if self.half or (self.quantized and name.endswith("kernel")):  # kept in float16
            value = self.const(name, w.astype(np.float16))
            return value if self.half else self.cast(value, half=False)
        return self.const(name, w)

    def dequantized(self, name: str, w: dict) -> str:
        """A quantised kernel as a float32 (in, out) matrix: q * scale + bias per group, from
        the packed bytes (int4: two to a byte, the even element in the low nibble, split with
        float arithmetic, exact for integers below 256, as opset 17 has no BitwiseAnd)."""
        packed = np.ascontiguousarray(w["packed"]).view(np.uint8)
        rows, gs = packed.shape[0], w["group_size"]
        cols = packed.shape[1] * 8 // w["bits"]
        q = self.cast(self.const(name, packed), half=False)
        if w["bits"] == 4:
            high = self.add("Floor", self.add("Mul", q, self.number(1 / 16)))
            low = self.add("Sub", q, self.add("Mul", high, self.number(16.0)))
            q = self.add("Concat", self.reshape(low, (rows, cols // 2, 1)),
                         self.reshape(high, (rows, cols // 2, 1)), axis=2)
        q = self.reshape(q, (rows, cols // gs, gs))
        scales, biases = (self.cast(self.const(name + suffix, w[key].astype(np.float16)[..., None]),
                                    half=False)
                          for key, suffix in (("scales", ".scales"), ("biases", ".biases")))
        m = self.reshape(self.add("Add", self.add("Mul", q, scales), biases), (rows, cols))
        return self.add("Transpose", m, perm=[1, 0]) if w["layout"] == "out_in" else m

    def dense(self, x: str, prefix: str, out: str | None = None) -> str:
        """x @ kernel + bias, the Dense layer named prefix."""
        return self.add("Add", self.add("MatMul", x, self.weight(prefix + "kernel")),
                        self.weight(prefix + "bias"), out=out)

    def gelu(self, x: str) -> str:
        """tanh GELU (flax nn.gelu's default): the op itself from opset 20, else the formula as
        (0.5 x) (1 + tanh((sqrt(2/pi) x) (1 + 0.044715 x x))), the arrangement that onnxruntime
        fuses back into one FastGelu kernel (it does not recognise x + 0.044715 x^3)."""
        if self.opset >= GELU_OPSET:
            return self.add("Gelu", x, approximate="tanh")
        one = self.number(1.0)
        inner = self.add("Add", self.add("Mul", self.add("Mul", x, self.number(0.044715)), x), one)
        t = self.add("Tanh", self.add("Mul", self.add("Mul", x, self.number(mixer.GELU_C)), inner))
        return self.add("Mul", self.add("Mul", x, self.number(0.5)), self.add("Add", t, one))

    def mlp(self, x: str, prefix: str) -> str:
        """MlpBlock: Dense_1(gelu(Dense_0(x))) over the last axis."""
        return self.dense(self.gelu(self.dense(x, prefix + "Dense_0/")), prefix + "Dense_1/")

    def layer_norm(self, x: str, prefix: str, half_out: bool = True) -> str:
        """LayerNormalization over the channels, eps 1e-6, in float32 whatever the compute type
        (scale and bias float32 too); the result in half when computing in half."""
        x = self.cast(x, half=False) if self.half else x
        scale, bias = (self.const(prefix + k, self.params[prefix + k]) for k in ("scale", "bias"))
        y = self.add("LayerNormalization", x, scale, bias, axis=-1, epsilon=mixer.LN_EPS)
        return self.cast(y, half=True) if self.half and half_out else y

    def block(self, x: str, prefix: str) -> str:
        """x: (B, S, C): token mixing across S, then channel mixing across C (mixer_block)."""
        y = self.add("Transpose", self.layer_norm(x, prefix + "LayerNorm_0/"), perm=[0, 2, 1])
        y = self.add("Transpose", self.mlp(y, prefix + "token_mixing/"), perm=[0, 2, 1])
        x = self.add("Add", x, y)
        return self.add("Add", x, self.mlp(self.layer_norm(x, prefix + "LayerNorm_1/"),
                                           prefix + "channel_mixing/"))

    def model(self, config: mixer.MixerConfig, head: bool, metadata: dict[str, str]):
        """The ModelProto: images -> logits and pre_logits (or pre_logits alone)."""
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        size, p, s = config.image_size, config.patch_size, config.num_tokens
        x = self.cast("images", half=True) if self.half else "images"
        # stem: P x P patches, each flattened (row in patch, column in patch, rgb), row-major
        # over the patch grid, times the flattened HWIO kernel
        x = self.reshape(x, (-1, size // p, p, size // p, p, 3))
        x = self.reshape(self.add("Transpose", x, perm=[0, 1, 3, 2, 4, 5]), (-1, s, p * p * 3))
        x = self.dense(x, "stem/")  # (B, S, C)
        for i in range(config.num_blocks):
            x = self.block(x, f"MixerBlock_{i}/")
        x = self.layer_norm(x, "pre_head_layer_norm/", half_out=False)  # float32
        axes = {"axes": [1]} if self.opset < 18 else {}  # an input from opset 18
        inputs = [x] + ([self.const("token_axis", np.array([1], np.int64))] if not axes else [])
        features = self.add("ReduceMean", *inputs, keepdims=0, out="pre_logits", **axes)
        outputs = [helper.make_tensor_value_info("pre_logits", tp.FLOAT,
                                                 ["batch", config.hidden_dim])]
        if head:  # in half: the head's result cast back to float32
            y = self.dense(self.cast(features, half=True) if self.half else features, "head/",
                           out=None if self.half else "logits")
            if self.half:
                self.add("Cast", y, to=tp.FLOAT, out="logits")
            outputs.insert(0, helper.make_tensor_value_info("logits", tp.FLOAT,
                                                            ["batch", config.num_classes]))
        images = helper.make_tensor_value_info("images", tp.FLOAT, ["batch", size, size, 3])
        graph = helper.make_graph(self.nodes, "mixer", [images], outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        # the oldest IR version that holds the opset: what older runtimes accept
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="mlp-mixer-edge",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        helper.set_model_props(proto, metadata)
        return proto


def build_parser() -> argparse.ArgumentParser:
    parser = mixer.ArgumentParser(
        prog="convert", description="Convert an official MLP-Mixer .npz checkpoint to "
                                    "mixer.py's .safetensors (config, labels and source included), "
                                    "or any Mixer to ONNX (OUT ending in .onnx).",
        epilog="OUT is written atomically. An existing regular file is replaced (another user's "
               "too, when the folder is writable); a symbolic link is replaced by the file, its "
               "target left untouched; OUT that is IN (or a link to it), a folder, a device, a "
               "FIFO or a socket is refused.")
    parser.add_argument("npz", metavar="IN", help="an official checkpoint, e.g. Mixer-B_16.npz "
                                                  "(for .onnx: also a mixer .safetensors file)")
    parser.add_argument("output", metavar="OUT", help="OUT.safetensors, or OUT.onnx for ONNX")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8", "int4"],
                        default="float32",
                        help="storage type of the weights (computation stays float32); int8 and "
                             "int4 quantise the kernels group-wise (MLX's affine format); for "
                             ".onnx float32 or float16, the type computed in")
    parser.add_argument("--opset", type=int, metavar="N",
                        help=f"for .onnx: the ONNX opset (default {ONNX_OPSET}; from "
                             f"{GELU_OPSET} GELU is the Gelu op)")
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
    options = dict(vars(args))
    opset = options.pop("opset")
    if args.output.lower().endswith(".onnx"):
        if args.group_size is not None:
            raise mixer.MixerError("--group-size goes with --dtype int8 or int4 and a .safetensors "
                                   "output; an int8/int4 .safetensors file exports quantised")
        opset = ONNX_OPSET if opset is None else opset
        model = export_onnx(args.npz, args.output, args.dtype, opset, args.head, args.labels)
        q = model.quantization
        dtype = f"ONNX opset {opset}, {args.dtype}" + (
            f" with int{q['bits']} weights in groups of {q['group_size']}" if q else "")
    elif opset is not None:
        raise mixer.MixerError("--opset goes with an ONNX output (OUT ending in .onnx)")
    else:
        model = convert(**options)
        dtype = args.dtype
        if dtype in mixer.QUANTIZED_DTYPES:
            dtype += f" in groups of {args.group_size or mixer.DEFAULT_GROUP_SIZE}"
    config = model.config
    name = f"Mixer-{config.variant}" if config.variant else f"custom Mixer {config.to_dict()}"
    classes = f"{config.num_classes} classes" if config.num_classes and args.head else "no head"
    names = "with label names" if model.labels and args.head else "no label names"
    size = os.path.getsize(args.output) / 2**20
    print(f"{args.output}: {name}, {config.image_size}px, {classes}, {names}, {dtype}, "
          f"{size:.1f} MiB", flush=True)
    if model.labels is None and args.labels == "auto" and config.num_classes in \
            mixer.LABEL_SETS.values():
        print(f"convert: note: label files not found in {' or '.join(mixer.labels_dirs())}; "
              f"the output reports class indices", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
