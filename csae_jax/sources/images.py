"""Image collections for harvesting: a local folder, or a TFDS dataset already on disk.

Both give the same random-access interface (len, image i as RGB PIL, a stable key and a label),
so harvesting is resumable by image index. Nothing is downloaded: a TFDS dataset must already
be prepared under `data_dir` (`tfds.data_source(..., download=False)`, which reads ArrayRecord
files without TensorFlow).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


class ImageFolder:
  """Every image file under `root` (recursive, sorted). The label of an image is its folder
  relative to root (ImageNet / ImageFolder layout: root/<class>/<file>); None at the top."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f'image folder {root!r} does not exist or is not a directory; pass '
                       f'--config.images=DIR of image files (or tfds:NAME with data_dir)')
    files = []
    for dirpath, dirnames, names in os.walk(root):
      dirnames.sort()
      files += [os.path.relpath(os.path.join(dirpath, n), root) for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTS) and not n.startswith('.')]
    files.sort()  # one global order (os.walk lists a folder's files before its subfolders)
    if not files:
      raise ValueError(f'image folder {root!r} holds no images ({", ".join(IMAGE_EXTS)})')
    self.root, self.files = root, files

  def __len__(self) -> int:
    return len(self.files)

  def key(self, i: int) -> str:
    return self.files[i]

  def label(self, i: int) -> str | None:
    parent = os.path.dirname(self.files[i])
    return parent or None

  def load_labelled(self, i: int) -> tuple[Image.Image, str | None]:
    return self.load(i), self.label(i)

  def load(self, i: int) -> Image.Image:
    path = os.path.join(self.root, self.files[i])
    try:
      with Image.open(path) as im:
        return im.convert('RGB')
    except OSError as e:
      raise ValueError(f'cannot read image {path!r} ({e}); remove or replace the file') from e


class TFDSImages:
  """A prepared TFDS dataset: `name` (e.g. 'imagenette/160px'), `split`, images under
  `image_key`, integer labels under `label_key` (mapped to names when the dataset has them)."""

  def __init__(self, name: str, *, data_dir: str, split: str = 'train',
               image_key: str = 'image', label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
    if not data_dir or not os.path.isdir(data_dir):
      raise ValueError(f'TFDS dataset {name!r} needs --config.data_dir, a directory where it is '
                       f'already prepared (nothing is downloaded at run time); got {data_dir!r}')
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self._source = builder.as_data_source(split=split)
    except Exception as e:  # tfds raises many kinds; name them all the same way
      raise ValueError(f'TFDS dataset {name!r} split {split!r} could not be opened from '
                       f'{data_dir!r} ({type(e).__name__}: {e}); prepare it there first '
                       f'(e.g. with `tfds build`), in array_record format') from e
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    try:
      self._names = getattr(builder.info.features[label_key], 'names', None)
    except KeyError:  # unlabelled dataset
      self._names = None

  def __len__(self) -> int:
    return len(self._source)

  def key(self, i: int) -> str:
    return f'{self.name}/{self.split}[{i}]'

  def _record(self, i: int) -> dict:
    rec = self._source[i]
    if self.image_key not in rec:
      raise ValueError(f'TFDS records have no {self.image_key!r} feature (have {sorted(rec)}); '
                       f'set --config.image_key')
    return rec

  def _label_of(self, rec: dict) -> str | None:
    if self.label_key not in rec:
      return None
    v = int(np.asarray(rec[self.label_key]))
    return self._names[v] if self._names else str(v)

  def label(self, i: int) -> str | None:
    return self._label_of(self._source[i])

  def load_labelled(self, i: int) -> tuple[Image.Image, str | None]:
    """Image and label from one record read (a TFDS record decodes whole, image included)."""
    rec = self._record(i)
    return Image.fromarray(np.asarray(rec[self.image_key])).convert('RGB'), self._label_of(rec)

  def load(self, i: int) -> Image.Image:
    return self.load_labelled(i)[0]


def open_images(spec: str, *, data_dir: str = '', split: str = 'train'):
  """'tfds:NAME' -> TFDSImages (prepared under data_dir); anything else -> ImageFolder."""
  if spec.startswith('tfds:'):
    return TFDSImages(spec[len('tfds:'):], data_dir=data_dir, split=split)
  return ImageFolder(spec)
