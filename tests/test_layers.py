"""The layers point one way: soup.* imports form no circle, and a reader sees them at the top.

Every module under soup/ is parsed (nothing is imported); the graph holds its `soup.*`
imports at module level and inside functions alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOUP = Path(__file__).resolve().parents[1] / "soup"

# Function-level `soup` imports still allowed: (importer, imported) -> why it waits.
_LIGHT_REFUSAL = "imported by the config check: a bad config is refused before this loads"
DEFERRED = {
    ("soup.main", "soup.validate"): "a bad --config flag is refused before jax is imported",
    ("soup.main", "soup.experiment"): "after XLA_FLAGS is set and the config is checked",
    ("soup.main", "soup.distributed"): "only with --distributed, before the experiment",
    ("soup.main", "soup.report"): "after the run, like the experiment",
    **{("soup.main", m): "the user errors, named only after the experiment ran"
       for m in ("soup.checkpoints", "soup.recipes", "soup.soups", "soup.train",
                 "soup.workdir", "soup.data", "soup.models.pretrained", "soup.evaluate")},
    ("soup.models.convert", "soup.models.clip"): "CLIP's config, only for a CLIP checkpoint",
    ("soup.experiment", "soup.contrastive"): "SimCLR's step, only for a run that pretrains with it",
    ("soup.recipes", "soup.soups"): _LIGHT_REFUSAL + " (orbax), and the report stays jax-free",
    ("soup.recipes", "soup.checkpoints"): _LIGHT_REFUSAL + " (orbax)",
    ("soup.recipes", "soup.baselines"): _LIGHT_REFUSAL,
    # The config check reads the dataset registry; a Task's code loads when it is built.
    **{("soup.data.registry", m): _LIGHT_REFUSAL + " (via the dataset registry)"
       for m in ("soup.data.fashion_mnist", "soup.data.imagenet", "soup.data.glue")},
    ("soup.data.fashion_mnist_splits", "soup.data.shifts"): _LIGHT_REFUSAL + " (scipy.ndimage)",
    ("soup.baselines", "soup.linear_probe"): _LIGHT_REFUSAL + " (via recipes; optax, scipy)",
    # ImageNet and CLIP paths: loaded only by the configs that use them.
    **{("soup.data.grain_input", m): "PIL decoding, only in the ImageNet workers"
       for m in ("soup.data.randaugment", "soup.data.transforms", "soup.data.objectnet")},
    ("soup.data.imagenet", "soup.mesh"): "only when ImageNet labels are sharded",
    ("soup.data.imagenet_heldout", "soup.data.tfds_source"): "tensorflow_datasets, on demand",
    **{("soup.data.imagenet_mock", m): "a test-data generator: each part on demand"
       for m in ("soup.data.tfds_source", "soup.data.imagenet", "soup.data.imagenet_heldout",
                 "soup.data.objectnet", "soup.models.convert", "soup.models.vit")},
    ("soup.models", "soup.models.vit"): "the model a config names, built on demand",
    ("soup.models", "soup.models.clip"): "the model a config names, built on demand",
    ("soup.models", "soup.models.bert"): "the model a config names, built on demand",
    ("soup.models.pretrained", "soup.models.bert"): "the weights a config names, loaded on demand",
    ("soup.validate", "soup.models.bert"): "a BERT config's checkpoint folder, checked only for it",
    **{("soup.models.pretrained", m): "the weights a config names, loaded on demand"
       for m in ("soup.models.clip", "soup.models.zeroshot",
                 "soup.models.imagenet_classnames")},
    ("soup.models.zeroshot", "soup.models.clip"): "the text tower, only for zero-shot heads",
    **{("soup.models.official", m): "the released checkpoints' import, on demand"
       for m in ("soup.models.clip", "soup.data.imagenet", "soup.models.pretrained",
                 "soup.workdir")},
}
LIBRARY_MUST_NOT_KNOW = ("soup.experiment", "soup.resources", "soup.analysis_figures",
                         "soup.recipes", "soup.results", "soup.report")


def _modules(root: Path) -> dict[str, Path]:
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool, int]]:
  """(imported soup module, inside a function?, line) for each soup import of a file."""
  tree = ast.parse(path.read_text(), filename=str(path))
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
  found = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module == "soup" or node.module.startswith("soup.")):
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
               for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name == "soup" or a.name.startswith("soup.")]
    for name in names:
      while name not in modules:  # soup.x.attr -> soup.x
        name = name.rpartition(".")[0]
      found.append((name, id(node) in in_function, node.lineno))
  return found


def graph(root: Path = SOUP) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
  """The soup.* import graph (every level) and the function-level imports."""
  modules = _modules(root)
  edges, deferred = {m: set() for m in modules}, []
  for module, path in modules.items():
    for name, in_function, line in _imports(path, modules):
      if name != module and name != "soup":
        edges[module].add(name)
      if in_function:
        deferred.append((module, name, line))
  return edges, deferred


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  """One import circle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_no_import_circle():
  cycle = find_cycle(graph()[0])
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_soup_library_knows_nothing_of_the_experiment():
  edges, _ = graph()
  for module, imported in edges.items():
    if module == "soup.soups" or module.startswith("soup.soups."):
      bad = sorted(imported & set(LIBRARY_MUST_NOT_KNOW))
      assert not bad, f"{module} imports {bad}"


def test_results_know_no_recipes():
  assert "soup.recipes" not in graph()[0]["soup.results"]


def test_leaf_modules_import_nothing_from_soup():
  edges, _ = graph()
  for leaf in ("soup.atomic_io", "soup.layout", "soup.memory", "soup.metrics", "soup.trees"):
    assert edges[leaf] == set(), (leaf, edges[leaf])


def test_function_level_imports_are_listed_with_a_reason():
  _, deferred = graph()
  unlisted = [f"{m}:{line} imports {name}" for m, name, line in deferred
              if (m, name) not in DEFERRED]
  assert not unlisted, ("imports inside functions (move them to the top, or list them in "
                        "DEFERRED with why they wait):\n" + "\n".join(unlisted))
  stale = sorted(set(DEFERRED) - {(m, name) for m, name, _ in deferred})
  assert not stale, f"DEFERRED lists imports that are no longer deferred: {stale}"


def test_the_checks_can_fail(tmp_path):
  """A deliberate circle and an unlisted deferred import are caught."""
  pkg = tmp_path / "soup"
  (pkg / "soups").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "results.py").write_text("from soup import recipes\n")
  (pkg / "recipes.py").write_text("def f():\n  from soup import soups\n")
  (pkg / "soups" / "__init__.py").write_text("from soup import results\n")
  edges, deferred = graph(pkg)
  cycle = find_cycle(edges)
  assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) == 4, cycle
  assert deferred == [("soup.recipes", "soup.soups", 2)]
  assert "soup.results" in edges["soup.soups"]


def test_no_function_over_80_lines_and_no_class_over_200_in_soup():
  """Long functions and classes hide what they do; split them by topic instead."""
  too_long = []
  for path in sorted(SOUP.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > 80:
        too_long.append(f"{path.relative_to(SOUP.parent)}: def {node.name} ({lines} lines)")
      if isinstance(node, ast.ClassDef) and lines > 200:
        too_long.append(f"{path.relative_to(SOUP.parent)}: class {node.name} ({lines} lines)")
  assert not too_long, too_long
