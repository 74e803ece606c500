"""The Gemma-3 and LLaVA harvests on 8 fake CPU devices (`mesh.model=4`: parameters sharded by
hf.load's rule on a 2 x 4 mesh, as the Qwen3-VL port's sharded test) store the same rows and
index as on one device, for a vision, the projector and a text site."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from csae_jax.sources import harvest
from csae_jax.vlms import registry
from experiments.configs import harvest as harvest_config
from tests.sources.test_harvest_gemma3 import save_tiny_tokenizer as gemma3_tokenizer
from tests.sources.test_harvest_llava import save_tiny_tokenizer as llava_tokenizer
from tests.vlms import tiny_gemma3, tiny_llava

skimage_data = pytest.importorskip('skimage.data')

SITES = ('vision_block_1', 'vision_projector', 'text_layer_1')
PORTS = {'gemma-3': (tiny_gemma3.make_tiny_gemma3, gemma3_tokenizer),
         'llava-1.5': (tiny_llava.make_tiny_llava, llava_tokenizer)}


def _harvest(model: str, folder: str, images: str, wd: str, mesh_model: int) -> dict:
  c = harvest_config.get_config()
  c.update_from_flattened_dict({
      'model': model, 'model_path': folder, 'images': images, 'batch_size': 2,
      'chunk_images': 2, 'sites': ','.join(s.replace('_', '/', 1) for s in SITES),
      'mesh.model': mesh_model})
  harvest.run(c, wd)
  out = {}
  for site in SITES:
    d = os.path.join(wd, 'activations', site)
    out[site] = np.concatenate([np.load(os.path.join(d, f)) for f in sorted(os.listdir(d))
                                if f.endswith('.npy') and 'shard' in f])
    with np.load(os.path.join(d, 'index.npz')) as z:
      out[site + '/index'] = {k: z[k] for k in z.files}
  return out


@pytest.mark.parametrize('model', list(PORTS))
def test_mesh_harvest_equals_one_device(model, tmp_path, monkeypatch):
  assert len(jax.devices()) == 8
  make, save_tokenizer = PORTS[model]
  folder = str(tmp_path / 'model')
  make(folder)
  save_tokenizer(folder)
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('astronaut', 'coffee', 'chelsea'):  # 3 images in batches of 2: a padded batch
    Image.fromarray(getattr(skimage_data, name)()).save(images / f'{name}.png')
  one = _harvest(model, folder, str(images), str(tmp_path / 'one'), 1)
  loaded = []
  load = registry.load
  monkeypatch.setattr(registry, 'load', lambda *a, **k: loaded.append(load(*a, **k)) or
                      loaded[-1])
  meshed = _harvest(model, folder, str(images), str(tmp_path / 'mesh'), 4)
  # the mesh run really placed its weights on all 8 devices
  (net,) = loaded
  kernel = net.language_model.layers[0].mlp.up_proj.kernel[...]
  assert len(kernel.sharding.device_set) == 8, kernel.sharding
  for site in SITES:
    assert meshed[site].shape == one[site].shape and len(one[site]) > 0
    # the parity tolerance: sharded contractions sum in another order (measured ~1e-5 on
    # text rows of magnitude ~7)
    np.testing.assert_allclose(meshed[site], one[site], atol=1e-4, err_msg=site)
    for k, v in one[site + '/index'].items():
      np.testing.assert_array_equal(meshed[site + '/index'][k], v, err_msg=f'{site} {k}')
