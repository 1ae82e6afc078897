"""Where datasets and run outputs live.

Every path has a default relative to this repository and can be moved with an
environment variable; all of them share the prefix ``GET_``:

==================  =============================  ==========================
variable            used by                        default
==================  =============================  ==========================
GET_CIFAR10_ROOT    cifar10                        ./datasets/cifar10
GET_CIFAR100_ROOT   cifar100                       ./datasets/cifar100
GET_IMAGENET_ROOT   imagenet_100 and imagenet_1k   ./datasets/imagenet
GET_CUB_ROOT        cub                            ./datasets/cub
GET_SCARS_ROOT      scars                          ./datasets/stanford_cars
GET_AIRCRAFT_ROOT   aircraft                       ./datasets/fgvc-aircraft-2013b
GET_HERB19_ROOT     herbarium_19                   ./datasets/herbarium_19
GET_FOLDER_ROOT     folder (your own images)       ./datasets/folder
GET_OUTPUT_ROOT     run folders                    ./outputs
==================  =============================  ==========================

Precedence: an explicit argument (``--data_root`` / ``--exp_root``) beats
the environment variable, which beats the default. Relative paths given by
argument or variable are taken relative to the current working directory.
The ``digits`` demo is built into scikit-learn and has no root.

Example::

    GET_CUB_ROOT=$HOME/datasets/CUB python train.py --dataset_name cub

It also knows the CLIP architectures: open_clip's, and those whose configs are in
``model_configs/`` (``GET-tiny``, ``GET-tiny-digits``; a JSON file there in open_clip's
format adds one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
ENV_PREFIX = "GET_"
MODEL_CONFIG_DIR = REPO_ROOT / "model_configs"

@dataclass(frozen=True)
class Dataset:
    """A dataset train.py knows: where its reader is, and where its files are."""
    reader: str               # "module:name" of its data.data_utils.DatasetSource (or, for the
                              # folder dataset, of the function that makes one from its root)
    env: str | None = None    # its root comes from GET_<env>_ROOT; None: built in, no files
    folder: str | None = None  # the default root: ./datasets/<folder>


# Every dataset of --dataset_name. A new one: a module under data/ with its reader, and a line
# here (docs/extending.md). Both ImageNet variants read the same ImageNet-1k folder.
DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset("data.cifar:CIFAR10", "CIFAR10", "cifar10"),
    "cifar100": Dataset("data.cifar:CIFAR100", "CIFAR100", "cifar100"),
    "imagenet_100": Dataset("data.imagenet:IMAGENET_100", "IMAGENET", "imagenet"),
    "imagenet_1k": Dataset("data.imagenet:IMAGENET_1K", "IMAGENET", "imagenet"),
    "cub": Dataset("data.cub:CUB", "CUB", "cub"),
    "scars": Dataset("data.scars:SCARS", "SCARS", "stanford_cars"),
    "aircraft": Dataset("data.aircraft:AIRCRAFT", "AIRCRAFT", "fgvc-aircraft-2013b"),
    "herbarium_19": Dataset("data.herbarium_19:HERBARIUM_19", "HERB19", "herbarium_19"),
    "digits": Dataset("data.digits:DIGITS"),                            # scikit-learn's, in memory
    "folder": Dataset("data.folder:folder_source", "FOLDER", "folder"),  # your own images
}


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)


def check_dataset_name(name: str) -> Dataset:
    """The entry of dataset ``name``; ValueError naming the valid choices if it is unknown."""
    if name not in DATASETS:
        raise ValueError(
            f"Unknown dataset name {name!r}; expected one of: {', '.join(DATASETS)} "
            "(set it with --dataset_name)."
        )
    return DATASETS[name]


def is_builtin(name: str) -> bool:
    """Whether dataset ``name`` is made in memory and reads no file."""
    return check_dataset_name(name).env is None


def _root_entry(name: str) -> Dataset:
    """The entry of a dataset that lives on disk; ValueError otherwise."""
    if is_builtin(name):
        raise ValueError(
            f"Dataset {name!r} is built in and has no root folder; --data_root is ignored for it."
        )
    return DATASETS[name]


def root_env_var(name: str) -> str:
    """Name of the environment variable that sets the root of dataset ``name``."""
    return f"{ENV_PREFIX}{_root_entry(name).env}_ROOT"


def _from_env(variable: str) -> Path | None:
    """The path in environment variable ``variable``, or None when unset or empty."""
    value = os.environ.get(variable, "").strip()
    return Path(value).expanduser() if value else None


def dataset_root(name: str, override: str | os.PathLike | None = None) -> Path:
    """Root folder of dataset ``name``: ``override``, else its ``GET_*_ROOT``, else ./datasets/<dir>."""
    entry = _root_entry(name)
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    return _from_env(root_env_var(name)) or REPO_ROOT / "datasets" / entry.folder


def output_root(override: str | os.PathLike | None = None) -> Path:
    """Folder that holds run folders: ``override``, else ``GET_OUTPUT_ROOT``, else ./outputs."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    return _from_env(f"{ENV_PREFIX}OUTPUT_ROOT") or REPO_ROOT / "outputs"


def register_model_configs() -> None:
    """Make the architectures of ``model_configs/`` known to open_clip (new files too); idempotent.

    ``GET-tiny``: a 4-block ViT (32x32 images, patch 8, width 64) and a 2-block text transformer
    with the real CLIP vocabulary and tokenizer, embedding size 32, no pretrained weights (its
    random init follows the global torch RNG). ``GET-tiny-digits``: the same ViT with a narrower
    text tower (width 32, 16 tokens), the architecture of the demo's pretrained weights
    ``weights/GET-tiny-digits.pt`` (scripts/pretrain_tiny_clip.py).
    """
    import open_clip  # here, not at the top: the scripts' dataset check imports this module alone

    known = set(open_clip.list_models())
    if any(path.stem not in known for path in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def clip_config(model_name: str) -> dict:
    """The config of an open_clip architecture (``ViT-B/16`` or ``ViT-B-16``)."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture {model_name!r} (flag --clip_model); known ones "
                         f"include ViT-B-16 and those in {MODEL_CONFIG_DIR.name}/ (GET-tiny)")
    return cfg


def clip_vision_config(model_name: str) -> dict:
    """The image-encoder config of an open_clip architecture."""
    return clip_config(model_name)["vision_cfg"]


def vision_image_size(model_name: str) -> int:
    """Input resolution (pixels per side) of an open_clip architecture, read from its config."""
    size = clip_vision_config(model_name)["image_size"]
    return size[0] if isinstance(size, (tuple, list)) else size


# What GET splits and feeds (backbone.py, model.py): a plain ViT that pools its class token after
# ln_post, and CLIP's own text transformer, read at the end-of-text token of CLIP's tokenizer.
SUPPORTED_CLIPS = "the ViTs of OpenAI's CLIP layout, e.g. ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-g-14"


def vision_depth(model_name: str) -> int:
    """Number of transformer blocks of the image encoder of an open_clip ViT architecture.

    Raises ValueError for an unknown name or an architecture whose towers GET cannot use,
    before any weights are loaded.
    """
    cfg = clip_config(model_name)
    problem = clip_layout_problem(cfg)
    if problem:
        raise ValueError(f"--clip_model {model_name!r} {problem}; GET supports {SUPPORTED_CLIPS} (README, "
                         "\"Other CLIPs\")")
    return cfg["vision_cfg"]["layers"]


def clip_layout_problem(cfg: dict) -> str | None:
    """Why an open_clip config's towers do not fit GET, or None."""
    vision, text = cfg["vision_cfg"], cfg.get("text_cfg", {})
    if not isinstance(vision.get("layers"), int) or "timm_model_name" in vision:
        return "does not have a plain ViT image encoder"
    if (vision.get("pool_type", "tok") != "tok" or vision.get("attentional_pool") or vision.get("final_ln_after_pool")
            or vision.get("global_average_pool")):
        return "pools its image tokens otherwise than by the class token after ln_post"
    if cfg.get("custom_text") or "hf_model_name" in text or text.get("pool_type", "argmax") != "argmax" \
            or text.get("no_causal_mask"):
        return "does not have CLIP's own text transformer read at the end-of-text token"
    return None
