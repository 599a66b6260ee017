"""The registries of models and datasets, the workdir's layout, and the one accuracy function."""

import ast
from pathlib import Path

import ml_collections as mlc
import numpy as np
import pytest

from soup import layout, linear_probe, metrics, models, recipes, resources, workdir
from soup.data import registry as datasets
from soup.models import pretrained
from soup.soups import ensemble


def test_unknown_model_names_the_registered_ones():
  with pytest.raises(models.UnknownModelError, match="'vitt' is unknown; use one of vit, clip"):
    models.build({"name": "vitt"}, 10)
  config = mlc.ConfigDict({"model": {"name": "vitt"}})
  with pytest.raises(models.UnknownModelError, match="use one of vit, clip"):
    pretrained.load_pretrained(config)


def test_every_model_names_a_loader_of_pretrained():
  for entry in models.MODELS.values():
    assert callable(getattr(pretrained, entry.pretrained_loader))


def test_unknown_dataset_names_the_registered_ones():
  data = mlc.ConfigDict({"name": "mnist"})
  for call in (resources.make_task, resources.task_columns):
    with pytest.raises(datasets.UnknownDatasetError,
                       match="'mnist' is unknown; use one of fashion_mnist, imagenet"):
      call(data)


def test_the_dataset_registry_owns_the_columns():
  from soup import report, results
  from soup.data import glue_tasks
  # The results readers, the report's presets and the claims read the registry's columns.
  assert results.FASHION_MNIST is datasets.get("fashion_mnist").columns
  assert results.IMAGENET is datasets.get("imagenet").columns
  assert report._COLUMN_PRESETS == {"fashion_mnist": results.FASHION_MNIST,
                                    "imagenet": results.IMAGENET}
  cola = datasets.get("glue").columns_of(mlc.ConfigDict({"name": "glue", "task": "cola"}))
  assert (cola.held_out, cola.test, cola.shifts, cola.metric) == \
      ("CoLAHeldOut", "CoLADev", (), "matthews")
  known = datasets.known_columns()
  assert known[:2] == (results.IMAGENET, results.FASHION_MNIST)  # The previous order.
  assert known[2:] == tuple(t.columns for t in glue_tasks.GLUE_TASKS.values())
  for columns in known:
    row = {c: 0.5 for c in columns.all}
    assert results.detect_columns([row]) == columns
  # A dataset entry added to the registry is detected without other edits.
  toy = datasets.DatasetEntry(lambda c: None, results.Columns("ToyHeldOut", "Toy", ()),
                              lambda c, s: None)
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(datasets.DATASETS, "toy", toy)
    assert results.detect_columns([{"ToyHeldOut": 0.5, "Toy": 0.5}]) is toy.columns
  with pytest.raises(ValueError, match="Unknown result columns"):
    results.detect_columns([{"ToyHeldOut": 0.5, "Toy": 0.5}])


def test_stage_groups_partition_the_stages():
  assert layout.MODEL_STAGES + layout.EVAL_STAGES == layout.STAGES
  assert set(layout.SETUP_STAGES) < set(layout.MODEL_STAGES)


def test_workdir_paths_are_the_layout(tmp_path):
  wd = workdir.Workdir(tmp_path)
  assert wd.ingredient_dir("model_3") == tmp_path / "models" / "model_3" / "ingredient"
  assert wd.upstream / layout.INGREDIENT == tmp_path / layout.UPSTREAM_INGREDIENT
  assert wd.soup_dir("greedy_soup") == tmp_path / "soups" / "greedy_soup"


def test_workdir_file_names_are_those_on_disk():
  # Existing workdirs (and aggregate roots) were written under these names: keep them.
  assert (layout.TRAIN_STATE, layout.LOGS, layout.METRICS_LOG) == \
      ("train_state", "logs", "metrics.jsonl")
  assert (layout.ANALYSIS, layout.LANDSCAPE_FIGURE, layout.INGREDIENTS_FIGURE) == \
      ("analysis.json", "landscape.png", "ingredients.png")
  assert (layout.reads_file(3), layout.IMPORT, layout.LAUNCH_LOGS) == \
      ("reads.process3.json", "import.json", "launch_logs")
  assert (layout.seed_dir(2), layout.WALL_SECONDS, layout.COMMAND, layout.AGGREGATE,
          layout.AGGREGATE_REPORT) == \
      ("seed_2", "wall_seconds.txt", "command.txt", "aggregate.json", "aggregate.md")


def _docstrings(tree: ast.AST) -> set[int]:
  """ids of the str constants that are docstrings (the first statement of a body)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      first = node.body[0] if node.body else None
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        found.add(id(first.value))
  return found


def _string_constants(path: Path, value: str) -> list[int]:
  """Lines of `path` where the code (not a docstring) spells the string `value`."""
  tree = ast.parse(path.read_text(), filename=str(path))
  docstrings = _docstrings(tree)
  return [node.lineno for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and node.value == value and id(node) not in docstrings]


def test_only_the_layout_spells_the_initializations_name():
  root = Path(__file__).resolve().parents[1]
  owner = root / "soup" / "layout.py"
  sources = [*sorted((root / "soup").rglob("*.py")), *sorted((root / "scripts").glob("*.py"))]
  assert owner in sources
  spelled = {str(p.relative_to(root)): lines for p in sources if p != owner
             for lines in [_string_constants(p, layout.INITIALIZATION)] if lines}
  assert spelled == {}, f"use soup.layout.INITIALIZATION instead of the literal: {spelled}"
  # The paper's names, which existing workdirs and the released checkpoints use.
  assert layout.INITIALIZATION == layout.member_name(0) == "model_0"
  assert layout.member_names(2) == ["model_1", "model_2"]


def test_only_the_recipes_spell_a_recipes_name():
  # The claims, the report, the evaluate stage and the imports name recipes by recipes.Name;
  # configs list recipes by name, as a user does.
  root = Path(__file__).resolve().parents[1]
  owner = root / "soup" / "recipes.py"
  sources = [*sorted((root / "soup").rglob("*.py")), *sorted((root / "scripts").glob("*.py"))]
  assert owner in sources
  spelled = {f"{p.relative_to(root)}: {name}": lines for p in sources if p != owner
             for name in recipes.REGISTRY
             for lines in [_string_constants(p, name)] if lines}
  assert spelled == {}, f"use soup.recipes.Name instead of the literal: {spelled}"
  # Each name is a registered recipe's, in the registry's order (a new recipe may be registered
  # under a plain string: README, "Adding a recipe"); the names existing results files hold.
  assert [str(n) for n in recipes.Name] == [r for r in recipes.REGISTRY if r in set(recipes.Name)]
  assert set(recipes.Name) <= set(recipes.REGISTRY)
  assert recipes.Name.GREEDY_SOUP == "greedy_soup" and recipes.Name.WISE_FT == "wise_ft"
  assert f"{recipes.Name.WISE_FT!r}" == "'wise_ft'"  # Quoted as the plain string.


def test_the_scan_finds_a_literal_but_not_a_docstring(tmp_path):
  # The scan above can fail: the name in code is found, the same words in a docstring are not.
  source = tmp_path / "planted.py"
  source.write_text('"""model_0"""\n\ndef f():\n  """model_0"""\n  return "model_0"\n')
  assert _string_constants(source, "model_0") == [5]


def test_accuracy_by_hand():
  logits = np.array([[0.1, 0.9, 0.0],    # argmax 1
                     [2.0, 1.0, 3.0],    # argmax 2; without class 2: 0
                     [0.0, 0.0, -1.0],   # a tie: the first, 0
                     [-5.0, -4.0, -6.0]], np.float32)  # argmax 1
  labels = np.array([1, 0, 0, 2])
  assert metrics.accuracy(logits, labels) == 0.5  # Rows 0 and 2.
  assert metrics.accuracy(logits, labels, np.array([True, True, False])) == 0.75  # Row 1 too.
  # bfloat16 or float64 logits are scored in float32: 1 + 1e-9 ties 1 there, the first wins.
  assert metrics.accuracy(np.array([[1.0, 1.0 + 1e-9]]), np.array([0])) == 1.0
  # The greedy ensemble scores with the metrics' own function (an import, not a copy).
  assert ensemble.score is metrics.score
  head = {"kernel": np.array([[0.0, 1.0], [1.0, 0.0]], np.float32),
          "bias": np.array([0.0, 0.5], np.float32)}
  features = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.0]], np.float32)
  # Logits: [0, 1.5], [1, 0.5], [0, 0.7]: argmax 1, 0, 1.
  assert linear_probe.accuracy(head, features, np.array([1, 0, 0])) == pytest.approx(2 / 3)
