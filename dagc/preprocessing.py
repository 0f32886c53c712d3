"""Preprocessing shared by training data and deployment: the one image resize.

Training readers (`dagc.trainer.readers`) and `dagc run` (`dagc.runtime.images`) both resize with
`resize_chw`, so a model sees the same pixels in training and in deployment.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["resize_chw"]


def resize_chw(chw: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Takes (C, h, w) and (H, W); returns float32 (C, H, W) resized per channel with Pillow
    (mode "F"), bilinearly, or by nearest neighbour (labels and masks). The one resize of dagc:
    `dagc run` applies it to pictures and the dataset readers to training data, so training and
    deployment agree."""
    chw = chw.astype(np.float32, copy=False)
    if chw.shape[1:] == tuple(size):
        return chw
    method = Image.NEAREST if nearest else Image.BILINEAR
    h, w = size
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(ch), mode="F").resize((w, h), method),
                                dtype=np.float32) for ch in chw])
