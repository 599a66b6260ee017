"""Ingredient checkpoints: the direct reader, old formats refused, damage, and the streamed recipes
checked against NumPy on arrays restored by plain Orbax."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from soup import checkpoints, memory, soups, trees
from soup.soups import average, interpolation, layouts, learned


def _tree(rng, scale=1.0):
  return {"dense": {"kernel": (rng.normal(size=(37, 29)) * scale).astype(np.float32),
                    "bias": (rng.normal(size=(29,)) * scale).astype(np.float32)},
          "norm": {"scale": rng.normal(size=(7,)).astype(np.float32)},
          "head": rng.normal(size=(3, 1000)).astype(np.float32)}


def _orbax_restore(path):
  """The ingredient as a plain Orbax restore gives it: the reference, not our reader."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path / "params")


def _save_old_format(path, params):
  """An ingredient as the previous code saved it: Orbax defaults (OCDBT, zstd), CRC-32."""
  import zlib
  path.mkdir(parents=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / "params", params)
  fingerprints = {n: f"{a.dtype}{list(a.shape)}:{zlib.crc32(np.ascontiguousarray(a)):08x}"
                  for n, a in trees.flatten_with_names(params).items()}
  (path / checkpoints.INGREDIENT_FILE).write_text(json.dumps({"fingerprints": fingerprints,
                                                              "metadata": {}}))


def test_saved_ingredient_is_plain_orbax_and_read_directly(tmp_path):
  params = _tree(np.random.default_rng(0))
  checkpoints.save_ingredient(tmp_path / "m", params)
  restored = _orbax_restore(tmp_path / "m")
  for name, leaf in trees.flatten_with_names(params).items():
    np.testing.assert_array_equal(trees.flatten_with_names(restored)[name], leaf)
  ingredient = checkpoints.open_ingredient(tmp_path / "m")
  loaded = checkpoints.load_ingredient(tmp_path / "m")
  for name, leaf in trees.flatten_with_names(params).items():
    got = trees.flatten_with_names(loaded)[name]
    np.testing.assert_array_equal(got, leaf)
    assert got.ctypes.data % memory.ALIGNMENT == 0
  buffer = np.empty(10_000, np.float32)  # A reused buffer: the leaf lands in it.
  got = ingredient.read("dense/kernel", buffer)
  assert np.shares_memory(got, buffer)
  np.testing.assert_array_equal(got, params["dense"]["kernel"])


def test_raw_reader_understands_the_installed_orbax_layout(tmp_path):
  """The fast reader parses Orbax's private files (_METADATA, zarr chunks): this guards it.

  An Orbax release that changes the layout makes the save refuse it (its chunks differ)
  or, worse, the reader read other bytes; either way this test says so.
  """
  import importlib.metadata
  installed = importlib.metadata.version("orbax-checkpoint")
  params = _tree(np.random.default_rng(5))
  hint = (f"orbax-checkpoint {installed} writes an on-disk layout that the raw reader "
          f"(soup/checkpoints.py: _raw_chunk_files, checked with orbax-checkpoint "
          f"{checkpoints.RAW_LAYOUT_ORBAX}) does not understand. Update _raw_chunk_files for "
          f"the new layout and RAW_LAYOUT_ORBAX, or pin orbax-checkpoint=="
          f"{checkpoints.RAW_LAYOUT_ORBAX} in requirements.txt.")
  try:
    checkpoints.save_ingredient(tmp_path / "m", params)
  except checkpoints.CheckpointError as e:
    pytest.fail(f"the save refuses the layout written ({e}): " + hint)
  ingredient = checkpoints.open_ingredient(tmp_path / "m")
  public = trees.flatten_with_names(_orbax_restore(tmp_path / "m"))
  for name in public:
    got = ingredient.read(name)
    if got.dtype != public[name].dtype or not np.array_equal(got, public[name]):
      pytest.fail(f"{name} read raw differs from Orbax's public restore: " + hint)
  # The requirements pin the release the reader was checked with.
  pins = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
  assert f"orbax-checkpoint=={checkpoints.RAW_LAYOUT_ORBAX}" in pins, hint


def test_an_ingredient_of_an_earlier_version_is_refused_naming_the_fix(tmp_path):
  _save_old_format(tmp_path / "old", _tree(np.random.default_rng(1)))
  for read in (checkpoints.open_ingredient, checkpoints.load_ingredient,
               lambda p: soups.weighted_average([p])):
    with pytest.raises(checkpoints.CheckpointError,
                       match="written by an earlier version of this code .* delete that folder "
                             "and rerun the stage that writes it"):
      read(tmp_path / "old")


@pytest.mark.parametrize("threads", [1, 3])
def test_stream_average_equals_numpy_mean_of_orbax_restores(tmp_path, monkeypatch, threads):
  monkeypatch.setattr(layouts, "THREADED_MIN_BYTES", 0)  # Threads even for this small tree.
  monkeypatch.setattr(average, "BLOCK", 1000)  # Several blocks per leaf.
  rng = np.random.default_rng(2)
  paths = []
  for i in range(7):
    checkpoints.save_ingredient(tmp_path / f"m{i}", _tree(rng, scale=1 + i))
    paths.append(tmp_path / f"m{i}")
  restored = [trees.flatten_with_names(_orbax_restore(p)) for p in paths]
  weights = np.array([0.5, 1.0, 0.0, 2.0, 1.5, 0.25, 1.0])
  for w in (None, weights):
    got = trees.flatten_with_names(soups.weighted_average(paths, w, threads=threads))
    ww = np.ones(len(paths)) if w is None else w
    for name in got:
      stack = np.stack([r[name] for r in restored]).astype(np.float64)
      expected = np.tensordot(ww / ww.sum(), stack, 1)
      np.testing.assert_allclose(got[name], expected, rtol=2e-6, atol=2e-6 * np.abs(stack).max(),
                                 err_msg=name)
  # Threads own disjoint leaves and run the same arithmetic: bit-equal to one thread.
  one = trees.flatten_with_names(soups.weighted_average(paths, weights, threads=1))
  many = trees.flatten_with_names(soups.weighted_average(paths, weights, threads=threads))
  for name in one:
    np.testing.assert_array_equal(one[name], many[name])


def test_soup_of_identical_bfloat16_checkpoints_is_that_checkpoint(tmp_path):
  rng = np.random.default_rng(3)
  params = {"w": rng.normal(size=(5, 6)).astype(ml_dtypes.bfloat16)}
  for i in range(3):
    checkpoints.save_ingredient(tmp_path / f"m{i}", params)
  got = soups.weighted_average([tmp_path / f"m{i}" for i in range(3)])
  assert got["w"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["w"], params["w"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_damaged_chunk_is_a_clear_error(tmp_path, damage):
  params = _tree(np.random.default_rng(4))
  checkpoints.save_ingredient(tmp_path / "m", params)
  chunk = tmp_path / "m" / "params" / "dense.kernel" / "0.0"
  raw = bytearray(chunk.read_bytes())
  if damage == "flip":
    raw[100] ^= 0x01
    chunk.write_bytes(bytes(raw))
  elif damage == "truncate":
    chunk.write_bytes(bytes(raw[:-4]))
  else:
    chunk.unlink()
  with pytest.raises(checkpoints.CheckpointError, match="m.*(corrupt|truncated|incomplete)"):
    soups.weighted_average([tmp_path / "m", tmp_path / "m"])
  if damage == "flip":  # Without verification the flipped bit goes through, as asked.
    soups.weighted_average([tmp_path / "m"], verify=False)


def _model_stock_reference(initial, finetuned):
  """The previous implementation (all models in memory, pairwise cosines in float64),
  with the zero-delta rule fixed: two zero deltas aligned, one zero delta orthogonal."""
  flat0 = trees.flatten_with_names(initial)
  flats = [trees.flatten_with_names(f) for f in finetuned]
  k = len(finetuned)
  flat_mean = trees.flatten_with_names(soups.weighted_average(finetuned))
  merged, ratios = {}, {}
  for name, w0 in flat0.items():
    deltas = [(np.asarray(f[name], np.float32) - w0).reshape(-1).astype(np.float64) for f in flats]
    cosines = []
    for i in range(k):
      for j in range(i + 1, k):
        na, nb = np.linalg.norm(deltas[i]), np.linalg.norm(deltas[j])
        cosines.append(1.0 if na == 0 and nb == 0 else
                       0.0 if na == 0 or nb == 0 else np.dot(deltas[i], deltas[j]) / (na * nb))
    cos = float(np.mean(cosines))
    t = float(np.clip(k * cos / (1 + (k - 1) * cos), 0, 1))
    ratios[name] = t
    merged[name] = t * flat_mean[name] + (1 - t) * w0
  return merged, ratios


def test_streamed_model_stock_matches_the_pairwise_implementation(tmp_path):
  rng = np.random.default_rng(5)
  theta0 = _tree(rng)
  direction = _tree(rng)
  finetuned = []
  for i in range(5):
    noise = _tree(rng)
    finetuned.append({k: jax_map(lambda a, d, n: a + 0.3 * d + (0.2 + 0.1 * i) * n, theta0[k],
                                 direction[k], noise[k]) for k in theta0})
  finetuned[1]["norm"]["scale"] = theta0["norm"]["scale"].copy()  # One zero delta.
  for f in finetuned:  # Every delta of this leaf zero: t = 1, the layer stays theta_0.
    f["dense"]["bias"] = theta0["dense"]["bias"].copy()
  paths = []
  for i, f in enumerate(finetuned):
    checkpoints.save_ingredient(tmp_path / f"m{i}", f)
    paths.append(tmp_path / f"m{i}")
  checkpoints.save_ingredient(tmp_path / "init", theta0)
  expected, expected_t = _model_stock_reference(theta0, finetuned)
  for init, fts in ((theta0, finetuned), (tmp_path / "init", paths)):
    merged, ratios = soups.model_stock(init, fts)
    merged = trees.flatten_with_names(merged)
    assert ratios["dense/bias"] == 1.0
    assert 0 < ratios["norm/scale"] < 1
    for name in expected:
      assert ratios[name] == pytest.approx(expected_t[name], rel=1e-6, abs=1e-7), name
      np.testing.assert_allclose(merged[name], expected[name], rtol=2e-6, atol=1e-6, err_msg=name)


def jax_map(fn, *trees_):
  import jax
  return jax.tree.map(fn, *trees_)


def test_model_stock_clips_negative_t_and_logs_it(caplog):
  theta0 = {"k": np.zeros(2, np.float32), "w": np.zeros(2, np.float32)}
  a = {"k": np.array([1.0, 0.0], np.float32), "w": np.array([1.0, 0.0], np.float32)}
  b = {"k": np.array([-1.0, 0.1], np.float32), "w": np.array([0.0, 1.0], np.float32)}
  with caplog.at_level("WARNING"):
    merged, ratios = soups.model_stock(theta0, [a, b])
  assert ratios["k"] == 0.0 and ratios["w"] == 0.0  # cos < 0 gives t < 0 before clipping.
  assert interpolation.interpolation_ratio(-0.99, 0, 2) < 0
  assert "clipped" in caplog.text and "k (" in caplog.text
  np.testing.assert_array_equal(merged["k"], [0.0, 0.0])


def test_wise_ft_streams_paths(tmp_path):
  rng = np.random.default_rng(6)
  a, b = _tree(rng), _tree(rng)
  checkpoints.save_ingredient(tmp_path / "a", a)
  checkpoints.save_ingredient(tmp_path / "b", b)
  got = trees.flatten_with_names(soups.wise_ft(tmp_path / "a", tmp_path / "b", 0.3))
  for name, expected in trees.flatten_with_names(soups.wise_ft(a, b, 0.3)).items():
    np.testing.assert_array_equal(got[name], expected)
    np.testing.assert_allclose(got[name], 0.7 * trees.flatten_with_names(a)[name].astype(np.float64)
                               + 0.3 * trees.flatten_with_names(b)[name], rtol=1e-6, atol=1e-6)


def test_an_interpolation_end_and_a_one_ingredient_soup_are_the_ingredient_bit_for_bit(tmp_path):
  """The soups stage reuses an ingredient's cached logits for WiSE-FT's alpha 0 and 1 and
  for a greedy soup of one ingredient: that holds only if these are the ingredient's own
  bits, in the run's layouts too."""
  from soup import mesh as mesh_lib
  rng = np.random.default_rng(9)
  a, b = _tree(rng), _tree(rng)
  checkpoints.save_ingredient(tmp_path / "a", a)
  checkpoints.save_ingredient(tmp_path / "b", b)
  every_candidate_fails = lambda params: 0.0  # noqa: E731
  for layout in (soups.Layout.host(), soups.Layout.flat(mesh_lib.make_mesh())):
    ends = {0.0: a, 1.0: b}
    for alpha, expected in ends.items():
      got = trees.flatten_with_names(soups.wise_ft(tmp_path / "a", tmp_path / "b", alpha, layout))
      for name, leaf in trees.flatten_with_names(expected).items():
        np.testing.assert_array_equal(np.asarray(got[name]), leaf, err_msg=f"{alpha} {name}")
    greedy = soups.greedy_soup({"a": tmp_path / "a", "b": tmp_path / "b"}, {"a": 0.9, "b": 0.8},
                               every_candidate_fails, layout=layout)
    assert greedy.ingredients == ["a"]
    for name, leaf in trees.flatten_with_names(greedy.result).items():
      np.testing.assert_array_equal(np.asarray(leaf), trees.flatten_with_names(a)[name])


def test_greedy_soup_from_paths_equals_in_memory_and_the_flat_layouts_average(tmp_path):
  rng = np.random.default_rng(7)
  x, y = rng.normal(size=(200, 37)).astype(np.float32), rng.integers(0, 29, 200)
  base = _tree(rng)
  ingredients = {f"m{i}": jax_map(lambda v: v + rng.normal(size=v.shape).astype(np.float32)
                                  * rng.uniform(0.1, 2), base) for i in range(6)}

  def evaluate(params):
    return float(np.mean(np.argmax(x @ params["dense"]["kernel"], -1) == y))

  scores = {n: evaluate(p) for n, p in ingredients.items()}
  paths = {}
  for n, p in ingredients.items():
    checkpoints.save_ingredient(tmp_path / n, p)
    paths[n] = tmp_path / n
  from soup import mesh as mesh_lib
  for layout in (soups.Layout.host(), soups.Layout.flat(mesh_lib.make_mesh())):
    in_memory = soups.greedy_soup(ingredients, scores, evaluate, layout=layout)
    from_paths = soups.greedy_soup(paths, scores, evaluate, layout=layout)
    assert from_paths.ingredients == in_memory.ingredients
    uniform = trees.flatten_with_names(
        soups.weighted_average([paths[n] for n in from_paths.ingredients], layout=layout))
    for name, leaf in trees.flatten_with_names(from_paths.result).items():
      np.testing.assert_array_equal(leaf, trees.flatten_with_names(in_memory.result)[name])
      # The same layout, the same update (numpy's on the host, XLA's on devices): bit-equal.
      np.testing.assert_array_equal(leaf, uniform[name])


def test_learned_soup_stack_from_paths_equals_numpy_stack(tmp_path):
  rng = np.random.default_rng(8)
  params = [_tree(rng) for _ in range(3)]
  for i, p in enumerate(params):
    checkpoints.save_ingredient(tmp_path / f"m{i}", p)
  stacked = learned.stack_ingredients([tmp_path / f"m{i}" for i in range(3)])
  stacked = trees.flatten_with_names(stacked)
  for name, leaf in stacked.items():
    np.testing.assert_array_equal(
        np.asarray(leaf), np.stack([trees.flatten_with_names(p)[name] for p in params]))


def test_unified_tree_check_names_keys_for_soups_and_converters():
  from soup.models import convert
  a = {"x": {"k": np.zeros((2, 3), np.float32)}, "y": np.zeros(4, np.float32)}
  with pytest.raises(KeyError, match=r"m1: missing key\(s\) \['y'\]"):
    trees.check_compatible(a, {"x": a["x"]}, "m0", "m1")
  with pytest.raises(soups.IngredientMismatchError, match="unexpected key.*'z'"):
    soups.check_compatible(a, {**a, "z": np.zeros(1)})
  bad = {"x": {"k": np.zeros((3, 2), np.float32)}, "y": a["y"]}
  with pytest.raises(ValueError, match=r"'x/k' has shape \(3, 2\), expected \(2, 3\)"):
    convert.check_params_match(bad, a)
  convert.check_params_match(jax_map(lambda v: v.astype(np.float16), a), a)  # Shapes only.
