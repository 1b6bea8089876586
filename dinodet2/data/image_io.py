"""Reading images as Detectron2's ``read_image`` does, plus correct high-bit-depth pixels.

Detectron2's ``detection_utils.read_image`` converts with PIL's ``Image.convert``, which *clamps*
16-bit grayscale ("I;16") and 32-bit integer ("I") pixels to 255 and truncates float ("F") ones,
so such images train silently as near-white (or near-black) frames. :func:`read_image` keeps
everything else of Detectron2's reader (same arguments and output, EXIF orientation applied,
every 8-bit mode PIL converts -- grayscale, palette, RGBA, CMYK... -- converted as before) and

* scales 16-bit grayscale to 8 bits (``round(value * 255 / 65535)``); 16-bit RGB / RGBA PNGs and
  TIFFs already arrive as 8-bit "RGB" / "RGBA" from PIL (the high byte) and need nothing;
* maps 32-bit integer and float grayscale by their value range: [0, 1] (float only) -> x 255,
  [0, 255] -> as is, [0, 65535] -> x 255 / 65535; anything else is rejected;
* raises :class:`UnreadableImageError` (an ``OSError``) for a file that cannot be opened or decoded,
  whatever PIL / Detectron2 raised (``OSError``, or ``ValueError`` as Detectron2's newer
  ``read_image`` does), and :class:`UnsupportedImageError` (a ``ValueError``) for pixels it cannot
  map to 8 bits -- both naming the file.
"""
from typing import Optional

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = ["UnreadableImageError", "UnsupportedImageError", "read_image", "to_8bit"]

_EXIF_ORIENTATION = 0x0112  # the EXIF "Orientation" tag
# PIL modes of unsigned 16-bit grayscale (native, little- and big-endian).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What opening / decoding a bad file raises (PIL: OSError incl. UnidentifiedImageError and
# truncation, SyntaxError / EOFError from some plugins, DecompressionBombError for huge images;
# PathManager / newer Detectron2: ValueError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_HOW_TO_CONVERT = (
    "Convert it to an 8-bit RGB or grayscale PNG/JPEG, e.g. "
    "`Image.fromarray(np.clip(pixels * 255.0 / pixels.max(), 0, 255).round().astype(np.uint8)).save('x.png')` "
    "with PIL and numpy, scaling the way that suits your data."
)


class UnreadableImageError(OSError):
    """An image file that cannot be opened or decoded (missing, truncated, not an image)."""


class UnsupportedImageError(ValueError):
    """An image whose pixels cannot be converted to 8 bits (an unusual mode or value range)."""


def read_image(file_name: str, format: str = None) -> np.ndarray:
    """Detectron2's ``read_image`` (same arguments, HWC output in ``format`` -- "BGR", "RGB",
    "L", "YUV-BT.601" or a PIL mode -- with EXIF orientation applied) that decodes 16-bit,
    32-bit integer and float grayscale images correctly (see the module docstring).

    Raises:
        UnreadableImageError: the file cannot be opened or decoded.
        UnsupportedImageError: its pixels cannot be converted to 8 bits.
    """
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, while the file is open: truncation shows up here
    except _DECODE_ERRORS as e:
        raise UnreadableImageError(f"Cannot read image '{file_name}' ({type(e).__name__}: {e}).") from e
    file_format = image.format  # e.g. "PNG"; the re-oriented copy no longer carries it
    image = to_8bit(_apply_exif_orientation(image), file_name, file_format=file_format)
    try:
        return utils.convert_PIL_to_numpy(image, format)
    except ValueError as e:  # PIL has no conversion from this mode to `format`
        raise UnsupportedImageError(
            f"Image '{file_name}' has PIL mode '{image.mode}', which PIL cannot convert to '{format}' "
            f"({e}). {_HOW_TO_CONVERT}"
        ) from e


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image as displayed (EXIF orientation applied); as stored if its EXIF is malformed
    (Detectron2's reader does the same, detectron2 issue #1885)."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image  # the common case: no copy
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- any EXIF parsing error: keep the pixels as stored
        return image


def to_8bit(image: Image.Image, file_name: str = "<image>", file_format: Optional[str] = None) -> Image.Image:
    """``image`` with 16-bit / 32-bit integer / float grayscale pixels mapped to an 8-bit "L"
    image (see the module docstring); other modes are returned unchanged. ``file_format``: the
    format the pixels were decoded from (default ``image.format``).

    Raises:
        UnsupportedImageError: integer or float pixels outside every supported range (the message
            names ``file_name`` and how to convert the file).
    """
    if image.mode in _UINT16_MODES:
        return _scaled_to_8bit(np.asarray(image), 65535.0)
    if image.mode not in ("I", "F"):
        return image
    pixels = np.asarray(image)
    if image.mode == "I" and (file_format or image.format) == "PNG":
        # PNG has no 32-bit pixels: older Pillow opens 16-bit grayscale PNGs as "I".
        return _scaled_to_8bit(pixels, 65535.0)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
        full_scale = None
    elif image.mode == "F" and high <= 1.0:
        full_scale = 1.0
    elif high <= 255.0:
        full_scale = 255.0
    elif high <= 65535.0:
        full_scale = 65535.0
    else:
        full_scale = None
    if full_scale is None:
        kind = "32-bit float" if image.mode == "F" else "32-bit integer"
        raise UnsupportedImageError(
            f"Image '{file_name}' has {kind} grayscale pixels (PIL mode '{image.mode}') with values in "
            f"[{low:g}, {high:g}]; dinodet2 maps such pixels to 8 bits only when they lie in "
            f"{'[0, 1], ' if image.mode == 'F' else ''}[0, 255] or [0, 65535]. {_HOW_TO_CONVERT}"
        )
    return _scaled_to_8bit(pixels, full_scale)


def _scaled_to_8bit(pixels: np.ndarray, full_scale: float) -> Image.Image:
    """Grayscale ``pixels`` in [0, full_scale] as an 8-bit "L" image (rounded)."""
    scaled = np.rint(pixels.astype(np.float64) * (255.0 / full_scale))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
