"""Robust image decoding: any file PIL can read becomes an RGB uint8 image, anything else a `BadImage`.

Mode handling follows torchvision's ImageFolder loader (`img.convert('RGB')`, so alpha is dropped and
CMYK / grey / palette images are converted), except that 16-bit greys (`I;16*`, `I`) are scaled to 8 bits
(`>> 8`) instead of being clipped to white. Truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES is
left off). Images above `max_pixels` are decoded at a reduced size when the format allows it without a
full-size buffer (JPEG DCT scaling via `draft`, by 2, 4 or 8) and are otherwise rejected.
"""
import io
import math
import os
import re
import warnings

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # about 9200 x 6900; an RGB buffer of 192 MB
MAX_FILE_BYTES = 1 << 30          # files above max(this, 8 bytes x max_pixels) are not read

# PIL's own checks duplicate (DecompressionBombWarning) or only describe (EXIF, palette transparency) what
# is handled here; left on, one odd image in a million would print a warning from every worker thread.
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
warnings.filterwarnings('ignore', message=r'(Possibly )?[Cc]orrupt EXIF', category=UserWarning)
warnings.filterwarnings('ignore', message=r'Palette images with Transparency', category=UserWarning)
warnings.filterwarnings('ignore', message=r'Truncated File Read', category=UserWarning)


class BadImage(Exception):
  """An example that cannot be decoded into an image; the message says why."""


def _to_rgb(image):
  mode = image.mode
  if mode == 'RGB':
    return image
  if mode.startswith('I;16') or mode == 'I':
    values = np.asarray(image)
    if mode == 'I':
      values = np.clip(values, 0, 65535)
    return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), 'L').convert('RGB')
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  return image.convert('RGB')


def open_rgb(file, max_pixels=DEFAULT_MAX_PIXELS):
  """Decodes a path or bytes into a loaded RGB `PIL.Image`; raises BadImage with the reason."""
  if isinstance(file, (str, os.PathLike)):
    try:
      with open(file, 'rb') as f:  # one read; PIL then parses memory, and no file handle outlives this call
        size = os.fstat(f.fileno()).st_size
        if size > max(MAX_FILE_BYTES, 8 * max_pixels):
          raise BadImage(f'file of {size} bytes is too large for an image of at most {max_pixels} pixels')
        file = f.read()
    except OSError as e:
      raise BadImage(f'unreadable: {e}') from None
  if not len(file):
    raise BadImage('empty (0 bytes)')
  try:
    image = Image.open(io.BytesIO(file))
    width, height = image.size
    if width * height > max_pixels:
      factor = next((f for f in (2, 4, 8) if math.ceil(width / f) * math.ceil(height / f) <= max_pixels), None)
      if image.format != 'JPEG' or factor is None:
        raise BadImage(f'{width}x{height} = {width * height} pixels exceeds config.data.max_pixels={max_pixels}')
      image.draft('RGB', (width // factor, height // factor))  # libjpeg decodes at 1/factor: no full-size buffer
    image.load()
    if image.width <= 0 or image.height <= 0:
      raise BadImage(f'invalid size {image.width}x{image.height}')
    return _to_rgb(image)
  except BadImage:
    raise
  except Image.DecompressionBombError as e:
    raise BadImage(f'too large: {e}') from None
  except Exception as e:  # PIL raises many types on corrupt data (OSError, ValueError, SyntaxError, struct.error...)
    message = re.sub(r' <_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', str(e))  # the path is named by the caller
    raise BadImage(f'{type(e).__name__}: {message}') from None


def check_image_array(image):
  """An in-memory (H, W, 3) uint8 array is used as is; other arrays raise BadImage."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise BadImage(f'expected a (H, W, 3) uint8 array, got {image.shape} {image.dtype}')
  return image
