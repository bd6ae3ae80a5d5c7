"""Encoder weights by name, URL or Hub repository (docs/training.md, encoder weights): fetched into PyTorch's hub cache
from a loopback HTTP server the tests start and stop, refused when truncated or when their hash
does not match, and the offline message (address, cache path) before any run folder exists.
``hf:`` runs against a prepared ``huggingface_hub`` cache in offline mode."""

from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_fixtures import make_voc
from dssn.cli import main
from dssn.models import sources
from dssn.models.sources import WeightsSourceError, resolve_weights
from dssn.models.vit import build_dinov3, load_encoder_weights
from shared_reference import reference_or_skip

TINY_DINOV3 = ["model.backbone=dinov3_tiny", "data.crop_size=32", "eval.crop_size=32", "data.num_workers=0",
               "train.iters=1", "train.batch_size=1", "train.batch_size_unlabeled=1", "train.progress=false",
               "train.report=false", "diag.panels=0", "train.precision=fp32", "train.threads=1"]


class _Server:
    """A loopback HTTP server over ``root``; counts requests; ``lie_about_length`` announces more
    bytes than it sends (a dropped connection)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.lie_about_length = False
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def send_header(self, keyword: str, value: str) -> None:
                if keyword == "Content-Length" and server.lie_about_length:
                    value = str(int(value) + 1000)
                super().send_header(keyword, value)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    root = tmp_path / "served"
    root.mkdir()
    running = _Server(root)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """A temporary $TORCH_HOME: its hub/checkpoints is where downloads must land."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


def _weights(folder: Path, stem: str = "dinov3_tiny_pretrain") -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DINOv3 file named ``<stem>-<first 8 hex of its SHA-256>.pth``, as released files are."""
    torch.manual_seed(0)
    state = build_dinov3("tiny").state_dict()
    plain = folder / "tmp.pth"
    torch.save(state, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()[:8]
    path = plain.rename(folder / f"{stem}-{digest}.pth")
    return path, state


def _voc(tmp_path: Path) -> list[str]:
    """Overrides pointing a PASCAL preset at a tiny generated VOC folder and its splits."""
    root = make_voc(tmp_path / "VOC2012")
    splits = tmp_path / "splits"
    assert main(["splits", "pascal", str(root), "--labeled", "2", "--out", str(splits)]) == 0
    return [f"data.root={root}", f"data.labeled_split={splits}/labeled.txt",
            f"data.unlabeled_split={splits}/unlabeled.txt", f"data.val_split={splits}/val.txt"]


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def test_first_use_downloads_second_reads_the_cache(server: _Server, hub_cache: Path, caplog) -> None:
    path, state = _weights(server.root)
    url = f"{server.url}/{path.name}"
    first = resolve_weights(url, progress=False)
    assert first == hub_cache / path.name and first.read_bytes() == path.read_bytes()
    assert server.requests == [f"/{path.name}"]
    assert _leftovers(hub_cache) == [path.name]  # no temporary file left beside it
    second = resolve_weights(url, progress=False)
    assert second == first and len(server.requests) == 1  # the cache, without a request
    encoder = build_dinov3("tiny")
    assert load_encoder_weights(encoder, url).ok
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in state.items())


def test_a_truncated_download_is_refused_and_not_kept(server: _Server, hub_cache: Path) -> None:
    path, _ = _weights(server.root)
    server.lie_about_length = True
    with pytest.raises(WeightsSourceError, match="ended after .* bytes; nothing was kept"):
        resolve_weights(f"{server.url}/{path.name}", progress=False)
    assert _leftovers(hub_cache) == []


def test_a_hash_mismatch_is_refused_and_not_kept(server: _Server, hub_cache: Path) -> None:
    path, _ = _weights(server.root)
    wrong = path.rename(path.with_name("dinov3_tiny_pretrain-00000000.pth"))
    with pytest.raises(WeightsSourceError, match="does not start with 00000000"):
        resolve_weights(f"{server.url}/{wrong.name}", progress=False)
    assert _leftovers(hub_cache) == []


def test_file_urls_are_copied_into_the_cache(tmp_path: Path, hub_cache: Path) -> None:
    path, _ = _weights(tmp_path)
    cached = resolve_weights(path.as_uri(), progress=False)
    assert cached == hub_cache / path.name and cached.read_bytes() == path.read_bytes()


def test_a_server_that_is_down_gives_the_offline_message(hub_cache: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/dinov3_tiny_pretrain-0123abcd.pth"
    with pytest.raises(WeightsSourceError) as err:
        resolve_weights(url, progress=False)
    assert url in str(err.value) and str(hub_cache / "dinov3_tiny_pretrain-0123abcd.pth") in str(err.value)


def test_dinov3_names_say_where_their_weights_are() -> None:
    with pytest.raises(WeightsSourceError, match="hf:facebook/dinov3-vitb16-pretrain-lvd1689m"):
        resolve_weights("dinov3_vitb16")


def test_a_name_offline_stops_training_before_a_run_folder(tmp_path: Path, hub_cache: Path, monkeypatch,
                                                          capsys) -> None:
    """``model.pretrained=dinov2_vits14`` with no network (its address made unreachable here)."""
    url = f"http://127.0.0.1:{_closed_port()}/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
    monkeypatch.setitem(sources.PUBLIC_WEIGHTS, "dinov2_vits14", url)
    run_dir = tmp_path / "run"
    assert main(["train", "pascal-dinov2", *_voc(tmp_path), f"run_dir={run_dir}",
                 "model.pretrained=dinov2_vits14", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert url in err and str(hub_cache / "dinov2_vits14_pretrain.pth") in err and "Traceback" not in err
    assert not run_dir.exists()


def test_a_url_trains_through_the_config(server: _Server, tmp_path: Path, hub_cache: Path) -> None:
    path, _ = _weights(server.root)
    run_dir = tmp_path / "run"
    assert main(["train", "pascal-dinov3", *_voc(tmp_path), f"run_dir={run_dir}", *TINY_DINOV3,
                 f"model.pretrained={server.url}/{path.name}"]) == 0
    assert len(server.requests) == 1 and (hub_cache / path.name).is_file()


# ---------------------------------------------------------------- hf:


def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: refs/main names the snapshot holding the files."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef")
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_hf_repositories_from_an_offline_cache(tmp_path: Path, monkeypatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    vectors = load_file(reference_or_skip("hf") / "vectors.safetensors")
    hf = {k.removeprefix("dinov3.weights."): v for k, v in vectors.items() if k.startswith("dinov3.weights.")}
    save_file(hf, str(tmp_path / "model.safetensors"))
    cache = tmp_path / "hf_cache"
    _hub_cache(cache, "facebook/dinov3-tiny", {"config.json": b"{}",
                                               "model.safetensors": (tmp_path / "model.safetensors").read_bytes()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = resolve_weights("hf:facebook/dinov3-tiny")
    assert (folder / "model.safetensors").is_file()
    encoder = build_dinov3("tiny")
    assert load_encoder_weights(encoder, "hf:facebook/dinov3-tiny").ok
    assert torch.equal(encoder.storage_tokens, hf["embeddings.register_tokens"])
    with pytest.raises(WeightsSourceError, match="not in the Hugging Face cache .*huggingface-cli download"):
        resolve_weights("hf:facebook/not-cached")


def test_hf_without_the_extra_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(WeightsSourceError, match=r"pip install huggingface_hub .*dssn\[hub\]"):
        resolve_weights("hf:facebook/dinov3-vits16-pretrain-lvd1689m")
