"""inference: bundles written before a config field existed still load, with its default."""

import json

import pytest

from jaisp_jax import inference
from jaisp_jax.cli import UserError
from jaisp_jax.train import config as config_lib


def test_old_bundle_config_gets_new_fields_defaults_and_keeps_its_values():
  saved = json.loads(config_lib.sized(config_lib.base_config(), 'smoke').to_json_best_effort())
  del saved['model']['global_pool']          # written before the field existed
  saved['model']['trunk']['embed_dim'] = 48  # a value that differs from the default
  c = inference._with_defaults(saved)
  assert c.model.global_pool == 'mean'       # the old behaviour
  assert c.model.trunk.embed_dim == 48
  assert c.model.trunk.depth == 2            # the bundle's smoke value, not base's 6


def test_missing_bundle_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='not an exported jaisp-jax bundle'):
    inference.load(str(tmp_path))


@pytest.fixture(scope='module')
def tiny_bundle(tmp_path_factory):
  """A bundle of a tiny smoke-sized model at initialisation (no training needed)."""
  from jaisp_jax import bands as bands_lib
  from jaisp_jax.train import export
  c = config_lib.sized(config_lib.base_config(), 'smoke')
  c.model.trunk.embed_dim = 16
  c.model.trunk.num_heads = 2
  c.model.trunk.depth = 1
  c.model.predictor.hidden = 32
  registry = bands_lib.BandRegistry.from_config(c.bands)
  params = inference.init_params(c)
  return export.write_bundle(str(tmp_path_factory.mktemp('b') / 'bundle'), params, c,
                             registry, step=0)


@pytest.mark.parametrize('band,hgt,wid', [('rubin_r', 100, 96), ('rubin_r', 37, 53),
                                          ('rubin_r', 8, 8), ('euclid_vis', 64, 48)])
def test_images_not_a_whole_number_of_tokens_are_refused_with_the_stride(
    tiny_bundle, band, hgt, wid):
  import numpy as np
  m = inference.load(tiny_bundle)
  stride = m.registry.stride(band, m.model_config.token_arcsec)  # 16 Rubin, 32 Euclid px
  img = np.zeros((1, 1, hgt, wid), np.float32)
  with pytest.raises(ValueError, match=f'{band} images must be a whole number of '
                                       f'{stride}-px tokens.*got {hgt} x {wid} px'):
    m.get_representation(img, np.ones_like(img), band)
  ok = np.zeros((2, 1, 2 * stride, stride), np.float32)  # a 2 x 1 token grid works
  out = m.get_representation(ok, np.ones_like(ok), band)
  assert out['tokens'].shape == (2, 2, 16) and out['weights'].shape == ok.shape


@pytest.mark.parametrize('name,text,match', [
    ('config.json', '{not json', 'cannot read it as JSON'),
    ('config.json', '[]', 'expected a JSON object'),
    ('bands.json', '{"a": 1}', 'expected a JSON array'),
    ('bands.json', '[{"name": "x"}]', 'not a band registry'),
    ('manifest.json', '', 'cannot read it as JSON'),
    ('manifest.json', '{"format_version": 99}', 'bundle format_version 99; this jaisp-jax '
                                                 'reads format_version 1 to 1'),
    ('manifest.json', '{"format_version": "1"}', "bundle format_version '1'"),
])
def test_a_corrupt_bundle_json_file_is_a_user_error_naming_it(tiny_bundle, tmp_path, name,
                                                              text, match):
  import shutil
  broken = tmp_path / 'broken'
  shutil.copytree(tiny_bundle, broken)
  (broken / name).write_text(text)
  with pytest.raises(UserError, match=f'{name}: {match}'):
    inference.load(str(broken))


def test_a_config_that_does_not_match_the_params_is_a_clear_error(tiny_bundle, tmp_path):
  import shutil
  import numpy as np
  broken = tmp_path / 'edited'
  shutil.copytree(tiny_bundle, broken)
  cfg = json.loads((broken / 'config.json').read_text())
  cfg['model']['trunk']['embed_dim'] = 32  # the params were saved at 16
  (broken / 'config.json').write_text(json.dumps(cfg))
  m = inference.load(str(broken))
  img = np.zeros((1, 1, 32, 32), np.float32)
  with pytest.raises(ValueError, match="config does not match its parameters"):
    m.get_representation(img, np.ones_like(img), 'rubin_r')


def test_export_replaces_a_bundle_but_never_deletes_anything_else(tiny_bundle, tmp_path):
  import os
  import shutil
  from jaisp_jax import bands as bands_lib
  from jaisp_jax.train import export
  m = inference.load(tiny_bundle)
  registry = bands_lib.BandRegistry.from_config(m.config.bands)
  write = lambda d: export.write_bundle(str(d), m.params, m.config, registry, step=7)
  # A previous bundle is replaced (its manifest says the new step).
  again = tmp_path / 'again'
  shutil.copytree(tiny_bundle, again)
  write(again)
  assert json.loads((again / 'manifest.json').read_text())['step'] == 7
  assert os.stat(again).st_mode & 0o055  # readable by others (mkdtemp makes 0700)
  # A folder of other things, or a file, is refused and left as it was.
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'precious.txt').write_text('keep me')
  with pytest.raises(UserError, match='not a jaisp-jax bundle.*refusing to replace it'):
    write(notes)
  assert (notes / 'precious.txt').read_text() == 'keep me'
  afile = tmp_path / 'afile'
  afile.write_text('keep me too')
  with pytest.raises(UserError, match='exists and is not a folder'):
    write(afile)
  assert afile.read_text() == 'keep me too'
  empty = tmp_path / 'empty'
  empty.mkdir()
  write(empty)  # an empty folder is fine
  assert inference.load(str(empty)).manifest['step'] == 7


def _sky(rng, b, hgt, wid):
  """(b, 1, hgt, wid) noise with one bright source per sample, and a unit rms."""
  import numpy as np
  img = rng.normal(size=(b, 1, hgt, wid))
  img[:, :, hgt // 3:hgt // 3 + 4, wid // 2:wid // 2 + 4] += 40.0
  return img, np.ones_like(img)


def test_every_input_form_gives_the_same_float32_representation_every_time(tiny_bundle):
  import jax.numpy as jnp
  import numpy as np
  m = inference.load(tiny_bundle)
  img, rms = _sky(np.random.default_rng(0), 2, 48, 80)  # float64, not square
  ref = m.get_representation(img.astype(np.float32), rms.astype(np.float32), 'rubin_r')
  assert set(ref) >= {'tokens', 'global', 'weights'}
  assert ref['tokens'].shape == (2, 3 * 5, 16) and ref['global'].shape == (2, 16)
  assert ref['weights'].shape == img.shape
  for v in ref.values():
    assert isinstance(v, np.ndarray) and v.dtype == np.float32 and np.all(np.isfinite(v))
  assert 0.0 <= ref['weights'].min() and ref['weights'].max() <= 1.0
  forms = {'float64': (img, rms), 'big-endian': (img.astype('>f4'), rms.astype('>f8')),
           'jax': (jnp.asarray(img, jnp.float32), jnp.asarray(rms, jnp.float32)),
           'lists': (img.astype(np.float32).tolist(), rms.tolist()),
           'again': (img.astype(np.float32), rms.astype(np.float32))}
  for name, (i, r) in forms.items():
    out = m.get_representation(i, r, 'rubin_r')
    for k in ('tokens', 'global', 'weights'):
      np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=f'{name} {k}')
  again = m.get_representation(img.astype(np.float32), rms.astype(np.float32), 'rubin_r')
  for k in ref:
    np.testing.assert_array_equal(again[k], ref[k])  # deterministic


@pytest.mark.parametrize('scale', [1e-45, 1e-40, 1e40, 1e200])
def test_any_flux_unit_gives_the_same_representation(tiny_bundle, scale):
  # float64 inputs outside float32's range used to overflow / flush to inf or 0 when cast
  # before the median-rms normalisation: every pixel masked, a silently empty result.
  import numpy as np
  m = inference.load(tiny_bundle)
  img, rms = _sky(np.random.default_rng(1), 1, 64, 64)
  rms *= 0.7
  ref = m.get_representation(img, rms, 'euclid_vis')
  out = m.get_representation(img * scale, rms * scale, 'euclid_vis')
  assert ref['weights'].max() > 0.5  # the source is seen
  for k in ('tokens', 'global', 'weights'):
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize('band,hgt,wid', [('rubin_g', 32, 96), ('euclid_h', 96, 64)])
def test_a_sample_is_embedded_alike_alone_or_in_a_batch_with_bad_pixels(tiny_bundle, band,
                                                                        hgt, wid):
  import numpy as np
  m = inference.load(tiny_bundle)
  stride = m.registry.stride(band, m.model_config.token_arcsec)
  img, rms = _sky(np.random.default_rng(2), 3, hgt, wid)
  rms[1] *= 30.0           # a much deeper/shallower neighbour
  img[2, 0, :5, :7] = np.nan  # bad pixels in one sample
  img[2, 0, 9, 9] = np.inf
  rms[2, 0, -3:] = 0.0
  rms[2, 0, 10, :4] = -1.0
  out = m.get_representation(img, rms, band)
  assert out['tokens'].shape == (3, (hgt // stride) * (wid // stride), 16)
  for v in out.values():
    assert np.all(np.isfinite(v))
  w = out['weights'][2, 0]
  assert np.all(w[:5, :7] == 0) and w[9, 9] == 0 and np.all(w[-3:] == 0) and np.all(w[10, :4] == 0)
  for i in range(3):
    one = m.get_representation(img[i:i + 1], rms[i:i + 1], band)
    for k in ('tokens', 'global', 'weights'):
      np.testing.assert_allclose(one[k], out[k][i:i + 1], rtol=1e-4, atol=1e-5,
                                 err_msg=f'sample {i} {k}')


def test_bad_band_and_bad_arrays_are_clear_errors(tiny_bundle):
  import numpy as np
  m = inference.load(tiny_bundle)
  img = np.zeros((1, 1, 32, 32), np.float32)
  rms = np.ones_like(img)
  for band, match in [('RUBIN_R', r"unknown band 'RUBIN_R' \(did you mean 'rubin_r'\?\)"),
                      ('VIS', r"did you mean 'euclid_vis'\?"),
                      ('y', r"did you mean 'rubin_y' or 'euclid_y'\?"),
                      ('hst_f606w', r"unknown band 'hst_f606w'; this model knows rubin_u")]:
    with pytest.raises(ValueError, match=match):
      m.get_representation(img, rms, band)
  for band in (2, None, b'rubin_r'):
    with pytest.raises(TypeError, match='band must be a band name'):
      m.get_representation(img, rms, band)
  with pytest.raises(TypeError, match='image must hold real numbers.*complex'):
    m.get_representation(img.astype(np.complex64), rms, 'rubin_r')
  with pytest.raises(TypeError, match='rms must hold real numbers.*object'):
    m.get_representation(img, None, 'rubin_r')
  with pytest.raises(ValueError, match='image must be a .B, 1, H, W. array of numbers'):
    m.get_representation([[[[1.0] * 32] * 32], [[[1.0] * 32] * 31]], rms, 'rubin_r')
  for i, r in [(img[:, 0], rms[:, 0]), (np.concatenate([img, img], 1),) * 2,
               (img, rms[:, :, :16]), (np.concatenate([img, img]), rms)]:
    with pytest.raises(ValueError, match=r'image and rms must both be \(B, 1, H, W\)'):
      m.get_representation(i, r, 'rubin_r')
