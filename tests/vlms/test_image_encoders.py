"""SigLIP and CLIP alone as HMS reference embeddings (`vlms.image_encoders`): on tiny random
transformers checkpoints of every layout (dual encoder, vision-only; one saved as a sharded
index), `vision/embedding` equals `get_image_features` and the blocks equal the hidden states,
on transformers' own image processor's pixels, which the torch-free preprocessors reproduce;
through `evals.embeddings` (the HMS route) each harvested image gets its own image's features."""

import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from csae_jax.evals import embeddings
from csae_jax.sources import harvest
from csae_jax.vlms import hf, registry
from experiments.configs import harvest as harvest_config
from tests.vlms.conftest import _reinit

skimage_data = pytest.importorskip('skimage.data')

S = 32
# 4 heads of 8 (a head split bug shows), 3 layers (block_1 is neither the first nor the last)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=S, patch_size=8)
# 36 px in 8 px patches: 4 x 4 patches and 4 px dropped, as SigLIP so400m's 384 px in 14 px
S_ODD = 36
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=64)
PHOTOS = ('astronaut', 'coffee', 'chelsea')  # square, wide, wide: resize and crop matter


def _siglip_processor(s=S):
  return transformers.SiglipImageProcessorPil(size={'height': s, 'width': s})


def _clip_processor():
  return transformers.CLIPImageProcessorPil(size={'shortest_edge': S},
                                            crop_size={'height': S, 'width': S})


KINDS = {  # name -> (port, model class, config, image processor)
    'SiglipModel': ('siglip', transformers.SiglipModel, lambda: transformers.SiglipConfig(
        vision_config=VISION, text_config=TEXT), _siglip_processor),
    'SiglipVisionModel': ('siglip', transformers.SiglipVisionModel,
                          lambda: transformers.SiglipVisionConfig(**{**VISION,
                                                                     'image_size': S_ODD}),
                          lambda: _siglip_processor(S_ODD)),
    'CLIPModel': ('clip', transformers.CLIPModel, lambda: transformers.CLIPConfig(
        vision_config=VISION, text_config=TEXT, projection_dim=16), _clip_processor),
    'CLIPVisionModelWithProjection': (
        'clip', transformers.CLIPVisionModelWithProjection,
        lambda: transformers.CLIPVisionConfig(**VISION, projection_dim=16), _clip_processor),
}


def _save(kind: str, folder: str, **save_kw):
  port, cls, config, processor = KINDS[kind]
  torch.manual_seed(0)
  model = cls(config()).eval()
  _reinit(model, 0)
  model.save_pretrained(folder, **save_kw)
  processor().save_pretrained(folder)
  return port, model, processor()


def _reference(model, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """transformers' image features [B, E] and the tower's hidden states."""
  x = torch.from_numpy(pixels)
  with torch.no_grad():
    if hasattr(model, 'get_image_features'):
      feats = model.get_image_features(pixel_values=x).pooler_output
    elif hasattr(model, 'visual_projection'):
      feats = model(pixel_values=x).image_embeds
    else:
      feats = model(pixel_values=x).pooler_output
    tower = getattr(model, 'vision_model', model)
    hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states
  return feats.numpy(), [h.numpy() for h in hidden]


def _photos():
  return [Image.fromarray(getattr(skimage_data, p)()) for p in PHOTOS]


@pytest.mark.parametrize('kind', list(KINDS))
def test_embedding_matches_get_image_features(kind, tmp_path):
  folder = str(tmp_path / 'model')
  # one layout as a sharded index: the loader reads both
  port, model, processor = _save(kind, folder, **(
      {'max_shard_size': 20_000} if kind == 'SiglipModel' else {}))
  if kind == 'SiglipModel':
    assert os.path.exists(os.path.join(folder, 'model.safetensors.index.json'))
  ims = _photos()
  want_px = np.asarray(processor(images=ims, return_tensors='np')['pixel_values'], np.float32)
  pre = registry.preprocessor(registry.PORTS[port], folder)
  pixels, grid = pre.images(ims)
  np.testing.assert_allclose(pixels, want_px, atol=1e-5)  # same resample, crop, mean / std
  feats, hidden = _reference(model, want_px)
  net = registry.load(registry.PORTS[port], folder)
  out = net.vision_forward(want_px, grid, sites=('vision/block_1', 'vision/embedding'))
  emb = np.asarray(out['vision/embedding'])
  assert emb.shape == (len(ims), 1, feats.shape[1])
  err = float(np.abs(emb[:, 0] - feats).max())
  assert err < 1e-4, f'{kind} embedding: max abs diff {err:.3g} (features ~{np.abs(feats).max():.2g})'
  assert float(np.abs(np.asarray(out['vision/block_1']) - hidden[2]).max()) < 1e-4
  assert np.abs(feats[0] - feats[1]).max() > 1e-2  # images that differ, features that differ


def test_hms_embeddings_follow_the_harvest_image_ids(tmp_path):
  """A harvest of the CLIP encoder's block, then the reference embeddings of its images by
  `evals.embeddings` (compare.embedding_model=clip): row i is image id i's features."""
  folder = str(tmp_path / 'model')
  _, model, processor = _save('CLIPModel', folder)
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  for name, im in zip(PHOTOS, _photos()):
    im.save(image_dir / f'{name}.png')
  c = harvest_config.get_config()
  c.update_from_flattened_dict({'model': 'clip', 'model_path': folder, 'images': str(image_dir),
                                'batch_size': 2, 'chunk_images': 2, 'sites': 'vision/block_1'})
  wd = str(tmp_path / 'harvest')
  harvest.run(c, wd)
  emb_ie = embeddings.port_embeddings(wd, 'clip-vit-large-patch14-336', folder, batch_size=2)
  rec = embeddings.recorded_harvest(wd)
  ims = [Image.open(image_dir / f) for f in rec['files']]
  feats, _ = _reference(model, np.asarray(processor(images=ims, return_tensors='np')
                                          ['pixel_values'], np.float32))
  assert emb_ie.shape == feats.shape
  np.testing.assert_allclose(emb_ie, feats, atol=1e-4)


def test_mistakes_are_named(tmp_path):
  folder = str(tmp_path / 'model')
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(folder)
  _clip_processor().save_pretrained(folder)
  net = registry.load(registry.PORTS['clip'], folder)  # the tower loads without a projection
  pixels, grid = registry.preprocessor(registry.PORTS['clip'], folder).images(_photos()[:1])
  assert net.vision_forward(pixels, grid, sites=('vision/block_2',))['vision/block_2'].shape == (
      1, 1 + (S // 8) ** 2, 32)
  with pytest.raises(ValueError, match='no visual_projection'):
    net.vision_forward(pixels, grid, sites=('vision/embedding',))
  with pytest.raises(ValueError, match=r"unknown site\(s\) \['text/layer_0'\].*no text sites"):
    net.vision_forward(pixels, grid, sites=('text/layer_0',))
  with pytest.raises(ValueError, match='image_size=64.*takes 32x32'):
    registry.preprocessor(registry.PORTS['clip'], folder, 64)


def test_a_site_the_encoder_lacks_is_named_with_its_sites(tmp_path):
  folder = str(tmp_path / 'model')
  _save('SiglipVisionModel', folder)
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  _photos()[0].save(image_dir / 'a.png')
  c = harvest_config.get_config()
  c.update_from_flattened_dict({'model': 'siglip', 'model_path': folder, 'images': str(image_dir),
                                'batch_size': 1, 'chunk_images': 1})  # default site: the embedding
  harvest.run(c, str(tmp_path / 'harvest'))
  site_dir = tmp_path / 'harvest' / 'activations' / 'vision_embedding'
  with np.load(site_dir / 'index.npz') as z:  # one row per image, on no grid cell
    assert z['image_id'].tolist() == [0] and z['row'].tolist() == [-1]
  with pytest.raises(ValueError, match=r"'vision/merger' is not a site of 'siglip' \(its sites: "
                     r"vision/patch_embed, vision/block_\{i\}, vision/post_layernorm, "
                     r"vision/embedding\)"):
    embeddings.port_embeddings(str(tmp_path / 'harvest'), 'siglip', folder, 'vision/merger')


# The vision halves of config.json of google/siglip-so400m-patch14-384 and
# openai/clip-vit-large-patch14-336 as published (fields at HF's defaults left out, as there).
PUBLISHED = {
    'siglip-so400m-patch14-384': (
        transformers.SiglipVisionModel, transformers.SiglipVisionConfig,
        dict(hidden_size=1152, image_size=384, intermediate_size=4304, num_attention_heads=16,
             num_hidden_layers=27, patch_size=14)),
    'clip-vit-large-patch14-336': (
        transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionConfig,
        dict(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
             num_hidden_layers=24, patch_size=14, projection_dim=768)),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_config_eval_shape_matches_transformers(name):
  """The full-size encoders built abstractly: transformers' parameter count (meta device) and
  exactly its tensor names, in every layout the loader accepts."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from csae_jax.vlms import image_encoders  # pylint: disable=g-import-not-at-top
  hf_cls, hf_cfg, config = PUBLISHED[name]
  port, _ = registry.resolve(name)
  cls = image_encoders.SiglipEncoder if port.name == 'siglip' else image_encoders.ClipEncoder
  abstract = nnx.eval_shape(lambda: cls(config))
  params = nnx.state(abstract, nnx.Param)
  n_port = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with torch.device('meta'):
    ref = hf_cls(hf_cfg(**config))
  assert n_port == sum(p.numel() for p in ref.parameters())
  stored = set(hf.canonical_names(ref.state_dict(), image_encoders.LAYOUTS))
  names = abstract.name_map()
  assert set(names) == stored
  assert {tuple(p) for p, _ in nnx.to_flat_state(params)} == {p for p, _ in names.values()}
  print(f'{name}: {n_port:,} parameters')
