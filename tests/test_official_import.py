"""The paper's released checkpoints as ingredients (soup/models/official.py).

Random weights in the released layout (a torch.save'd ModelWrapper state dict): the import
and its errors on tiny CLIP-shaped files, parity with the official forward pass at ViT-B/32 size
(open_clip, QuickGELU as OpenAI's), import -> evaluate -> soups -> report on mock ImageNet, and
the comparison with the released results on synthetic workdirs (soup/compare_official.py).
"""

import argparse
import json
import math
import re
import zipfile

import jax
import numpy as np
import pytest

import configs
from soup import checkpoints, compare_official, experiment, validate
from soup.data import imagenet_mock
from soup.models import official
from soup.workdir import Workdir, WorkdirMismatchError
from tests.conftest import ROOT, run_python

torch = pytest.importorskip("torch")
CLIP = configs.module_of(ROOT / "configs" / "clip_vit_b32_imagenet.py")
PAPER = json.loads((ROOT / "tests" / "data" / "paper" / "hparam_info.json").read_text())


def tiny_release(seed: int) -> dict:
  """A released-layout state dict of the tiny CLIP (vision tower of CONFIGS['tiny']): one
  shared start, so model_k are small moves from it, like fine-tunes."""
  base = imagenet_mock.tiny_clip_state_dict(seed=0)
  rng = np.random.default_rng(seed + 1)
  moved = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim else v
           for k, v in base.items()}
  head = (0.5 * rng.standard_normal((1000, imagenet_mock.TINY_CLIP["embed"]))).astype(np.float32)
  return official.released_state_dict(moved, head, np.zeros(1000, np.float32))


def save(state_dict: dict, path) -> None:
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)


def write_release(folder, numbers, changed=None) -> None:
  """model_<k>.pt for k in numbers; changed[k] is a function editing model_k's state dict."""
  changed = changed or {}
  folder.mkdir(parents=True, exist_ok=True)
  for k in numbers:
    sd = tiny_release(k)
    if k in changed:
      sd = changed[k](sd)
    save(sd, folder / f"model_{k}.pt")


def tiny_config(mock_imagenet=None, num_members: int = 2):
  config = CLIP.get_config("released,smoke")
  config.sweep.num_members = num_members
  if mock_imagenet is not None:
    config.data.update({k: mock_imagenet[k] for k in ("data_dir", "objectnet_dir",
                                                      "heldout_file", "cache_dir")})
  return config


def run_import(folder, workdir, config=None):
  return official.import_released(folder, workdir, config or tiny_config(), CLIP.get_sweep,
                                  log=lambda _: None)


# --- The import, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_import_then_evaluate_soups_report_on_mock_imagenet(mock_imagenet, tmp_path):
  write_release(tmp_path / "release", range(3))
  config = tiny_config(mock_imagenet)
  config.data.num_workers = 0  # In-process decoding: worker start-up would dominate here.
  # Every recipe but the learned soups, whose two compiles (20 s on 2 cores) are tested on the
  # same ingredient store by tests/test_experiment.py (and the algorithm in tests/test_soups.py).
  config.soups.recipes = tuple(r for r in config.soups.recipes if not r.startswith("learned"))
  summary = run_import(tmp_path / "release", tmp_path / "wd", config)
  assert summary.ok and summary.imported == ["model_0", "model_1", "model_2"]
  assert summary.dropped_keys == sorted(official.TEXT_KEYS)

  wd = Workdir(tmp_path / "wd")
  meta = checkpoints.ingredient_metadata(wd.ingredient_dir("model_1"))["metadata"]
  assert meta["source"]["sha256"] == official.sha256_of(tmp_path / "release" / "model_1.pt")
  assert meta["source"]["release"] == official.RELEASE and meta["recipe"] == "individual"
  assert meta["hparams"]["lr"] == PAPER["model_1"]["lr"]
  assert meta["dropped_keys"] == sorted(official.TEXT_KEYS)
  params = checkpoints.load_ingredient(wd.ingredient_dir("model_1"))
  sd = tiny_release(1)
  np.testing.assert_array_equal(params["head"]["kernel"], sd[official.HEAD_WEIGHT].T)
  np.testing.assert_array_equal(params["visual"]["conv1"]["kernel"],
                                sd["model.visual.conv1.weight"].transpose(2, 3, 1, 0))

  # The experiment's own stages, unchanged, on what the import wrote (soup.main's checks first).
  validate.check(config, CLIP.get_sweep, config.stages, tmp_path / "wd")
  built = experiment.run(config, tmp_path / "wd", CLIP.get_sweep, config.stages)
  rows = {json.loads(line)["model_name"]: json.loads(line)
          for line in (tmp_path / "wd" / "results.jsonl").read_text().splitlines()}
  assert {"model_0", "model_1", "model_2", "best_individual", "uniform_soup", "greedy_soup",
          "ensemble", "greedy_ensemble", "model_stock", "wise_ft_alpha_0.5"} <= set(rows)
  assert rows["uniform_soup"]["ingredients"] == ["model_0", "model_1", "model_2"]
  assert rows["model_2"]["hparams"]["weight_decay"] == PAPER["model_2"]["wd"]
  assert "vs_best_individual" in rows["uniform_soup"]
  report = (tmp_path / "wd" / "report.md").read_text()
  assert "## Differences from the best individual" in report and built["claims"]
  # The comparison reads that workdir (its mock numbers differ, so it flags).
  released = compare_official.released_rows()
  comparison = compare_official.compare(compare_official.read_ours(
      tmp_path / "wd" / "results.jsonl"), released)
  assert {d.row for d in comparison.differences} >= {"model_0", "greedy_soup", "uniform_soup"}
  assert not comparison.ok

  # Rerun: nothing to do, and the ingredients are not rewritten.
  chunk = next((wd.ingredient_dir("model_2") / "params").rglob("0*"))
  mtime = chunk.stat().st_mtime_ns
  again = run_import(tmp_path / "release", tmp_path / "wd", config)
  assert again.ok and again.imported == [] and again.skipped == ["model_0", "model_1", "model_2"]
  assert chunk.stat().st_mtime_ns == mtime


# --- Parity with the official forward pass --------------------------------------------------


class ModelWrapper(torch.nn.Module):
  """model-soups d5398f1 utils.py's ModelWrapper, as main.py builds it (normalize=True)."""

  def __init__(self, model, feature_dim: int, num_classes: int):
    super().__init__()
    self.model = model
    self.classification_head = torch.nn.Linear(feature_dim, num_classes)
    self.normalize = True
    if hasattr(self.model, "transformer"):  # "Get rid of the language part."
      delattr(self.model, "transformer")

  def forward(self, images):
    features = self.model.encode_image(images)
    if self.normalize:
      features = features / features.norm(dim=-1, keepdim=True)
    return self.classification_head(features)


@pytest.mark.slow
def test_logits_match_the_official_model_wrapper_at_vit_b32_size(tmp_path):
  """open_clip's ViT-B-32 with QuickGELU (OpenAI's), every weight perturbed, saved in the
  released layout, imported, and run by CLIPImageClassifier: logits within 1e-5."""
  open_clip = pytest.importorskip("open_clip")
  from soup.models import clip
  torch.manual_seed(0)
  wrapper = ModelWrapper(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), 512, 1000)
  wrapper.eval()
  with torch.no_grad():
    for p in wrapper.parameters():
      p.add_(0.02 * torch.randn_like(p))
  (tmp_path / "release").mkdir()
  state_dict = wrapper.state_dict()
  torch.save(state_dict, tmp_path / "release" / "model_0.pt")
  images = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    expected = wrapper(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  config = CLIP.get_config("released")
  config.sweep.num_members = 0  # Only model_0 here.
  summary = run_import(tmp_path / "release", tmp_path / "wd", config)
  assert summary.ok and summary.imported == ["model_0"]
  # Every key is accounted for: the text side dropped by name, each other key one param.
  assert summary.dropped_keys == sorted(official.TEXT_KEYS)
  params = checkpoints.load_ingredient(Workdir(tmp_path / "wd").ingredient_dir("model_0"))
  assert len(jax.tree.leaves(params)) == len(state_dict) - len(official.TEXT_KEYS)

  model = clip.CLIPImageClassifier(config=clip.get_config("ViT-B/32"), num_classes=1000)
  actual = np.asarray(jax.jit(model.apply)({"params": params}, images), np.float64)
  error = np.abs(actual - expected).max() / np.abs(expected).max()
  assert error <= 1e-5, f"relative error {error:.2e}"
  print(f"parity: max relative difference {error:.2e}")


# --- Bad files: a clear error, nothing of them written ----------------------------------------


def _drop(key):
  return lambda sd: {k: v for k, v in sd.items() if k != key}


def _with(key, value):
  return lambda sd: {**sd, key: value}


BAD_FILES = {
    "code": (None, r"needs unpickling of Python code \(argparse.Namespace\).*weights_only=True"),
    "torchscript": (None, r"TorchScript archive: reading it would run the code inside it"),
    "truncated": (None, r"truncated or not a torch.save file"),
    "missing_key": (_drop("model.visual.ln_post.bias"), r"missing key 'model.visual.ln_post.bias'"),
    "misshapen_key": (_with("model.visual.proj", np.zeros((32, 17), np.float32)),
                      r"'model.visual.proj' has shape \(32, 17\), expected \(32, 16\)"),
    "unexpected_key": (_with("model.transformer.resblocks.0.ln_1.weight",
                             np.ones(32, np.float32)),
                       r"1 unexpected key.*model.transformer.resblocks.0.ln_1.weight"),
    "missing_text_key": (_drop("model.logit_scale"), r"missing key 'model.logit_scale'"),
    "other_head_width": (_with(official.HEAD_WEIGHT, np.zeros((10, 16), np.float32)),
                         r"\[10, 16\], a head for 10 classes.*has 1000"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_named_and_nothing_of_it_is_written(case, tmp_path):
  edit, message = BAD_FILES[case]
  write_release(tmp_path / "release", (0, 1, 2), {1: edit} if edit else {})
  bad = tmp_path / "release" / "model_1.pt"
  if case == "code":  # A pickle that would run code: an object of a class, not tensors.
    torch.save({"model.visual.conv1.weight": argparse.Namespace(evil=True)}, bad)
  elif case == "torchscript":  # What torch.jit.save writes: the module's code beside its data.
    with zipfile.ZipFile(bad, "w") as archive:
      archive.writestr("model_1/code/__torch__.py", "def forward(self): ...")
      archive.writestr("model_1/constants.pkl", b"")
  elif case == "truncated":  # An interrupted download.
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
  summary = run_import(tmp_path / "release", tmp_path / "wd")
  assert not summary.ok and list(summary.failed) == ["model_1.pt"]
  assert summary.failed["model_1.pt"].startswith("model_1.pt")
  assert re.search(message, summary.failed["model_1.pt"]), summary.failed
  assert summary.imported == ["model_0", "model_2"]  # The rest is imported.
  assert not (tmp_path / "wd" / "models" / "model_1").exists()
  assert "FAILED model_1.pt" in summary.text()
  assert json.loads((tmp_path / "wd" / official.IMPORT_FILE).read_text())["failed"] == \
      summary.failed


@pytest.mark.slow
def test_gaps_are_named_and_the_rest_imported_by_the_command(tmp_path):
  write_release(tmp_path / "release", (0, 2))
  (tmp_path / "release" / "model_1.pt.part").write_bytes(b"partial download")
  proc = run_python(["scripts/import_official.py", f"--dir={tmp_path / 'release'}",
                     f"--workdir={tmp_path / 'wd'}",
                     "--config=configs/clip_vit_b32_imagenet.py:released,smoke"], check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "imported 2" in proc.stdout and "MISSING (no file): model_1.pt" in proc.stdout
  assert "ignored (not named model_<k>.pt): model_1.pt.part" in proc.stdout
  wd = Workdir(tmp_path / "wd")
  assert checkpoints.is_ingredient(wd.ingredient_dir("model_0"))
  assert checkpoints.is_ingredient(wd.ingredient_dir("model_2"))
  assert not wd.ingredient_dir("model_1").exists()
  proc = run_python(["scripts/import_official.py", f"--dir={tmp_path / 'nowhere'}",
                     f"--workdir={tmp_path / 'wd'}"], check=False)
  assert proc.returncode == 2 and "no such folder" in proc.stderr


def test_rerun_reimports_only_a_damaged_or_changed_ingredient(tmp_path):
  write_release(tmp_path / "release", range(3))
  assert run_import(tmp_path / "release", tmp_path / "wd").ok
  wd = Workdir(tmp_path / "wd")
  chunk = next((wd.ingredient_dir("model_0") / "params").rglob("0*"))
  chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))  # Damaged on disk.
  save(tiny_release(7), tmp_path / "release" / "model_2.pt")    # A different file now.
  again = run_import(tmp_path / "release", tmp_path / "wd")
  assert again.ok and again.imported == ["model_0", "model_2"] and again.skipped == ["model_1"]
  meta = checkpoints.ingredient_metadata(wd.ingredient_dir("model_2"))["metadata"]
  assert meta["source"]["sha256"] == official.sha256_of(tmp_path / "release" / "model_2.pt")
  checkpoints.load_ingredient(wd.ingredient_dir("model_0"))  # Verifies: repaired.


def test_a_workdir_of_trained_models_is_refused(tmp_path):
  write_release(tmp_path / "release", range(3))
  Workdir(tmp_path / "wd").check_config(CLIP.get_config("smoke"))
  with pytest.raises(WorkdirMismatchError, match="released"):
    run_import(tmp_path / "release", tmp_path / "wd")
  assert not (tmp_path / "wd" / "models").exists()


def test_released_config_sweep_is_the_released_hyperparameters():
  config = CLIP.get_config("released")
  members = CLIP.get_sweep(config)
  assert len(members) == 71 and config.stages == ("evaluate", "soups", "report")
  for k, member in enumerate(members, start=1):
    h = PAPER[f"model_{k}"]
    assert (member["lr"], member["weight_decay"], member["epochs"], member["label_smoothing"],
            member["mixup"], member["aug"]) == (h["lr"], h["wd"], h["epochs"], h["smoothing"],
                                                h["mix"], h["aug"])


# --- The comparison with the released results, on synthetic workdirs ------------------------


def synthetic_workdir(path, rows):
  path.mkdir(parents=True, exist_ok=True)
  (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def released_as_ours() -> list[dict]:
  """The released rows as our report would write them (with ingredients and held-out list)."""
  released = compare_official.released_rows()
  models = [f"model_{k}" for k in range(72)]
  ingredients = {"uniform_soup": models, "ensemble": models,
                 "greedy_soup": ["model_43", "model_40", "model_41", "model_30", "model_9"],
                 "best_individual": ["model_43"]}
  return [{**row, "ingredients": ingredients.get(name, [name]), "heldout_list": "official"}
          for name, row in released.items()]


def test_comparison_of_the_released_numbers_with_themselves_flags_nothing(tmp_path, capsys):
  workdir = synthetic_workdir(tmp_path / "wd", released_as_ours())
  assert compare_official.main([f"--workdir={workdir}"]) == 0
  out = capsys.readouterr().out
  # 76 rows (72 models, 3 soups/ensemble, best_individual) x (7 splits + the shift average).
  assert "608 of 608 comparisons within 0.1 point; 0 flagged." in out
  assert "| greedy_soup | 83.98 (+0.00) | 81.03 (+0.00) |" in out


def test_comparison_flags_differences_over_a_tenth_of_a_point(tmp_path, capsys):
  rows = {r["model_name"]: r for r in released_as_ours()}
  rows["model_3"]["ImageNet"] += 0.0005      # 0.05 point: within.
  rows["greedy_soup"]["ImageNet"] -= 0.003   # 0.3 point: flagged.
  rows["model_5"]["ObjectNet"] += 0.0011     # 0.11 point: flagged.
  rows["uniform_soup"]["ingredients"] = [f"model_{k}" for k in range(71)]
  rows["greedy_soup"]["ingredients"] = rows["greedy_soup"]["ingredients"][:4]
  del rows["model_7"]
  for name in ("model_9", "ensemble"):  # Only some splits evaluated for these.
    rows[name] = {k: v for k, v in rows[name].items()
                  if k not in ("ObjectNet", "ImageNetA", "avg_shifts")}
  rows["model_0"]["heldout_list"] = "seeded"
  workdir = synthetic_workdir(tmp_path / "wd", rows.values())
  comparison = compare_official.compare(compare_official.read_ours(workdir / "results.jsonl"),
                                        compare_official.released_rows())
  flagged = {(d.row, d.column): round(d.points, 2) for d in comparison.flagged}
  assert flagged == {("greedy_soup", "ImageNet"): -0.3, ("model_5", "ObjectNet"): 0.11}
  compared = {(d.row, d.column) for d in comparison.differences}
  assert ("model_9", "ImageNet") in compared and ("model_9", "ObjectNet") not in compared
  assert comparison.missing == ["model_7"]
  assert any("uniform_soup has 71 ingredients" in f and "model_71" in f
             for f in comparison.ingredient_flags)
  assert any("greedy_soup took 4 ingredients" in f for f in comparison.ingredient_flags)
  assert any("seeded" in w for w in comparison.warnings)
  assert compare_official.main([f"--workdir={workdir}"]) == 1
  lines = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
  assert "| 80.73 (-0.30) ! |" in lines["| greedy_soup"]
  assert "(+0.05) |" in lines["| model_3"] and "!" not in lines["| model_3"]
  assert "FLAG: greedy_soup took 4 ingredients" in "\n".join(lines)
  assert "not in the workdir (1): model_7" in lines


def test_comparison_without_results_is_a_clear_error(tmp_path, capsys):
  assert compare_official.main([f"--workdir={tmp_path}"]) == 2
  assert "run the report stage first" in capsys.readouterr().err


def test_best_individual_of_the_release_is_model_43():
  best = compare_official.released_rows()["best_individual"]
  assert best["selected"] == "model_43" and math.isclose(best["ImageNet"], 0.80386)
