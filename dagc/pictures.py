"""Decoding a picture file (PNG, JPEG, ...) with Pillow, once for every reader: the training
datasets (`dagc.trainer.files`) and `dagc run` (`dagc.runtime.images`). A header that claims more
than `MAX_PIXELS` pixels is refused before anything is decoded (a decompression bomb), and every
failure is a `PictureError` naming the file, which each caller turns into its own error type."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["MAX_PIXELS", "PictureError", "PictureTooLarge", "decode_picture"]

# The largest picture dagc decodes, in pixels (about 7000 x 7000).
MAX_PIXELS = 50_000_000


class PictureError(ValueError):
    """A picture file that cannot be decoded; the message names the file."""


class PictureTooLarge(PictureError):
    """A picture whose header claims more than `MAX_PIXELS` pixels; ``size`` is (W, H) when the
    header was read, else None (Pillow refused it first)."""

    def __init__(self, path: Path, size: tuple[int, int] | None) -> None:
        claims = f"{size[0]} x {size[1]} pixels" if size is not None else "more pixels than that"
        super().__init__(f"{path}: the image's header claims {claims}, above the {MAX_PIXELS:,} pixels dagc "
                         "decodes (a decompression bomb, or a picture to resize first)")
        self.size = size


def decode_picture(path: Path, convert: Callable[[str], str | None] | None = None) -> tuple[np.ndarray, str]:
    """Takes a picture file and, optionally, a function from its mode to the mode to convert it to
    (None: keep it); returns its pixels (H, W[, C]) and their mode (``L``, ``RGB``, ``I;16``...).
    Raises PictureTooLarge for a header above `MAX_PIXELS`, PictureError for a missing, truncated
    or unreadable file."""
    from PIL import Image, UnidentifiedImageError  # only readers of pictures need Pillow

    try:
        # Pillow's own bomb check runs in open() (a warning above its limit, an error above twice
        # it); both limits are above MAX_PIXELS, so the check below is the one that decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise PictureTooLarge(path, im.size)
                im.load()
                target = convert(im.mode) if convert is not None else None
                out = im.convert(target) if target and target != im.mode else im
                return np.asarray(out), out.mode
    except Image.DecompressionBombError:
        raise PictureTooLarge(path, None) from None
    except FileNotFoundError:
        raise PictureError(f"{path}: file missing") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, PictureError):
            raise
        raise PictureError(f"{path}: cannot read the image ({e}); the file is corrupt, truncated or not an "
                           "image") from None
