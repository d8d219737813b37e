"""The download and the `--variant` cache against hostile servers, caches and environments:
every case ends in one MixerError line (exit 2 from the command line, 128 + N for a signal),
in bounded time, with nothing partial left in the cache.

Servers are local (127.0.0.1) and misbehave on purpose; the download's limits are given tiny
values so that a stall, a trickle or a deadline costs a fraction of a second.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mixer
from conftest import REPO
from test_download import image, server  # noqa: F401 -- fixtures
from test_download import (S32, Server, assert_one_line_error, checkpoint_bytes, mixer_env,
                           run_mixer, top1)

S32_FILE = "/gsam/Mixer-S_32.npz"


@pytest.fixture
def home(monkeypatch, tmp_path):
    """An in-process cache in a fresh folder, and no proxy between us and the local servers."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MIXER_HOME", str(folder))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv("MIXER_DOWNLOAD_TIMEOUT", raising=False)
    return folder


def offline(monkeypatch):
    """MIXER_WEIGHTS_URL where nothing listens: any download attempt fails at once."""
    closed = Server()
    closed.close()
    monkeypatch.setenv("MIXER_WEIGHTS_URL", closed.url)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# The cache is checked: a file at the cache path answers for the variant only if it is it.

def cached_file(path, config, source=None):
    """A model file of `config` (zero weights: only the architecture and metadata matter)."""
    params = {name: np.zeros(shape, np.float32)
              for name, shape in mixer.param_shapes(config).items()}
    mixer.Mixer(config, params, backend="numpy").save(path, source=source)


TINY = mixer.MixerConfig(patch_size=8, hidden_dim=8, num_blocks=1, tokens_mlp_dim=4,
                         channels_mlp_dim=8, num_classes=1000)
S32_10 = mixer.MixerConfig(**{**S32.to_dict(), "num_classes": 10})
S32_HEADLESS = mixer.MixerConfig(**{**S32.to_dict(), "num_classes": None})

CACHED = {  # what sits at gsam-Mixer-S_32.safetensors -> what the refusal says it holds
    "a tiny model": (TINY, "gsam/Mixer-S_32.npz", "holds a custom Mixer"),
    "another head": (S32_10, "gsam/Mixer-S_32.npz", "holds Mixer-S/32 with 10 classes"),
    "no head": (S32_HEADLESS, None, "holds Mixer-S/32 without a head"),
    "another release": (S32, "sam/Mixer-B_16.npz",
                        "holds Mixer-S/32 with 1000 classes converted from 'sam/Mixer-B_16.npz'"),
}


@pytest.mark.parametrize("what", sorted(CACHED))
def test_cached_file_that_is_not_the_variant_is_refused(home, monkeypatch, what):
    config, source, says = CACHED[what]
    offline(monkeypatch)
    path = home / "gsam-Mixer-S_32.safetensors"
    cached_file(path, config, source)
    before = path.read_bytes()
    with pytest.raises(mixer.MixerError) as error:
        mixer.pretrained("S/32", backend="numpy")
    message = one_line(error)
    assert message.startswith(f"{path} {says}")
    assert "not Mixer-S/32 with 1000 classes from gsam/Mixer-S_32.npz" in message
    assert "delete it" in message
    assert path.read_bytes() == before  # refused, not replaced


@pytest.mark.parametrize("source", [None, "gsam/Mixer-S_32.npz", "Mixer-S_32.npz"],
                         ids=["no source", "the release path", "converted from elsewhere"])
def test_cached_file_of_the_variant_is_used_offline(home, monkeypatch, source):
    """What the offline hint suggests (convert a copy into the cache) must be accepted."""
    offline(monkeypatch)
    cached_file(home / "gsam-Mixer-S_32.safetensors", S32, source)
    assert mixer.pretrained("S/32", backend="numpy").config == S32


def test_imagenet21k_files_must_have_the_21k_head():
    expected = mixer._expected_config("B/16", "imagenet21k/Mixer-B_16.npz")
    assert expected == mixer.MixerConfig(**{**mixer.VARIANTS["B/16"].to_dict(),
                                            "num_classes": 21843})
    assert mixer._expected_config("B/16", "sam/Mixer-B_16.npz").num_classes == 1000


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_cache_path_that_is_not_a_file_is_refused_at_once(home, monkeypatch, kind):
    offline(monkeypatch)
    home.mkdir()
    path = home / "gsam-Mixer-S_32.safetensors"
    path.mkdir() if kind == "folder" else os.mkfifo(path)  # a FIFO would block a read
    with pytest.raises(mixer.MixerError, match="is not a regular file: delete it") as error:
        mixer.pretrained("S/32", backend="numpy")
    one_line(error)


def test_cli_refuses_a_wrong_cached_file(image, tmp_path):
    home = tmp_path / "cache"
    home.mkdir()
    cached_file(home / "gsam-Mixer-S_32.safetensors", TINY, "gsam/Mixer-S_32.npz")
    result = run_mixer([image, "--variant", "S/32"], "http://127.0.0.1:9/", home)
    assert_one_line_error(result)
    assert "holds a custom Mixer" in result.stderr


# --------------------------------------------------------------------------------------------
# MIXER_WEIGHTS_URL and MIXER_DOWNLOAD_TIMEOUT: empty means unset; nonsense is one line.

def test_empty_weights_url_means_the_official_server(monkeypatch):
    monkeypatch.setenv("MIXER_WEIGHTS_URL", "")
    assert mixer.weights_url() == mixer.WEIGHTS_URL


@pytest.mark.parametrize("url", ["ftp://example.com/", "weights/", "/srv/mirror", "http://",
                                 "http://127.0.0.1:99999/", "http://[::1/", "http://a b/",
                                 "http://host/\x1b[2J", "javascript:alert(1)"])
def test_weights_url_that_is_not_a_download_url(capsys, monkeypatch, tmp_path, url):
    monkeypatch.setenv("MIXER_WEIGHTS_URL", url)
    monkeypatch.setenv("MIXER_HOME", str(tmp_path))
    assert mixer.main(["unused.jpg", "--variant", "S/32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixer: error: MIXER_WEIGHTS_URL=") and err.count("\n") == 1, err
    assert "http://, https:// or file://" in err and "\x1b" not in err
    assert listing(tmp_path) == []
    with pytest.raises(mixer.MixerError, match="expected an http://, https:// or file:// URL"):
        mixer.download(url, str(tmp_path / "x"))  # the function refuses them too


@pytest.mark.parametrize("value, seconds", [("", mixer.DOWNLOAD_DEADLINE), ("2.5", 2.5),
                                            ("600", 600.0), ("0", None), ("-1", None),
                                            ("inf", None), ("nan", None), ("1h", None)])
def test_download_timeout_variable(monkeypatch, value, seconds):
    monkeypatch.setenv("MIXER_DOWNLOAD_TIMEOUT", value)
    if seconds is None:
        with pytest.raises(mixer.MixerError, match="expected a number of seconds above 0"):
            mixer.download_deadline()
    else:
        assert mixer.download_deadline() == seconds


# --------------------------------------------------------------------------------------------
# Limits: a stall, a trickle and a slow-but-steady transfer all end, in about the time asked.

def headers(handler, length=None, status="200 OK", extra=""):
    handler.wfile.write(f"HTTP/1.0 {status}\r\n".encode())
    if length is not None:
        handler.wfile.write(f"Content-Length: {length}\r\n".encode())
    handler.wfile.write(f"{extra}\r\n".encode())
    handler.wfile.flush()


def stall(handler, server):
    """Headers and 10 bytes of a 1000-byte file, then nothing."""
    headers(handler, 1000)
    handler.wfile.write(b"x" * 10)
    handler.wfile.flush()
    server.stop.wait(30)


def trickle(handler, server):
    """One byte every 20 ms: never a stall, never enough."""
    headers(handler, 10**6)
    while not server.stop.wait(0.02):
        handler.wfile.write(b"x")
        handler.wfile.flush()


def steady(handler, server):
    """16 KiB every 20 ms (800 KiB/s) of a 100 MB file: fast enough, but too long."""
    headers(handler, 10**8)
    while not server.stop.wait(0.02):
        handler.wfile.write(b"x" * 16384)


# how the server misbehaves -> download() limits, its error, the most seconds it may take: ~1 s
# with the limits, x10 for a loaded CI machine; without them each would take 60 s to for ever
LIMITS = {
    "stall": (stall, dict(timeout=0.3, attempts=2), "no data for 0.3 s (tried 2 times)", 12),
    "trickle": (trickle, dict(timeout=5, min_rate=(1000, 0.3), attempts=2),
                "less than 1000 B arrived in 0.3 s (tried 2 times)", 12),
    "steady but too long": (steady, dict(deadline=0.5), "not complete after 0.5 s", 10),
    "stall past the deadline": (stall, dict(timeout=10, deadline=0.5),
                                "not complete after 0.5 s", 9),
}


@pytest.mark.parametrize("how", sorted(LIMITS))
def test_download_limits(server, home, tmp_path, how):
    behaviour, limits, message, most = LIMITS[how]
    server.custom["/f"] = behaviour
    target = tmp_path / "f.npz"
    start = time.monotonic()
    with pytest.raises(mixer.MixerError) as error:
        mixer.download(server.url + "f", str(target), **limits)
    took = time.monotonic() - start
    assert message in one_line(error)
    assert took < most, took
    assert listing(tmp_path) == []  # nothing partial


def test_download_timeout_variable_limits_the_command_line(server, image, tmp_path):
    server.custom[S32_FILE] = stall  # would wait DOWNLOAD_STALL (30 s) per attempt
    home = tmp_path / "cache"
    start = time.monotonic()
    result = run_mixer([image, "--variant", "S/32"], server.url, home,
                       MIXER_DOWNLOAD_TIMEOUT="1")
    assert time.monotonic() - start < 30  # unbounded: 3 attempts of a 30 s stall
    assert_one_line_error(result)
    assert "not complete after 1 s, the limit for a download" in result.stderr
    assert listing(home) == []


# --------------------------------------------------------------------------------------------
# Servers that send something else than asked.

def more_than_announced(handler, server):
    headers(handler, 1000)
    handler.wfile.write(b"a" * 1000 + b"b" * 5000)


def test_bytes_beyond_content_length_are_not_kept(server, home, tmp_path):
    server.custom["/f"] = more_than_announced
    mixer.download(server.url + "f", str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == b"a" * 1000


def endless(handler, server):
    """No Content-Length: 64 KiB pieces until the client hangs up."""
    headers(handler)
    while not server.stop.is_set():
        handler.wfile.write(b"x" * 65536)


def test_endless_body_stops_at_max_size(server, home, tmp_path):
    server.custom["/f"] = endless
    with pytest.raises(mixer.MixerError, match="more than 1000000 bytes received") as error:
        mixer.download(server.url + "f", str(tmp_path / "f"), max_size=10**6)
    one_line(error)
    assert listing(tmp_path) == []


def html_page(handler, server):
    page = b"<html><body>Quota exceeded</body></html>"
    headers(handler, len(page), extra="Content-Type: text/html\r\n")
    handler.wfile.write(page)


def empty(handler, server):
    headers(handler, 0)


def huge(handler, server):
    headers(handler, 10**15)
    handler.wfile.write(b"PK\x03\x04")
    server.stop.wait(30)


def redirect_loop(handler, server):
    headers(handler, 0, status="302 Found", extra=f"Location: {server.url}gsam/Mixer-S_32.npz\r\n")


def escapes(handler, server):
    headers(handler, 0, status="404 \x1b[2JGone\x07")


HOSTILE = {  # server behaviour -> what pretrained's one-line error says
    "an HTML page": (html_page, "not an .npz archive"),
    "an empty body": (empty, "not an .npz archive"),
    "an absurd size": (huge, "the server announces 1000000000000000 bytes, more than the"),
    "a redirect loop": (redirect_loop, "HTTP 302"),
    "escape sequences in the reason": (escapes, "HTTP 404 \\x1b[2JGone\\x07"),
}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_hostile_server(server, home, monkeypatch, how):
    behaviour, says = HOSTILE[how]
    server.custom[S32_FILE] = behaviour
    monkeypatch.setenv("MIXER_WEIGHTS_URL", server.url)
    start = time.monotonic()
    with pytest.raises(mixer.MixerError) as error:
        mixer.pretrained("S/32", backend="numpy")
    assert says in one_line(error)
    assert time.monotonic() - start < 20
    assert listing(home) == []


# --------------------------------------------------------------------------------------------
# Caches that cannot be written.

def test_cache_folder_that_is_a_file(home, monkeypatch):
    offline(monkeypatch)
    home.write_text("not a folder")
    with pytest.raises(mixer.MixerError, match=r"cannot write to the weights cache .*\(set "
                                               r"MIXER_HOME to a writable folder\)") as error:
        mixer.pretrained("S/32", backend="numpy")
    one_line(error)
    assert home.read_text() == "not a folder"


def test_cache_folder_not_writable(home, monkeypatch):
    """A real read-only folder; as root, whom permissions do not bind, the refusal is simulated."""
    offline(monkeypatch)
    home.mkdir()
    home.chmod(0o500)
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(mixer.os, "mkdir", refuse)
    try:
        with pytest.raises(mixer.MixerError, match="cannot write to the weights cache"):
            mixer.pretrained("S/32", backend="numpy")
    finally:
        home.chmod(0o700)


# --------------------------------------------------------------------------------------------
# The offline hint names commands that exist where mixer.py runs.

@pytest.mark.parametrize("where", ["checkout", "installed", "lone copy"])
def test_offline_hint_fits_the_installation(home, monkeypatch, tmp_path, where):
    offline(monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.chdir(REPO)
    if where == "installed":  # pip puts the mixer-convert command on PATH
        (bin_dir / "mixer-convert").write_text("#!/bin/sh\n")
        (bin_dir / "mixer-convert").chmod(0o755)
    if where == "lone copy":
        monkeypatch.setattr(mixer, "__file__", str(tmp_path / "alone" / "mixer.py"))
    with pytest.raises(mixer.MixerError) as error:
        mixer.pretrained("B/16", backend="numpy")
    message = one_line(error)
    assert "pass it as --weights Mixer-B_16.npz" in message
    convert = f"Mixer-B_16.npz {home / 'gsam-Mixer-B_16.safetensors'}"
    if where == "checkout":
        assert f"python convert.py {convert}" in message
    elif where == "installed":
        assert f"mixer-convert {convert}" in message and "python" not in message
    else:
        assert "convert" not in message  # nothing to convert with: --weights only


# --------------------------------------------------------------------------------------------
# Signals and concurrency: nothing partial, ever, and killed downloads are reclaimable.

@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                         (signal.SIGKILL, -9)], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_signal_during_download(server, image, tmp_path, sig, status):
    server.custom[S32_FILE] = stall
    home = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "mixer.py"), image,
                                "--variant", "S/32"], env=mixer_env(server.url, home),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not server.requests and time.monotonic() < deadline:  # the transfer has begun
            time.sleep(0.02)
        time.sleep(0.1)
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == status, err
    if sig == signal.SIGKILL:
        # Left behind, but named so that atomic_write's clean-up reclaims it once the pid is gone
        left = listing(home)
        scratch = rf"\.tmp-mixer-[^-]+-{process.pid}-[0-9a-f]{{8}}-download"
        assert len(left) == 1 and re.fullmatch(scratch, left[0]), left
    else:
        assert err.splitlines()[-1] == ("mixer: stopped by SIGTERM" if sig == signal.SIGTERM
                                        else "mixer: interrupted")
        assert "Traceback" not in err
        assert listing(home) == []


def test_two_processes_download_the_same_variant(server, image, tmp_path):
    """Both overlap (the server holds each response until both asked) and both end with the one
    valid cache file; neither reads the other's half-written one."""
    data = checkpoint_bytes()
    both = threading.Barrier(2, timeout=20)

    def serve_when_both_asked(handler, server):
        both.wait()
        headers(handler, len(data))
        handler.wfile.write(data)

    server.custom[S32_FILE] = serve_when_both_asked
    home = tmp_path / "cache"
    args = [sys.executable, os.path.join(REPO, "mixer.py"), image, "--variant", "S/32", "--json"]
    processes = [subprocess.Popen(args, env=mixer_env(server.url, home), cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [subprocess.CompletedProcess(args, 0, *p.communicate(timeout=120))
               for p in processes]
    for process, result in zip(processes, results):
        result.returncode = process.returncode
        assert top1(result)["label"] == "tench, Tinca tinca"
    assert len(server.requests) == 2
    assert listing(home) == ["gsam-Mixer-S_32.safetensors"]
    assert mixer.load(home / "gsam-Mixer-S_32.safetensors", backend="numpy").config == S32


def test_scratch_folder_is_named_for_the_stale_clean_up(home, monkeypatch):
    """.tmp-mixer-<host>-<pid>-<random>-download, beside the cache; gone after a failed
    download."""
    seen = []

    def fake_download(url, path, **kwargs):
        seen.append(os.path.basename(os.path.dirname(path)))
        raise mixer.MixerError("offline")

    monkeypatch.setenv("MIXER_WEIGHTS_URL", "http://127.0.0.1:9/")
    monkeypatch.setattr(mixer, "download", fake_download)
    with pytest.raises(mixer.MixerError, match="offline"):
        mixer.pretrained("S/32", backend="numpy")
    assert re.fullmatch(rf"\.tmp-mixer-[^-]+-{os.getpid()}-[0-9a-f]{{8}}-download", seen[0]), seen
    assert listing(home) == []
