"""Which weights a registry model starts from: random init, or pretrained from a cache or a download.

* random: the library's random initialisation; nothing is downloaded, not even a torchvision
  detection backbone (:func:`create_model`).
* pretrained: the library's default pretrained weights, from the local cache if they are there,
  else downloaded (:func:`create_pretrained`).

Offline, the decision takes milliseconds rather than the minute of retries that
``huggingface_hub`` spends: the local caches are checked first (the Hugging Face hub cache,
``HF_HUB_CACHE`` read at call time, and torch hub's ``checkpoints`` folder under
``TORCH_HOME``), and a download is attempted only when the weights' host answers a TCP
connection within :data:`PROBE_TIMEOUT_S` seconds. How that is decided is a :class:`Network`,
which callers (and tests) pass: :data:`OFFLINE` never touches the network, and the environment
variable ``SE_INJECT_OFFLINE=1`` makes it the default.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import os
import socket
import sys
import threading
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from ..errors import ModelArgsError, WeightsError
from .arguments import args_text, library_kwargs
from .names import HUB_PREFIX, ModelSpec, Source, is_hub_name, tag_origin

__all__ = [
    "PROBE_TIMEOUT_S",
    "WeightsKind",
    "WeightsInfo",
    "Network",
    "OFFLINE",
    "default_network",
    "host_reachable",
    "hf_cached",
    "create_model",
    "create_pretrained",
    "pretrained_from_cache",
]

#: Seconds to wait for the weights' host before deciding that we are offline.
PROBE_TIMEOUT_S = 3.0

_TRUE = ("1", "true", "yes", "on")


class WeightsKind(enum.StrEnum):
    """Which weights a model was created with."""

    PRETRAINED = "pretrained"
    RANDOM = "random"
    FILE = "file"


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights were used, in words for the report (``detail``) and as a kind for machines."""

    kind: WeightsKind
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": str(self.kind), "detail": self.detail}


def _probe_address(host: str) -> tuple[str, int]:
    """Where a download of ``https://host/...`` would connect: the HTTPS proxy if one is set."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    return host, 443


def host_reachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``host`` (or the HTTPS proxy) accepts a TCP connection within ``timeout`` seconds.

    The name lookup runs in a daemon thread too: without a reachable DNS server it can block
    far longer than the connect timeout. ``HF_HUB_OFFLINE=1`` answers False for the hub.
    """
    if "huggingface" in host and os.environ.get("HF_HUB_OFFLINE", "0").lower() in _TRUE:
        return False
    address = _probe_address(host)
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answer.append(True)
        except Exception:  # OSError mostly; any failure to connect means "not reachable"
            answer.append(False)

    thread = threading.Thread(target=probe, name="se-inject-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def hf_cached(repo_id: str, filename: str | None) -> str | None:
    """The cached file of a Hugging Face hub repository, or ``None`` (``HF_HUB_CACHE`` is honoured)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = repo_id.partition("@")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it at import
    for candidate in names:
        found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


@dataclass(frozen=True)
class Network:
    """How pretrained weights are looked for: a hub cache lookup and a reachability probe.

    Example:
        >>> load_model("resnet18", "auto", network=OFFLINE)   # caches only, never the network
    """

    #: ``host -> bool``: may a download from this host be tried?
    reachable: Callable[[str], bool] = host_reachable
    #: ``(repo_id, filename) -> path | None``: the Hugging Face hub cache.
    hf_cached: Callable[[str, str | None], str | None] = hf_cached


#: Caches only: no host is ever probed or downloaded from.
OFFLINE = Network(reachable=lambda host: False)


def default_network() -> Network:
    """:data:`OFFLINE` when ``SE_INJECT_OFFLINE`` is set to 1/true, else the real network."""
    return OFFLINE if os.environ.get("SE_INJECT_OFFLINE", "").lower() in _TRUE else Network()


def _hub_host() -> str | None:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname


def _hub_folder(spec: ModelSpec, network: Network) -> str | None:
    """The cached snapshot folder of a hub model (its ``config.json`` is there), or None."""
    config = network.hf_cached(spec.name[len(HUB_PREFIX):], "config.json")
    return os.path.dirname(config) if config else None


def _hub_architecture(spec: ModelSpec, network: Network) -> str:
    """What to hand ``timm.create_model`` for a hub model: its cached folder (``local-dir:``), so
    nothing is fetched, or the hub name when the hub answers.

    Raises:
        WeightsError: the model's config is not cached and the hub cannot be reached.
    """
    folder = _hub_folder(spec, network)
    if folder is not None:
        return f"local-dir:{folder}"
    host = _hub_host()
    if host is None or not network.reachable(host):
        raise WeightsError(
            f"the architecture of {spec} (config.json) is not in the local cache and "
            f"{host or 'the hub'} cannot be reached (offline?)"
        )
    return spec.name


def _create_timm(name: str, spec: ModelSpec, **kwargs: Any) -> nn.Module:
    import timm

    if not is_hub_name(spec.name):
        return timm.create_model(name, **kwargs)
    try:
        with _stdout_to_stderr():
            return timm.create_model(name, **kwargs)
    except Exception as e:  # the hub's errors (no such repository, a bad config) in one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{spec} could not be built from the hub: {first}") from e


#: What a constructor raises for arguments it does not take or values it refuses.
_REJECTED = (TypeError, ValueError, AssertionError, KeyError, NotImplementedError)


def _construct(spec: ModelSpec, args: Mapping[str, Any], build: Callable[[], nn.Module]) -> nn.Module:
    """``build()``; with model arguments, what the constructor raises for them becomes a
    :class:`~se_inject.errors.ModelArgsError` (one line, naming the arguments)."""
    if not args:
        return build()
    try:
        return build()
    except _REJECTED as e:
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ModelArgsError(f"{spec} does not take the model arguments {args_text(args)} ({why})") from e


def create_model(
    spec: ModelSpec,
    *,
    num_classes: int | None = None,
    network: Network | None = None,
    args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build ``spec`` with the library's random initialisation; never downloads weights.

    ``args`` are the constructor's keyword arguments (``timm.create_model`` kwargs, a
    torchvision builder's); ``num_classes`` is one more. The model records them
    (:func:`~se_inject.models.names.origin_args`), so a checkpoint can rebuild it the same.

    torchvision detection and segmentation builders default to a pretrained backbone; that
    default is turned off here. A hub model (``hf-hub:org/name``) needs its ``config.json``:
    from the hub cache, else fetched (``network`` decides whether that is tried).

    Example:
        >>> model = create_model(resolve_name("timm:resnet18"), args={"global_pool": "max"})

    Raises:
        WeightsError: a hub model's config is neither cached nor reachable.
        ModelArgsError: the constructor does not take ``args`` (an unknown key, a refused value),
            or torchvision has no such argument (``in_chans``).
    """
    given = dict(args or {})
    if num_classes is not None:
        given["num_classes"] = num_classes
    kwargs = library_kwargs(str(spec.source), given)
    if spec.source is Source.TIMM:
        name = spec.name
        if is_hub_name(name):
            name = _hub_architecture(spec, network if network is not None else default_network())
        model = _construct(spec, given, lambda: _create_timm(name, spec, pretrained=False, **kwargs))
        return tag_origin(model, spec, given)
    import torchvision

    builder = torchvision.models.get_model_builder(spec.name)
    kwargs["weights"] = None
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    with warnings.catch_warnings():
        # inception_v3 / googlenet warn that their default init will change; not ours to act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        return tag_origin(_construct(spec, given, lambda: builder(**kwargs)), spec, given)


@dataclass(frozen=True)
class _Pretrained:
    """Where a model's default pretrained weights live: a cached file, or a host to fetch from."""

    label: str  # "timm/resnet50.a1_in1k" or a URL's file name
    cached: str | None
    host: str | None


def _torch_hub_cached(url: str) -> str | None:
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return str(path) if path.is_file() else None


def _hub_pretrained(spec: ModelSpec, network: Network) -> _Pretrained:
    """A hub model's weights: its cached folder when config and weights are both cached, else the hub."""
    repo = spec.name[len(HUB_PREFIX):]
    folder = _hub_folder(spec, network)
    if folder is not None and network.hf_cached(repo, None) is None:
        folder = None
    return _Pretrained(repo, folder, _hub_host())


def _timm_pretrained(name: str, network: Network) -> _Pretrained:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {name!r}; use --weights random or a file")
    if cfg.file and os.path.isfile(cfg.file):
        return _Pretrained(cfg.file, cfg.file, None)
    if cfg.hf_hub_id:
        cached = network.hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
        if cached is None and cfg.url:
            cached = _torch_hub_cached(cfg.url)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return _Pretrained(cfg.hf_hub_id, cached, urlparse(endpoint).hostname)
    return _Pretrained(os.path.basename(cfg.url), _torch_hub_cached(cfg.url), urlparse(cfg.url).hostname)


def _torchvision_default_weights(name: str) -> Any:
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError) as e:
        raise WeightsError(
            f"torchvision has no pretrained weights for {name!r}; use --weights random or a file"
        ) from e


def _torchvision_pretrained(name: str) -> _Pretrained:
    url = _torchvision_default_weights(name).url
    return _Pretrained(os.path.basename(urlparse(url).path), _torch_hub_cached(url), urlparse(url).hostname)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    # torch.hub prints "Downloading: ..." on stdout, which must stay clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        yield


def create_pretrained(
    spec: ModelSpec, *, download: bool = True, network: Network | None = None, args: Mapping[str, Any] | None = None
) -> tuple[nn.Module, WeightsInfo]:
    """Build ``spec`` with its default pretrained weights, from the cache or (``download``) a download.

    ``args`` are constructor arguments, as for :func:`create_model` (timm adapts the pretrained
    classifier and first convolution to ``num_classes`` and ``in_chans``).

    Example:
        >>> model, info = create_pretrained(resolve_name("resnet18"), network=OFFLINE)

    Raises:
        WeightsError: no pretrained weights exist, or they are not cached and cannot be fetched.
        ModelArgsError: the constructor does not take ``args``.
    """
    given = dict(args or {})
    kwargs = library_kwargs(str(spec.source), given)  # refused before anything is looked for
    network = network if network is not None else default_network()
    if spec.source is Source.TIMM:
        where = _hub_pretrained(spec, network) if is_hub_name(spec.name) else _timm_pretrained(spec.name, network)
    else:
        where = _torchvision_pretrained(spec.name)
    if where.cached is None:
        if not download:
            raise WeightsError(f"pretrained weights for {spec} ({where.label}) are not in the local cache")
        if where.host is None or not network.reachable(where.host):
            raise WeightsError(
                f"pretrained weights for {spec} ({where.label}) are not in the local cache and "
                f"{where.host or 'their host'} cannot be reached (offline?)"
            )
        origin = f"downloaded from {where.host}"
    else:
        origin = "from the local cache"
    try:
        with _stdout_to_stderr():
            model = _construct(spec, given, lambda: _build_pretrained(spec, where, kwargs))
    except (WeightsError, ModelArgsError):
        raise
    except Exception as e:  # network, hash and format failures all mean "no pretrained weights"
        raise WeightsError(f"pretrained weights for {spec} ({where.label}) could not be loaded: {e}") from e
    return tag_origin(model, spec, given), WeightsInfo(WeightsKind.PRETRAINED, f"pretrained {where.label} ({origin})")


def _build_pretrained(spec: ModelSpec, where: _Pretrained, kwargs: Mapping[str, Any]) -> nn.Module:
    if spec.source is Source.TIMM and is_hub_name(spec.name):
        name = f"local-dir:{where.cached}" if where.cached else spec.name
        return _create_timm(name, spec, pretrained=True, **kwargs)
    if spec.source is Source.TIMM:
        import timm

        overlay = {"file": where.cached} if where.cached else None
        return timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    import torchvision

    return torchvision.models.get_model(spec.name, weights=_torchvision_default_weights(spec.name), **kwargs)


def pretrained_from_cache(
    spec: ModelSpec, *, network: Network | None = None, args: Mapping[str, Any] | None = None
) -> tuple[nn.Module, WeightsInfo] | None:
    """``spec`` with its default pretrained weights if they are in the local cache, else ``None``.

    Never touches the network.
    """
    try:
        return create_pretrained(spec, download=False, network=network, args=args)
    except WeightsError:
        return None
