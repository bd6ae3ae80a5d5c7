"""Where encoder weights come from (docs/training.md, encoder weights): a local path, a released file's name, a URL, or
a Hugging Face Hub repository (docs/training.md "Encoder weights").

- a name with a public address (``dinov2_vits14``, ``dinov2_vitb14_reg4``, ...: ``PUBLIC_WEIGHTS``)
  and an ``https://``, ``http://`` or ``file://`` URL (DINOv3's personal download address) are
  fetched once into PyTorch's hub cache, ``$TORCH_HOME/hub/checkpoints`` (where
  ``torch.hub.load_state_dict_from_url`` keeps them), under the URL's file name: with a progress
  bar, written under a temporary name and renamed only when complete, and refused if shorter than
  announced or if its SHA-256 does not start with the hash a ``name-<hex>.pth`` file name carries;
- ``hf:<org>/<repo>[@<revision>]`` through ``huggingface_hub`` (an optional extra), with its own
  cache, token and offline mode (``HF_HUB_OFFLINE=1``);
- a name in ``PACKAGED_WEIGHTS`` is a file shipped inside the package (``dssn/assets``): the demo
  task's small pretrained encoder, so that the demo needs no download.

Without a network, a name or URL that is not cached fails at once with the address and the path
to put the file at. Everything else is a local path, returned as it is.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from dssn.errors import DssnError
from dssn.files import atomic_path

__all__ = ["PACKAGED_WEIGHTS", "PUBLIC_WEIGHTS", "WeightsSourceError", "cache_path", "is_remote",
           "packaged_weights_path", "resolve_weights"]

logger = logging.getLogger(__name__)

_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
# The released files with a public address, by the name the official hub gives their model.
PUBLIC_WEIGHTS: dict[str, str] = {
    f"dinov2_vit{size}14{reg}": f"{_DINOV2_URL}/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth"
    for size in ("s", "b", "l", "g")
    for reg in ("", "_reg4")
}
# DINOv3's files have no public address (a request form emails a personal one); their names are
# recognised to say so, and where the same weights are on the Hugging Face Hub.
_DINOV3_REPOS = {
    "dinov3_vits16": "dinov3-vits16-pretrain-lvd1689m",
    "dinov3_vits16plus": "dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3_vitb16": "dinov3-vitb16-pretrain-lvd1689m",
    "dinov3_vitl16": "dinov3-vitl16-pretrain-lvd1689m",
    "dinov3_vith16plus": "dinov3-vith16plus-pretrain-lvd1689m",
    "dinov3_vit7b16": "dinov3-vit7b16-pretrain-lvd1689m",
}
# Weights shipped in dssn/assets, by name: name -> file name. Each has its recipe (the module named).
PACKAGED_WEIGHTS: dict[str, str] = {
    "glyphs_r18w16_simclr": "glyphs_r18w16_simclr.pt",  # dssn.apps.glyph_encoder
}
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_URL_SCHEMES = ("https://", "http://", "file://")
_HF_PREFIX = "hf:"
# torch.hub's convention: the first hex digits of the file's SHA-256 after the last '-'.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
_CHUNK = 1 << 20
_TIMEOUT_S = 30


class WeightsSourceError(DssnError, RuntimeError):
    """Weights named by a name, URL or Hub repository could not be fetched or found."""


def is_remote(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a name, URL or ``hf:`` repository rather than a local path."""
    text = str(source)
    return (text.startswith((*_URL_SCHEMES, _HF_PREFIX)) or text in PUBLIC_WEIGHTS or text in _DINOV3_REPOS
            or text in PACKAGED_WEIGHTS)


def packaged_weights_path(name: str) -> Path:
    """Where the package keeps the weights ``PACKAGED_WEIGHTS`` names ``name``."""
    return _ASSETS / PACKAGED_WEIGHTS[name]


def cache_path(url: str) -> Path:
    """Where a URL's file is kept: the hub cache's ``checkpoints`` folder, under its file name."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise WeightsSourceError(f"{url} names no file (its path ends with '/')")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def resolve_weights(source: str | os.PathLike[str], progress: bool = True) -> Path:
    """The local file or folder ``source`` stands for, fetched first if it is a name, URL or
    ``hf:`` repository that is not cached yet (see the module doc)."""
    text = str(source)
    if not is_remote(text) or Path(text).exists():  # a local file wins over a name
        return Path(text).expanduser()
    if text in PACKAGED_WEIGHTS:
        return packaged_weights_path(text)
    if text in _DINOV3_REPOS:
        raise WeightsSourceError(
            f"'{text}' has no public address: DINOv3's weights are released behind a request form "
            "(https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/) that emails a personal "
            f"download URL; set model.pretrained to that URL, to the downloaded file, or to "
            f"hf:facebook/{_DINOV3_REPOS[text]} (the same weights on the Hugging Face Hub)")
    if text.startswith(_HF_PREFIX):
        return _from_hub(text[len(_HF_PREFIX):])
    url = PUBLIC_WEIGHTS.get(text, text)
    target = cache_path(url)
    if target.is_file():
        logger.info("%s: found in the hub cache at %s", text, target)
        return target
    _download(url, target, progress)
    return target


def _download(url: str, target: Path, progress: bool) -> None:
    expected_hash = _HASH_IN_NAME.search(target.name)
    where = (f"Without a network, download {url} elsewhere and put it at {target} "
             f"(PyTorch's hub cache, $TORCH_HOME/hub/checkpoints), or set model.pretrained to a local file")
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise WeightsSourceError(f"could not download {url} ({_reason(err)}). {where}") from None
    digest = hashlib.sha256()
    received = 0
    with response:
        announced = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        total = int(announced) if announced and announced.isdigit() else None
        logger.info("downloading %s to %s", url, target)
        try:
            with atomic_path(target) as partial, open(partial, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                if total is not None and received != total:
                    raise WeightsSourceError(
                        f"the download of {url} ended after {received} of {total} bytes; nothing was kept. {where}")
                if expected_hash and not digest.hexdigest().startswith(expected_hash.group(1)):
                    raise WeightsSourceError(
                        f"{url}: SHA-256 {digest.hexdigest()[:16]}... does not start with {expected_hash.group(1)}, "
                        "the hash its file name carries; the file was not kept (a corrupted or different file)")
        except (OSError, http.client.HTTPException) as err:
            raise WeightsSourceError(f"the download of {url} failed ({_reason(err)}); nothing was kept. "
                                     f"{where}") from None
    logger.info("downloaded %s: %d bytes, SHA-256 %s%s", target.name, received, digest.hexdigest(),
                " (matches the hash in its name)" if expected_hash else "")


def _reason(err: BaseException) -> str:
    return str(getattr(err, "reason", None) or err) or type(err).__name__


def _from_hub(repo: str) -> Path:
    """A Hub repository's weights (safetensors, else PyTorch's .bin) in huggingface_hub's cache."""
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise WeightsSourceError(f"'hf:{repo}' is not hf:<org>/<repo>[@<revision>]")
    try:
        import huggingface_hub  # an optional extra: only hf: sources need it
    except ImportError:
        raise WeightsSourceError(
            f"hf:{repo} needs the huggingface_hub package: pip install huggingface_hub "
            "(or pip install 'dssn[hub]'), or download the repository and set model.pretrained to its folder"
        ) from None
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):  # an older repository: PyTorch files only
            patterns = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
            folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                            allow_patterns=patterns))
    except LocalEntryNotFoundError as err:
        raise WeightsSourceError(
            f"hf:{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
            f"downloaded ({err}). Where there is a network, run: huggingface-cli download {repo_id}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise WeightsSourceError(
            f"hf:{repo} could not be fetched ({type(err).__name__}: {err}). Gated repositories (DINOv3) need "
            "their terms accepted on the Hub and a token (huggingface-cli login or HF_TOKEN)") from None
    logger.info("hf:%s: using %s", repo, folder)
    return folder
