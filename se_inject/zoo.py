"""Model names -> modules (timm, torchvision), and which weights they start from.

Names:

* ``timm:NAME`` and ``torchvision:NAME`` pick the library; timm's ``arch.tag`` names
  (``resnet50.a1_in1k``) pass through unchanged.
* A bare ``NAME`` is looked up in timm first, then in torchvision (35 names are in both, e.g.
  ``resnet50``; timm's is the one used). :class:`ModelSpec` records the library used, and the
  CLI says which one it was.

Weights (:func:`load_model`):

* ``"random"``: the library's random initialisation; nothing is downloaded, not even a
  torchvision detection backbone.
* ``"pretrained"``: the library's default pretrained weights, from the local cache if they are
  there, else downloaded; :class:`~se_inject.errors.WeightsError` if neither works.
* ``"auto"`` (the default): ``"pretrained"`` if possible, else random init with a warning.
* anything else is a path to a local state dict (``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)``, ``.safetensors`` through safetensors), loaded strictly.

Offline, the decision takes milliseconds rather than the minute of retries that
``huggingface_hub`` spends: the local caches are checked first (the Hugging Face hub cache and
torch hub's ``checkpoints`` folder), and a download is attempted only when the weights' host
answers a TCP connection within :data:`PROBE_TIMEOUT_S` seconds.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import inspect
import os
import pickle
import pickletools
import re
import socket
import sys
import threading
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torchvision
from torch import nn

from .errors import SEInjectError, UnknownModelError, UnsafeCheckpointError, WeightsError

__all__ = [
    "Source",
    "ModelSpec",
    "WeightsKind",
    "WeightsInfo",
    "LoadedModel",
    "PROBE_TIMEOUT_S",
    "resolve_name",
    "suggest",
    "create_model",
    "load_model",
    "load_state_dict_file",
    "read_pickle",
    "load_strict",
    "create_model_for_state",
    "default_input_size",
    "model_origin",
    "tag_origin",
    "pretrained_from_cache",
]

#: Seconds to wait for the weights' host before deciding that we are offline.
PROBE_TIMEOUT_S = 3.0

#: Attribute set on models made here, so ``save`` can record where a model came from.
_ORIGIN_ATTR = "_se_inject_origin"

#: How many missing / unexpected keys an error message names.
_KEYS_SHOWN = 4


class Source(enum.StrEnum):
    """The registry a model comes from."""

    TIMM = "timm"
    TORCHVISION = "torchvision"


class WeightsKind(enum.StrEnum):
    """Which weights a model was created with."""

    PRETRAINED = "pretrained"
    RANDOM = "random"
    FILE = "file"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: the registry and the name inside it."""

    source: Source
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights were used, in words for the report (``detail``) and as a kind for machines."""

    kind: WeightsKind
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": str(self.kind), "detail": self.detail}


@dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_model` returns."""

    model: nn.Module
    spec: ModelSpec
    weights: WeightsInfo


def _timm_names() -> list[str]:
    return timm.list_models()


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models()


def _in_timm(name: str) -> bool:
    # is_model strips a ``.tag``, so ``resnet50.a1_in1k`` is found too.
    return timm.is_model(name)


def _in_torchvision(name: str) -> bool:
    return name in _torchvision_names()


def suggest(name: str, *, limit: int = 5) -> list[str]:
    """Close matches for ``name`` from both registries, best first, each tagged with its source.

    Example:
        >>> suggest("resnet5")[:2]
        ['resnet50 (timm, torchvision)', 'resnet34 (timm, torchvision)']
    """
    bare = name.split(":", 1)[-1].split(".", 1)[0].lower()
    sources: dict[str, list[str]] = {}
    for source, names in ((Source.TIMM, _timm_names()), (Source.TORCHVISION, _torchvision_names())):
        for candidate in names:
            sources.setdefault(candidate, []).append(str(source))
    matches = difflib.get_close_matches(bare, list(sources), n=limit, cutoff=0.6)
    return [f"{m} ({', '.join(sources[m])})" for m in matches]


def resolve_name(name: str) -> ModelSpec:
    """Turn ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` into a :class:`ModelSpec`.

    A bare name is looked up in timm first, then in torchvision.

    Example:
        >>> resolve_name("resnet50"), resolve_name("torchvision:resnet50")
        (ModelSpec(source=<Source.TIMM: 'timm'>, name='resnet50'), ModelSpec(source=<Source.TORCHVISION: 'torchvision'>, name='resnet50'))

    Raises:
        UnknownModelError: the name is in neither registry (the message lists close matches).
    """
    text = name.strip()
    prefix, sep, rest = text.partition(":")
    if sep:
        try:
            source = Source(prefix.lower())
        except ValueError:
            raise UnknownModelError(
                f"Unknown model source {prefix!r} in {name!r}; use timm:NAME, torchvision:NAME or a bare NAME"
            ) from None
        found = _in_timm(rest) if source is Source.TIMM else _in_torchvision(rest)
        if found:
            return ModelSpec(source, rest)
        where = f"not in {source}"
    else:
        rest = prefix
        if rest and _in_timm(rest):
            return ModelSpec(Source.TIMM, rest)
        if rest and _in_torchvision(rest):
            return ModelSpec(Source.TORCHVISION, rest)
        where = "not in timm or torchvision"
    hints = suggest(text)
    hint = f" Did you mean: {', '.join(hints)}?" if hints else " List names with timm.list_models() or torchvision.models.list_models()."
    raise UnknownModelError(f"Unknown model {name!r} ({where}).{hint}")


def model_origin(model: nn.Module) -> ModelSpec | None:
    """The registry name a model was created from, if it was created here (or is a timm model).

    Example:
        >>> model_origin(timm.create_model("resnet50.a1_in1k"))
        ModelSpec(source=<Source.TIMM: 'timm'>, name='resnet50')
    """
    origin = getattr(model, _ORIGIN_ATTR, None)
    if isinstance(origin, ModelSpec):
        return origin
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return ModelSpec(Source.TIMM, str(cfg["architecture"]))
    return None


def tag_origin(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Record on ``model`` the registry name it was built from (read back by :func:`model_origin`)."""
    # A plain attribute: not a parameter or buffer, so state_dict keys are unchanged.
    object.__setattr__(model, _ORIGIN_ATTR, spec)
    return model


def create_model(spec: ModelSpec, *, num_classes: int | None = None) -> nn.Module:
    """Build ``spec`` with the library's random initialisation; never downloads anything.

    torchvision detection and segmentation builders default to a pretrained backbone; that
    default is turned off here.

    Example:
        >>> model = create_model(resolve_name("torchvision:resnet18"))
    """
    if spec.source is Source.TIMM:
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        return tag_origin(timm.create_model(spec.name, pretrained=False, **kwargs), spec)
    kwargs = _torchvision_random_kwargs(spec.name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    with warnings.catch_warnings():
        # inception_v3 / googlenet warn that their default init will change; not ours to act on.
        warnings.filterwarnings("ignore", category=FutureWarning)
        return tag_origin(torchvision.models.get_model(spec.name, **kwargs), spec)


def _torchvision_random_kwargs(name: str) -> dict[str, Any]:
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    kwargs: dict[str, Any] = {"weights": None}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    return kwargs


def default_input_size(spec: ModelSpec, model: nn.Module | None = None) -> tuple[int, ...]:
    """Input size (without batch) used to count multiply-adds.

    timm: the model's ``pretrained_cfg['input_size']``; torchvision: 299x299 for
    ``inception_v3``, 3x16x112x112 clips for the video models, 224x224 otherwise.

    Example:
        >>> default_input_size(resolve_name("torchvision:inception_v3"))
        (3, 299, 299)
    """
    if spec.source is Source.TIMM:
        cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
        if not isinstance(cfg, Mapping):
            found = timm.models.get_pretrained_cfg(spec.name)
            cfg = found.to_dict() if found is not None else {}
        size = cfg.get("input_size")
        if size:
            return tuple(int(s) for s in size)
        return (3, 224, 224)
    if spec.name in torchvision.models.list_models(module=torchvision.models.video):
        return (3, 16, 112, 112)
    if spec.name in ("inception_v3", "quantized_inception_v3"):
        return (3, 299, 299)
    return (3, 224, 224)


# --- pretrained weights -------------------------------------------------------------------


@dataclass(frozen=True)
class _Pretrained:
    """Where a model's default pretrained weights live: a cached file, or a host to fetch from."""

    label: str  # "timm/resnet50.a1_in1k" or a URL's file name
    cached: str | None
    host: str | None


def _probe_address(host: str) -> tuple[str, int]:
    """Where a download of ``https://host/...`` would connect: the HTTPS proxy if one is set."""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    return host, 443


def _host_reachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``host`` (or the HTTPS proxy) accepts a TCP connection within ``timeout`` seconds.

    The name lookup runs in a daemon thread too: without a reachable DNS server it can block
    far longer than the connect timeout.
    """
    if "huggingface" in host and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
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


def _torch_hub_cached(url: str) -> str | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return str(path) if path.is_file() else None


def _hf_cached(repo_id: str, filename: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = repo_id.partition("@")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    for candidate in names:
        found = try_to_load_from_cache(repo, candidate, revision=revision or None)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _timm_pretrained(name: str) -> _Pretrained:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {name!r}; use --weights random or a file")
    if cfg.file and os.path.isfile(cfg.file):
        return _Pretrained(cfg.file, cfg.file, None)
    if cfg.hf_hub_id:
        cached = _hf_cached(cfg.hf_hub_id, cfg.hf_hub_filename)
        if cached is None and cfg.url:
            cached = _torch_hub_cached(cfg.url)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return _Pretrained(cfg.hf_hub_id, cached, urlparse(endpoint).hostname)
    return _Pretrained(os.path.basename(cfg.url), _torch_hub_cached(cfg.url), urlparse(cfg.url).hostname)


def _torchvision_default_weights(name: str) -> Any:
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError, KeyError) as e:
        raise WeightsError(
            f"torchvision has no pretrained weights for {name!r}; use --weights random or a file"
        ) from e
    return weights


def _torchvision_pretrained(name: str) -> _Pretrained:
    url = _torchvision_default_weights(name).url
    return _Pretrained(os.path.basename(urlparse(url).path), _torch_hub_cached(url), urlparse(url).hostname)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    # torch.hub prints "Downloading: ..." on stdout, which must stay clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _create_pretrained(spec: ModelSpec, *, download: bool = True) -> tuple[nn.Module, WeightsInfo]:
    """Build ``spec`` with its default pretrained weights, from the cache or (``download``) a download.

    Raises:
        WeightsError: no pretrained weights exist, or they are not cached and cannot be fetched.
    """
    where = _timm_pretrained(spec.name) if spec.source is Source.TIMM else _torchvision_pretrained(spec.name)
    if where.cached is None:
        if not download:
            raise WeightsError(f"pretrained weights for {spec} ({where.label}) are not in the local cache")
        if where.host is None or not _host_reachable(where.host):
            raise WeightsError(
                f"pretrained weights for {spec} ({where.label}) are not in the local cache and "
                f"{where.host or 'their host'} cannot be reached (offline?)"
            )
        origin = f"downloaded from {where.host}"
    else:
        origin = "from the local cache"
    try:
        with _stdout_to_stderr():
            if spec.source is Source.TIMM:
                overlay = {"file": where.cached} if where.cached else None
                model = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay)
            else:
                weights = _torchvision_default_weights(spec.name)
                model = torchvision.models.get_model(spec.name, weights=weights)
    except WeightsError:
        raise
    except Exception as e:  # network, hash and format failures all mean "no pretrained weights"
        raise WeightsError(f"pretrained weights for {spec} ({where.label}) could not be loaded: {e}") from e
    return tag_origin(model, spec), WeightsInfo(WeightsKind.PRETRAINED, f"pretrained {where.label} ({origin})")


def pretrained_from_cache(spec: ModelSpec) -> tuple[nn.Module, WeightsInfo] | None:
    """``spec`` with its default pretrained weights if they are in the local cache, else ``None``.

    Never touches the network.
    """
    try:
        return _create_pretrained(spec, download=False)
    except WeightsError:
        return None


# --- weights from a file ------------------------------------------------------------------


def _pickle_globals(file: Path) -> list[str]:
    """Names a raw pickle would import, found by reading its opcodes (nothing is executed)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        with open(file, "rb") as handle:
            for op, arg, _ in pickletools.genops(handle):
                if op.name == "GLOBAL" and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a corrupt stream: keep what was found before the damage
        pass
    return found


def read_pickle(file: str | os.PathLike[str], *, what: str, error: type[SEInjectError]) -> Any:
    """``torch.load(file, weights_only=True, map_location="cpu")`` with our errors.

    Raises:
        error: the file is missing, not a torch file, or corrupt (``error`` is the class to use).
        UnsafeCheckpointError: unpickling would import or call code; torch's ``weights_only``
            unpickler refused it before anything ran.
    """
    path = Path(file)
    if path.is_dir():
        raise error(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        named = re.findall(r"GLOBAL ([\w.]+)", message) or [
            g for g in _pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict"))
        ]
        if named:
            raise UnsafeCheckpointError(
                f"refused {what} {str(path)!r}: unpickling it would import and run {', '.join(dict.fromkeys(named))} "
                "(only tensors and plain data are accepted; nothing was run)"
            ) from None
        raise error(f"{what} {str(path)!r} is not a readable torch file (corrupt or another format)") from e
    except Exception as e:  # zip, struct, EOF and OS errors alike mean an unreadable file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{what} {str(path)!r} is not a readable torch file (corrupt or truncated: {first})") from e


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pt`` / ``.pth`` (``weights_only``) or ``.safetensors``.

    Training checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``,
    ``{"model_state_dict": ...}``) and ``module.`` prefixes from DataParallel are unwrapped.

    Raises:
        WeightsError: the file is missing, corrupt, or holds no state dict.
        UnsafeCheckpointError: unpickling it would run code (refused; nothing ran).
    """
    file = Path(path)
    if file.suffix == ".safetensors":
        if not file.is_file():
            raise WeightsError(f"weights file {str(file)!r} does not exist")
        try:
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise WeightsError(f"weights file {str(file)!r} is not a readable safetensors file: {e}") from e
    else:
        state = read_pickle(file, what="weights file", error=WeightsError)
    return _unwrap_state_dict(state, file)


def _unwrap_state_dict(data: Any, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and data.get("format") == "se-inject":
        raise WeightsError(
            f"{str(file)!r} is an se-inject checkpoint, not base-model weights; load it with se_inject.load()"
        )
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not data or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise WeightsError(f"weights file {str(file)!r} does not hold a state dict (name -> tensor)")
    state = dict(data)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming a few bad keys.

    Example:
        >>> load_strict(model, torch.load("resnet18.pth", weights_only=True), "resnet18.pth")

    Raises:
        WeightsError: missing, unexpected or wrongly shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_KEYS_SHOWN])}{more}")
        raise WeightsError(f"{what} does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _classifier_width(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of ``state`` when only its classifier layers differ from ``model``'s.

    Fine-tuned checkpoints usually differ from the registry model in the number of classes
    only; every ``nn.Linear`` whose shapes differ must differ in its output width alone.
    """
    own = model.state_dict()
    wrong = {k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)}
    if not wrong:
        return None
    modules = dict(model.named_modules())
    widths = set()
    for prefix in {k.rsplit(".", 1)[0] for k in wrong}:
        layer = modules.get(prefix)
        weight = state.get(f"{prefix}.weight")
        if not isinstance(layer, nn.Linear) or weight is None or weight.ndim != 2:
            return None
        if weight.shape[1] != layer.in_features:
            return None
        widths.add(int(weight.shape[0]))
    return widths.pop() if len(widths) == 1 else None


def create_model_for_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Random-init ``spec`` whose classifier width fits ``state`` (fine-tuned checkpoints).

    Nothing is loaded and nothing is downloaded; keys that do not fit are left for
    :func:`load_strict` to report.

    Example:
        >>> state = torchvision.models.resnet18(num_classes=10).state_dict()
        >>> create_model_for_state(resolve_name("torchvision:resnet18"), state).fc.out_features
        10
    """
    model = create_model(spec)
    width = _classifier_width(model, state)
    if width is not None:
        try:
            model = create_model(spec, num_classes=width)
        except (TypeError, ValueError):  # a builder without num_classes: report the shapes instead
            pass
    return model


# --- entry point --------------------------------------------------------------------------


def load_model(name: str, weights: str = "auto") -> LoadedModel:
    """Resolve ``name`` and build the model with the requested weights.

    Args:
        name: ``timm:NAME``, ``torchvision:NAME`` or a bare ``NAME`` (timm first).
        weights: ``"auto"``, ``"pretrained"``, ``"random"`` or a path to a state dict file.
            ``"auto"`` falls back to random init with a :class:`UserWarning` when pretrained
            weights cannot be had; the returned :class:`WeightsInfo` says so too.

    Example:
        >>> loaded = load_model("torchvision:resnet18", weights="random")
        >>> loaded.weights.kind
        <WeightsKind.RANDOM: 'random'>

    Raises:
        UnknownModelError: the name is in neither registry.
        WeightsError: pretrained weights cannot be had (``"pretrained"``), or the file is
            missing, corrupt or does not fit the architecture.
        UnsafeCheckpointError: the weights file would run code when unpickled.
    """
    spec = resolve_name(name)
    if weights == "random":
        return LoadedModel(create_model(spec), spec, WeightsInfo(WeightsKind.RANDOM, "random init (by request)"))
    if weights in ("auto", "pretrained"):
        try:
            model, info = _create_pretrained(spec)
        except WeightsError as e:
            if weights == "pretrained":
                raise
            warnings.warn(f"{e}; using RANDOM init instead", UserWarning, stacklevel=2)
            info = WeightsInfo(WeightsKind.RANDOM, f"random init (pretrained unavailable: {e})")
            return LoadedModel(create_model(spec), spec, info)
        return LoadedModel(model, spec, info)
    state = load_state_dict_file(weights)
    model = create_model_for_state(spec, state)
    load_strict(model, state, f"weights file {str(weights)!r}")
    return LoadedModel(model, spec, WeightsInfo(WeightsKind.FILE, f"file {weights}"))
