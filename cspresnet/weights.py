"""Weights into the model, checked key for key against CSPResNet-50 (cspresnet.checkpoint reads the
files), weights by name from the Hugging Face hub, and a new run's initial weights, whose classifier
gives way when the classes differ."""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import timm
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError
from torch import nn

from common.errors import CheckpointError, OptionError
from data.config import DataConfig

from .checkpoint import Weights, first_line, read_weights
from .model import CSPResNet50, build_model
from .recipe_files import recipe_from_dict

CLASSIFIER = ("head.fc.weight", "head.fc.bias")
HUB_PREFIX = "hf-hub:"  # timm's: timm.create_model("hf-hub:timm/cspresnet50.ra_in1k")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # the files timm's load_state_dict_from_hf takes, in its order


def pretrained_name(model: str) -> str:
    """timm's --model NAME, checked: cspresnet50 (its default published weights) or one of timm's names for them."""
    names = timm.list_pretrained("cspresnet50.*")
    if model == "cspresnet50":
        return f"cspresnet50.{timm.models.get_pretrained_cfg(model).tag}"
    if model not in names:
        raise OptionError(f"--model {model}: this project has CSPResNet-50 only; allowed: cspresnet50, "
                          f"{', '.join(names)}")
    return model


def hub_repo(name: str) -> Optional[str]:
    """The hub repository (REPO[@REVISION]) that `hf-hub:REPO[@REVISION]` or timm's name (cspresnet50.ra_in1k) names;
    None for a file path."""
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX):]
    return timm.models.get_pretrained_cfg(name).hf_hub_id if name in timm.list_pretrained("cspresnet50.*") else None


def weights_file(name: str) -> Path:
    """A file path as it is; a hub name (hub_repo) as the file timm would load, through huggingface_hub's own
    download and cache, which honour HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN themselves."""
    repo = hub_repo(name)
    if repo is None:
        return Path(name).expanduser()
    repo_id, _, revision = repo.partition("@")
    absent = []  # of HUB_FILES, those the hub says the repository lacks
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except LocalEntryNotFoundError:  # not in the cache, and the hub out of reach
            continue
        except RemoteEntryNotFoundError:
            absent.append(filename)
        except HFValidationError as exc:
            raise CheckpointError(f"{name}: not a hub repository name ({first_line(exc)})") from None
        except HfHubHTTPError as exc:
            raise CheckpointError(f"{name}: the Hugging Face hub refused it ({first_line(exc)}); a private or gated "
                                  f"repository needs HF_TOKEN") from None
    if len(absent) == len(HUB_FILES):
        raise CheckpointError(f"{name}: the hub repository {repo_id} holds neither {' nor '.join(HUB_FILES)}")
    why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection"
    raise CheckpointError(f"{name} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and the hub cannot be "
                          f"reached ({why}): fetch it where it can, into the same HF_HOME, with `hf download {repo_id} "
                          f"{HUB_FILES[0]}`")


def num_classes_of(state_dict: Dict[str, torch.Tensor]) -> int:
    """The classifier's output count; 1000 when there is no CSPResNet-50 classifier, so that
    loading such weights fails with the full list of keys that do not fit."""
    weight = state_dict.get("head.fc.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else 1000


def check_keys(expected: Dict[str, torch.Tensor], state_dict: Dict[str, torch.Tensor]) -> None:
    """One readable message instead of load_state_dict's wall of keys."""
    problems = {"missing keys": sorted(set(expected) - set(state_dict)),
                "unexpected keys": sorted(set(state_dict) - set(expected)),
                "wrong shapes": sorted(k for k in set(expected) & set(state_dict)
                                       if expected[k].shape != state_dict[k].shape)}
    parts = [f"{what}: {len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
             for what, keys in problems.items() if keys]
    if parts:
        raise CheckpointError("these weights are not CSPResNet-50's (timm 'cspresnet50' layout): " + "; ".join(parts))


def load_weights_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    check_keys(model.state_dict(), state_dict)
    model.load_state_dict(state_dict, strict=True)


def load_cspresnet(weights: Weights) -> CSPResNet50:
    model = build_model(num_classes_of(weights.state_dict))
    load_weights_strict(model, weights.state_dict)
    return model


def trained_data_config(weights: Weights) -> DataConfig:
    """timm's cspresnet50 defaults (256 px, crop 0.887, bilinear) for weights that carry no recipe."""
    return recipe_from_dict(weights.recipe).data if weights.recipe is not None else DataConfig()


@dataclass
class InitialWeights(Weights):
    path: Path
    sha256: str


def read_initial_weights(path: str, kind: str = "auto", sha256: str = "") -> InitialWeights:
    """Refused now, before any work, when it is not the file `sha256` names or when anything but the
    classifier does not fit CSPResNet-50. `path` may be a hub name (weights_file): the SHA-256 is the file's."""
    try:
        file = weights_file(path)
    except CheckpointError as exc:
        raise CheckpointError(f"recipe key 'model.initial_weights': {exc}") from None
    if not file.is_file():
        raise CheckpointError(f"recipe key 'model.initial_weights': {file} does not exist; give timm's "
                              f"cspresnet50 .pth, a .safetensors, one of our last.pt/best.pt, or a hub name "
                              f"({HUB_PREFIX}timm/cspresnet50.ra_in1k)")
    with open(file, "rb") as handle:
        actual = hashlib.file_digest(handle, "sha256").hexdigest()
    if not actual.startswith(sha256):
        raise CheckpointError(f"recipe key 'model.initial_weights_sha256' is {sha256} but {file} has SHA-256 "
                              f"{actual}: not the file the recipe names")
    weights = read_weights(file, kind)
    state_dict = weights.state_dict
    with torch.device("meta"):  # the shapes only, without allocating or initialising a model
        expected = CSPResNet50(num_classes=1).state_dict()
    backbone = {k: v for k, v in expected.items() if k not in CLASSIFIER}
    check_keys(backbone, {k: v for k, v in state_dict.items() if k not in CLASSIFIER})
    weight = state_dict.get(CLASSIFIER[0])
    if weight is not None and (weight.ndim != 2 or weight.shape[1] != expected[CLASSIFIER[0]].shape[1]):
        check_keys(expected, state_dict)  # a classifier on other features: names it a wrong shape
    return InitialWeights(**vars(weights), path=file, sha256=actual)


def apply_initial_weights(initial: InitialWeights, models: Sequence[nn.Module], classes: Sequence[str]) -> str:
    """Into the model and its EMA, strictly; the classifier only when it is for the same classes, else
    the models keep their freshly initialised one. Returns the line that says which."""
    own = models[0].state_dict()
    keep, why = classifier_fits(initial, own, classes)
    loaded = {k: v for k, v in initial.state_dict.items() if keep or k not in CLASSIFIER}
    if not keep:
        loaded.update({k: own[k] for k in CLASSIFIER})
    for model in models:
        model.load_state_dict(loaded, strict=True)
    return (f"initial weights: {initial.path} ({initial.kind} weights, SHA-256 {initial.sha256[:16]}...): "
            f"{len(loaded) - (0 if keep else len(CLASSIFIER))} tensors loaded; {why}")


def classifier_fits(initial: InitialWeights, own: Dict[str, torch.Tensor], classes: Sequence[str]) -> Tuple[bool, str]:
    """Whether the file's classifier is for these classes, and the reason in words."""
    theirs = [initial.state_dict.get(k) for k in CLASSIFIER]
    if theirs[0] is None or theirs[1] is None:
        return False, f"the file has no classifier: {', '.join(CLASSIFIER)} initialised for {len(classes)} classes"
    shapes = " and ".join(f"{k} {tuple(t.shape)} -> {tuple(own[k].shape)}" for k, t in zip(CLASSIFIER, theirs))
    if theirs[0].shape[0] != len(classes):
        return False, (f"classifier re-initialised, {shapes}: the file has {theirs[0].shape[0]} classes, the "
                       f"data {len(classes)}")
    if initial.classes is not None and list(initial.classes) != list(classes):
        differ = next((i for i, (a, b) in enumerate(zip(initial.classes, classes)) if a != b), None)
        example = (f"class {differ} is {initial.classes[differ]!r} there, {classes[differ]!r} here"
                   if differ is not None else f"it names {len(initial.classes)}")
        return False, f"classifier re-initialised, {shapes}: the file's classes are not the data's ({example})"
    return True, f"classifier kept: {len(classes)} classes, as the data's"
