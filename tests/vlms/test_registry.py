"""The registry names the issue's checkpoints with the paper's sites, and a harvest with no
`sites` takes the named checkpoint's site (not its port's)."""

import pytest

from csae_jax.vlms import registry


def test_named_checkpoints_and_their_sites():
  # the paper's sites: Gemma-3 vision layer 26, LLaVA-1.5-13B language layer 39
  assert registry.default_site('gemma-3-4b-it') == 'vision/block_26'
  assert registry.default_site('llava-1.5-13b') == 'text/layer_39'
  assert registry.default_site('LLaVA-1.5-7B') == 'text/layer_31'  # its last of 32 layers
  for name, port in (('siglip-so400m-patch14-384', 'siglip'),
                     ('clip-vit-large-patch14-336', 'clip')):
    p, ckpt = registry.resolve(name)
    assert (p.name, ckpt.name) == (port, name)
    assert registry.default_site(name) == p.embedding_site == 'vision/embedding'
  # a port name (any folder of that family) takes the port's site; short names resolve
  assert registry.default_site('llava') == registry.PORTS['llava-1.5'].default_site
  assert registry.resolve('gemma3')[0].name == 'gemma-3'


def test_unknown_model_lists_the_names():
  with pytest.raises(ValueError, match=r"unknown model 'llava-2'.*clip.*siglip-so400m"):
    registry.resolve('llava-2')
