"""`python mixer.py IMAGE --variant ...`: download, check, convert, cache, classify, against a
local HTTP server (MIXER_WEIGHTS_URL) with a cache in a temporary folder (MIXER_HOME).

Resume design under test: mixer.download retries a dropped transfer itself (DOWNLOAD_ATTEMPTS in
all), asking for the missing bytes with a Range header, or starting again when the server
ignores it. Nothing partial survives an invocation: after any failure the cache folder holds no
file at all (the raw .npz only ever lives in a private temporary folder).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import mixer
from conftest import REPO
from reference import random_params

S32 = mixer.VARIANTS["S/32"]


@functools.lru_cache(maxsize=None)
def checkpoint_bytes(config=S32, favourite=0) -> bytes:
    """An official-format .npz whose head all but certainly picks class `favourite`."""
    params = random_params(config, seed=0)
    params["head/kernel"] *= 0.01
    params["head/bias"][:] = 0.0
    params["head/bias"][favourite] = 30.0
    buffer = io.BytesIO()
    np.savez(buffer, **params)
    return buffer.getvalue()


class Server:
    """A local weights server. `files` maps URL paths to bytes; `drop_after` makes the first
    `drops` responses stop after that many body bytes; `ranges` says whether Range is honoured.
    `custom` maps URL paths to functions(handler, server) that write a whole response of their
    own (a misbehaving server); they should wait on `stop`, set when the server closes."""

    def __init__(self):
        self.files, self.requests, self.custom = {}, [], {}
        self.drop_after, self.drops, self.ranges, self.status = None, 0, True, 200
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path in server.custom:
                    try:
                        server.custom[self.path](self, server)
                    except OSError:  # the client gave up on a misbehaving response
                        pass
                    return
                data = server.files.get(self.path)
                if data is None or server.status != 200:
                    self.send_error(404 if data is None else server.status)
                    return
                start = 0
                range_ = self.headers.get("Range", "")
                if server.ranges and range_.startswith("bytes=") and range_.endswith("-"):
                    start = int(range_[len("bytes="):-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drops > 0:  # send part of the body, then close the connection
                    server.drops -= 1
                    body = body[:server.drop_after]
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "img.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return str(path)


def mixer_env(url, home, **more) -> dict[str, str]:
    # MIXER_LABELS_URL too: nothing may be fetched from the internet
    return {**os.environ, "MIXER_WEIGHTS_URL": url, "MIXER_LABELS_URL": url,
            "MIXER_HOME": str(home), "MIXER_BACKEND": "numpy", "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1", **more}


def run_mixer(args, url, home, script=os.path.join(REPO, "mixer.py"), cwd=REPO, **env):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=mixer_env(url, home, **env), cwd=cwd, timeout=120)


def assert_one_line_error(result):
    """Exit 2, nothing on stdout, and one error line on stderr (after the "downloading" line,
    when the download had started)."""
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("mixer: error: "), result.stderr
    assert all(line.startswith("mixer: downloading ") for line in lines[:-1]), result.stderr


def top1(result) -> dict:
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # progress and notes went to stderr: stdout is pure JSON
    return doc[0]["top_k"][0]


# --------------------------------------------------------------------------------------------

def test_download_convert_cache_classify(server, image, tmp_path):
    server.files["/gsam/Mixer-S_32.npz"] = checkpoint_bytes()
    home = tmp_path / "cache"
    first = run_mixer([image, "--variant", "S/32", "--json"], server.url, home)
    best = top1(first)
    assert best["index"] == 0 and best["label"] == "tench, Tinca tinca"
    assert best["probability"] > 0.99
    assert server.requests == [("/gsam/Mixer-S_32.npz", None)]
    assert "downloading gsam/Mixer-S_32.npz (72.9 MiB)" in first.stderr
    assert os.listdir(home) == ["gsam-Mixer-S_32.safetensors"]  # no .npz, no temporary file

    cached = mixer.load(home / "gsam-Mixer-S_32.safetensors", backend="numpy")
    assert cached.config == S32 and cached.labels[0] == "tench, Tinca tinca"
    assert mixer.read_safetensors(home / "gsam-Mixer-S_32.safetensors")[1]["mixer.source"] == \
        "gsam/Mixer-S_32.npz"

    second = run_mixer([image, "--variant", "S/32"], server.url, home)  # human-readable output
    assert second.returncode == 0, second.stderr
    assert len(server.requests) == 1  # the cache answered: no request
    assert second.stderr == ""
    assert second.stdout.splitlines()[1].endswith("tench, Tinca tinca")


def test_variant_quantised_at_load_time(server, image, tmp_path):
    """--variant with --quantize: the download is converted and cached in float32 as always,
    then quantised as it is read; the answer is the float model's, to int8's rounding."""
    server.files["/gsam/Mixer-S_32.npz"] = checkpoint_bytes(favourite=3)
    home = tmp_path / "cache"
    quantised = run_mixer([image, "--variant", "S/32", "--quantize", "int8", "--json"],
                          server.url, home)
    float32 = run_mixer([image, "--variant", "S/32", "--json"], server.url, home)
    assert len(server.requests) == 1 and os.listdir(home) == ["gsam-Mixer-S_32.safetensors"]
    assert mixer.read_safetensors(home / "gsam-Mixer-S_32.safetensors")[0][
        "stem/kernel"].dtype == np.float32  # the cache is the float file
    q, f = top1(quantised), top1(float32)
    assert q["index"] == f["index"] == 3 and q["label"] == f["label"]
    # the runner-up probabilities (~1e-13 here) differ by the rounding, so int8 really ran
    q, f = (json.loads(r.stdout)[0]["top_k"] for r in (quantised, float32))
    assert [e["index"] for e in q[:1]] == [e["index"] for e in f[:1]]
    assert q != f and all(a["probability"] == pytest.approx(b["probability"], rel=0.2, abs=1e-3)
                          for a, b in zip(q, f) if a["index"] == b["index"])


def test_source_and_variant_choices_are_explained(tmp_path, capsys):
    image = "unused.jpg"
    for argv, message in [
            (["--variant", "L/32"], "no official weights were released for Mixer-L/32"),
            (["--variant", "H/14"], "B/16: gsam, sam, imagenet1k, imagenet21k"),
            (["--variant", "S/32", "--source", "sam"], "use source 'gsam' (--source)"),
            (["--variant", "S/32", "--weights", "x.safetensors"], "not both"),
            (["--source", "gsam"], "use it with --variant"),
            ([], "--variant")]:
        assert mixer.main([image, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_default_sources():
    assert mixer.official_checkpoint("B/16") == "gsam/Mixer-B_16.npz"
    assert mixer.official_checkpoint("L/16") == "imagenet1k/Mixer-L_16.npz"
    assert mixer.official_checkpoint("B/16", "imagenet21k") == "imagenet21k/Mixer-B_16.npz"
    assert set(mixer.OFFICIAL_CHECKPOINTS) == set(mixer.VARIANTS) - {"L/32", "H/14"}


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXER_HOME", str(tmp_path / "home"))
    assert mixer.cache_path("sam/Mixer-B_16.npz") == \
        str(tmp_path / "home" / "sam-Mixer-B_16.safetensors")
    monkeypatch.delenv("MIXER_HOME")
    monkeypatch.setattr(mixer, "__file__", str(tmp_path / "alone" / "mixer.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):  # no weights/ beside this copy: the user's cache
        assert mixer.cache_dir() == str(tmp_path / "xdg" / "mlp-mixer")
    (tmp_path / "alone" / "weights").mkdir(parents=True)
    assert mixer.cache_dir() == str(tmp_path / "alone" / "weights")


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_dropped_connection_resumes(server, image, tmp_path, ranges):
    data = checkpoint_bytes()
    server.files["/gsam/Mixer-S_32.npz"] = data
    server.drop_after, server.drops, server.ranges = 1_000_000, 1, ranges
    home = tmp_path / "cache"
    result = run_mixer([image, "--variant", "S/32", "--json"], server.url, home)
    assert top1(result)["label"] == "tench, Tinca tinca"
    # with Range: the second request asks for the rest only; without: the whole file again
    assert server.requests == [("/gsam/Mixer-S_32.npz", None),
                               ("/gsam/Mixer-S_32.npz", "bytes=1000000-")]
    assert os.listdir(home) == ["gsam-Mixer-S_32.safetensors"]
    assert mixer.load(home / "gsam-Mixer-S_32.safetensors", backend="numpy").config == S32


def _break(server, how):
    data = checkpoint_bytes()
    if how == "drops every time":
        server.files["/gsam/Mixer-S_32.npz"] = data
        server.drop_after, server.drops = 1000, 99
        return "connection closed after 3000 of"
    if how == "404":
        return "HTTP 404"
    if how == "500":
        server.files["/gsam/Mixer-S_32.npz"] = data
        server.status = 500
        return "HTTP 500"
    if how == "garbage":
        server.files["/gsam/Mixer-S_32.npz"] = np.random.default_rng(0).bytes(5000)
        return "not an .npz archive"
    if how == "truncated npz":
        server.files["/gsam/Mixer-S_32.npz"] = data[:len(data) // 3]
        return "truncated or corrupt"
    if how == "another variant":  # a perfectly good checkpoint, but not S/32
        server.files["/gsam/Mixer-S_32.npz"] = checkpoint_bytes(
            mixer.MixerConfig(patch_size=8, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                              channels_mlp_dim=8, num_classes=1000))
        return "holds a custom Mixer"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["drops every time", "404", "500", "garbage", "truncated npz",
                                 "another variant"])
def test_failed_download_leaves_nothing(server, image, tmp_path, how):
    message = _break(server, how)
    home = tmp_path / "cache"
    result = run_mixer([image, "--variant", "S/32"], server.url, home)
    assert_one_line_error(result)
    assert message in result.stderr
    assert not home.exists() or os.listdir(home) == []  # no final, partial or temporary file
    retried = how in ("drops every time", "500")
    assert len(server.requests) == (mixer.DOWNLOAD_ATTEMPTS if retried else 1)
    if how == "drops every time":  # each retry asked only for what was missing
        assert [r for _, r in server.requests] == [None, "bytes=1000-", "bytes=2000-"]


def test_no_network_says_how_to_convert_locally(image, tmp_path):
    server = Server()
    url = server.url
    server.close()  # nothing listens there any more: connection refused, like being offline
    home = tmp_path / "cache"
    # a PATH without an installed `mixer-convert`: the hint names the script beside mixer.py
    result = run_mixer([image, "--variant", "B/16"], url, home, PATH=os.defpath)
    assert_one_line_error(result)
    assert "--weights Mixer-B_16.npz" in result.stderr
    assert f"python convert.py Mixer-B_16.npz {home / 'gsam-Mixer-B_16.safetensors'}" in \
        result.stderr
    assert not home.exists() or os.listdir(home) == []


LEMMAS = "/ilsvrc2012_wordnet_lemmas.txt"


def lemmas(n=1000) -> bytes:
    """A label list as the official one is written: WordNet lemmas, underscores for spaces."""
    return "".join(f"name_{i}, Latin_name_{i}\n" for i in range(n)).encode()


def stall_after_headers(handler, server):
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    server.stop.wait(30)


def run_lone_copy(server, tmp_path, **env):
    """mixer.py copied alone into a folder (no convert.py, no labels/), run on an image with
    --variant S/32 against `server`; an installed copy of the labels (sys.prefix/share/
    mlp-mixer) would be found, so the folders looked in are only the copy's own."""
    alone = tmp_path / "project"
    alone.mkdir(exist_ok=True)
    shutil.copy(os.path.join(REPO, "mixer.py"), alone)
    server.files["/gsam/Mixer-S_32.npz"] = checkpoint_bytes()
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    code = ("import sys, mixer; mixer.labels_dirs = lambda: [sys.argv[1]]; "
            "sys.exit(mixer.main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", code, str(alone / "labels"), str(image),
                             "--variant", "S/32", "--top-k", "1"], capture_output=True,
                            text=True, env=mixer_env(server.url, tmp_path / "cache", **env),
                            cwd=alone, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(alone)) == ["mixer.py"]
    return result


def test_lone_copy_fetches_the_label_names(server, tmp_path):
    """A lone copy fetches the official names from MIXER_LABELS_URL with the weights, shows them
    with spaces for the underscores, keeps them in the cache and in the converted file, and
    needs the server no more."""
    server.files[LEMMAS] = lemmas()
    result = run_lone_copy(server, tmp_path)
    assert result.stdout.splitlines()[1].endswith("%  name 0, Latin name 0")
    assert "label files not found" not in result.stderr
    cache = tmp_path / "cache"
    assert (cache / "imagenet1k.txt").read_text().splitlines()[999] == "name 999, Latin name 999"
    assert sorted(os.listdir(cache)) == ["gsam-Mixer-S_32.safetensors", "imagenet1k.txt"]
    model = mixer.load(cache / "gsam-Mixer-S_32.safetensors", backend="numpy")
    assert model.labels[:2] == ["name 0, Latin name 0", "name 1, Latin name 1"]
    server.files.clear()
    again = run_lone_copy(server, tmp_path)
    assert again.stdout == result.stdout and again.stderr == ""
    assert [path for path, _ in server.requests] == ["/gsam/Mixer-S_32.npz", LEMMAS]


BAD_LABELS = {  # what the server does with the label list -> what the cache holds
    "a wrong line count": lambda server: server.files.update({LEMMAS: lemmas(999)}),
    "binary junk": lambda server: server.files.update({LEMMAS: bytes(range(256)) * 40}),
    "a control character": lambda server: server.files.update(
        {LEMMAS: lemmas().replace(b"name_5,", b"\x1b[2J,")}),
    "a huge file": lambda server: server.files.update({LEMMAS: b"x" * 300 * 1000 + b"\n"}),
    "a stall": lambda server: server.custom.update({LEMMAS: stall_after_headers}),
    "no such file": lambda server: None,
}


@pytest.mark.parametrize("how", sorted(BAD_LABELS))
def test_lone_copy_without_usable_label_names(server, tmp_path, how):
    """A label list that is not the official one, or none (a 404, a stall that the deadline
    ends), is refused: the lone copy prints class indices, says why in one note, and caches
    the weights only."""
    BAD_LABELS[how](server)
    start = time.monotonic()
    result = run_lone_copy(server, tmp_path, MIXER_DOWNLOAD_TIMEOUT="2")
    assert time.monotonic() - start < 60
    assert result.stdout.splitlines()[1].endswith("class 0")
    notes = [line for line in result.stderr.splitlines() if "label files not found" in line]
    assert len(notes) == 1, result.stderr
    assert os.listdir(tmp_path / "cache") == ["gsam-Mixer-S_32.safetensors"]


def test_lone_copy_offline_reports_indices(server, tmp_path):
    """No server for the labels at all (offline): the weights from a mirror, class indices."""
    result = run_lone_copy(server, tmp_path, MIXER_LABELS_URL="http://127.0.0.1:9/")
    assert result.stdout.splitlines()[1].endswith("class 0")
    assert sum("label files not found" in line for line in result.stderr.splitlines()) == 1


def test_imagenet21k_names_on_the_command_line(tmp_path, image):
    """A 21843-class checkpoint converted with --labels auto prints ImageNet-21k names."""
    config = mixer.MixerConfig(patch_size=8, hidden_dim=4, num_blocks=1, tokens_mlp_dim=4,
                               channels_mlp_dim=4, num_classes=21843, image_size=16)
    npz = tmp_path / "Mixer-21k.npz"
    npz.write_bytes(checkpoint_bytes(config, favourite=1))
    out = tmp_path / "21k.safetensors"
    done = subprocess.run([sys.executable, os.path.join(REPO, "convert.py"), str(npz), str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = run_mixer([image, "--weights", str(out), "--json"], "http://unused/", tmp_path)
    assert top1(result) == {**top1(result), "index": 1, "label": "benthos"}


def test_download_from_a_local_mirror(tmp_path):
    """MIXER_WEIGHTS_URL may be a file:// folder laid out like the release: an offline mirror."""
    source = tmp_path / "mirror" / "gsam" / "Mixer-S_32.npz"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"0123456789" * 1000)
    seen = []
    mixer.download(source.as_uri(), str(tmp_path / "copy.npz"),
                   progress=lambda done, total: seen.append((done, total)))
    assert (tmp_path / "copy.npz").read_bytes() == source.read_bytes()
    assert seen[0] == (0, 10_000) and seen[-1] == (10_000, 10_000)
    assert sorted(os.listdir(tmp_path)) == ["copy.npz", "mirror"]


class Clock:
    """A stand-in for time.monotonic that the test moves forward."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_bar_draws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream, clock = Terminal(), Clock()
    bar = mixer._Progress(stream, name="gsam/Mixer-S_32.npz", clock=clock)
    # (seconds since the start, MiB done) of 4 MiB; a call within 0.1 s of a frame is not
    # drawn, except the last one
    for seconds, mib in [(0, 0), (0.05, 0.5), (2, 1), (2.05, 1.5), (2.1, 4)]:
        clock.now = 100.0 + seconds
        bar(int(mib * 2**20), 4 * 2**20)
    bar.close()
    frames = stream.getvalue().split("\r")[1:]
    assert frames == [  # a shorter frame blanks the end of the longer one before it
        "gsam/Mixer-S_32.npz [" + "." * 30 + "] 0.0/4.0 MiB",
        "gsam/Mixer-S_32.npz [" + "#" * 7 + "." * 23 + "] 1.0/4.0 MiB, 512 KiB/s, 6 s left",
        "gsam/Mixer-S_32.npz [" + "#" * 30 + "] 4.0/4.0 MiB, 1.9 MiB/s" + " " * 10 + "\n"]


def test_progress_in_a_log_is_a_line_every_interval():
    """Not a terminal: one line at the start, then at most one per interval with the amount,
    the rate since the start and the time left, so that a slow download is seen to be alive."""
    stream, clock = io.StringIO(), Clock()
    bar = mixer._Progress(stream, name="gsam/Mixer-S_32.npz", interval=30, clock=clock)
    for seconds, kib in [(0, 0), (10, 100), (32, 1024), (40, 1200), (61, 1300), (64, 2048),
                         (3600, 2048)]:
        clock.now = 100.0 + seconds
        bar(kib * 1024, 4 * 2**20)
    bar.close()
    assert stream.getvalue().splitlines() == [
        "mixer: downloading gsam/Mixer-S_32.npz (4.0 MiB)",
        "mixer: downloading gsam/Mixer-S_32.npz: 1.0/4.0 MiB, 32 KiB/s, 2 min left",
        "mixer: downloading gsam/Mixer-S_32.npz: 2.0/4.0 MiB, 32 KiB/s, 64 s left",
        "mixer: downloading gsam/Mixer-S_32.npz: 2.0/4.0 MiB, 583 B/s, 60 min left"]
