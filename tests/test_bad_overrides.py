"""Bad --config overrides are refused before any compute, in one line naming field, value and fix.

The cases call soup/validate.py directly, on the config that absl's flag parsing makes of
`--config=configs/fashion_mnist.py <override>`; three of them also run the real CLI.
"""

import glob
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

import configs
from soup import validate
from tests.conftest import ROOT, run_python

FASHION = "configs/fashion_mnist.py"
DEVICES = 2  # soup/main.py's default on a CPU host (--xla_force_host_platform_device_count=2).


def config_of(*overrides: str, config: str = FASHION):
  """The config soup.main would get from `--config=CONFIG OVERRIDES...` (absl + ml_collections)."""
  argv = ["soup.main", f"--config={ROOT / config}", *overrides]
  values = flags.FlagValues()
  # sys_argv: the overrides' flags are defined from the command line (as sys.argv in soup.main).
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def check(config, module=None, num_devices: int = DEVICES) -> None:
  """soup/main.py's checks short of the paths (stages=()), devices included."""
  module = module or configs.module_of(ROOT / FASHION)
  validate.check(config, module.get_sweep, (), ROOT / "nonexistent_workdir")
  validate.check_devices(config, num_devices)


UPSTREAM = "--config.init.source=upstream"  # Its fields are read only when it trains here.

# (overrides, the field the error must name).
BAD = [
    (["--config.model.name=vitt"], "model.name"),                       # Not in the registry.
    (["--config.data.name=mnist"], "data.name"),
    (["--config.sweep.num_members=-3"], "sweep.num_members"),
    (["--config.sweep.num_members=0"], "sweep.num_members"),
    (["--config.finetune.batch_size=0"], "finetune.batch_size"),
    (["--config.finetune.batch_size=-128"], "finetune.batch_size"),
    (["--config.finetune.batch_size=127"], "finetune.batch_size"),      # Not a multiple of 2.
    (["--config.finetune.batch_size=16384"], "finetune.batch_size"),    # > finetune_examples.
    (["--config.eval.batch_size=7"], "eval.batch_size"),                # Not a multiple of 2.
    (["--config.eval.batch_size=0"], "eval.batch_size"),
    (["--config.finetune.warmup_steps=-1"], "finetune.warmup_steps"),
    (["--config.finetune.grad_clip=0"], "finetune.grad_clip"),
    (["--config.finetune.grad_clip=nan"], "finetune.grad_clip"),
    (["--config.finetune.checkpoint_every_steps=0"], "finetune.checkpoint_every_steps"),
    (["--config.finetune.log_every_steps=0"], "finetune.log_every_steps"),
    (["--config.sweep.lr=(5e-3,5e-4)"], "sweep.lr"),                    # lo > hi.
    (["--config.sweep.lr=(0,1e-3)"], "sweep.lr"),                       # Log-uniform from 0.
    (["--config.sweep.lr=(1e-3,)"], "sweep.lr"),                        # Not a pair.
    (["--config.sweep.weight_decay=(1e-4,2.0)"], "sweep.weight_decay"),
    (["--config.sweep.epochs=(0,3)"], "sweep.epochs"),
    (["--config.sweep.epochs=(3,2)"], "sweep.epochs"),
    (["--config.sweep.epochs=(2.5,3)"], "sweep.epochs"),
    (["--config.sweep.label_smoothing=(0,1.5)"], "sweep.label_smoothing"),
    (["--config.sweep.mixup=(-0.1,0.4)"], "sweep.mixup"),
    (["--config.sweep.aug_strength=(0,2)"], "sweep.aug_strength"),
    (["--config.sweep.p_zero_smoothing=1.5"], "sweep.p_zero_smoothing"),
    (["--config.sweep.p_zero_mixup=-0.5"], "sweep.p_zero_mixup"),
    (["--config.sweep.p_no_aug=2"], "sweep.p_no_aug"),
    (["--config.sweep.seed=-1"], "sweep.seed"),
    (["--config.sweep.only=13"], "sweep.only"),                         # 12 members.
    (["--config.sweep.only=1,x"], "sweep.only"),
    (["--config.probe.validation_fraction=1.0"], "probe.validation_fraction"),
    (["--config.probe.validation_fraction=0"], "probe.validation_fraction"),
    (["--config.probe.max_iterations=0"], "probe.max_iterations"),
    (["--config.probe.tolerance=-1e-5"], "probe.tolerance"),
    (["--config.probe.l2_grid=(0,1e-4)"], "probe.l2_grid"),
    (["--config.probe.examples=-1"], "probe.examples"),
    (["--config.data.held_out_examples=0"], "data.held_out_examples"),
    (["--config.data.finetune_examples=-5"], "data.finetune_examples"),
    (["--config.data.upstream_examples=50000"], "data.upstream_examples"),  # Sum > 60,000.
    (["--config.data.held_out_examples=60001"], "data.held_out_examples"),
    (["--config.data.test_examples=0"], "data.test_examples"),
    (["--config.data.shift_examples=-1"], "data.shift_examples"),
    (["--config.data.split_seed=-1"], "data.split_seed"),
    (["--config.seed=-1"], "seed"),
    (["--config.model.depth=0"], "model.depth"),
    (["--config.model.num_heads=3"], "model.num_heads"),               # 64 % 3 != 0.
    ([UPSTREAM, "--config.upstream.lr=0"], "upstream.lr"),
    ([UPSTREAM, "--config.upstream.epochs=0"], "upstream.epochs"),
    ([UPSTREAM, "--config.upstream.batch_size=255"], "upstream.batch_size"),
    ([UPSTREAM, "--config.upstream.weight_decay=-0.05"], "upstream.weight_decay"),
    ([UPSTREAM, "--config.upstream.temperature=0"], "upstream.temperature"),
    ([UPSTREAM, "--config.upstream.crop_min_scale=0"], "upstream.crop_min_scale"),
    # Never valid: refused though this run would not read them (the checked-whole config).
    (["--config.upstream.epochs=-2"], "upstream.epochs"),             # The start is loaded.
    (["--config.upstream.lr=0"], "upstream.lr"),
    (["--config.upstream.objective=byol"], "upstream.objective"),
    (["--config.probe.kind=zeroshot", "--config.probe.l2_grid=(0,1e-4)"], "probe.l2_grid"),
    (["--config.soups.recipes=('uniform_soup',)", "--config.soups.learned.epochs=0"],
     "soups.learned.epochs"),
    (["--config.soups.learned.epochs=0"], "soups.learned.epochs"),
    (["--config.soups.learned.lr=-0.05"], "soups.learned.lr"),
    (["--config.soups.learned.batch_size=0"], "soups.learned.batch_size"),
    (["--config.soups.wise_ft.alphas=(0,1.5)"], "soups.wise_ft.alphas"),
    (["--config.soups.pixel_linear.validation_fraction=1.2"],
     "soups.pixel_linear.validation_fraction"),
    (["--config.soups.greedy_comparison=>>"], "soups.greedy_comparison"),
    (["--config.report.bootstrap_resamples=0"], "report.bootstrap_resamples"),
    (["--config.report.landscape_grid=1"], "report.landscape_grid"),
    (["--config.report.landscape_examples=-1"], "report.landscape_examples"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_override_is_refused_naming_field_value_and_fix(overrides, field):
  config = config_of(*overrides)
  with pytest.raises(validate.ConfigError) as refused:
    check(config)
  message = str(refused.value)
  value = validate._get(config, field)
  assert "\n" not in message, message
  assert message.startswith(f"config.{field} must be "), message
  assert f"got {value!r}" in message, message           # The bad value...
  assert f"--config.{field}" in message, message        # ...and the override that fixes it.


GOOD = [  # (overrides, the values the checked config must hold).
    ([], {"sweep.num_members": 12, "eval.batch_size": 500}),
    # Pretrained: unread; a batch of 7 splits over 1 device, so it is not refused here.
    (["--config.upstream.epochs=5", "--config.upstream.batch_size=7"],
     {"upstream.epochs": 5, "upstream.batch_size": 7}),
    (["--config.sweep.only=1,12", "--config.eval.batch_size=8"],
     {"sweep.only": "1,12", "eval.batch_size": 8}),
    (["--config.sweep.lr=(1e-3,1e-3)", "--config.sweep.mixup=(0.0,2.0)"],  # mixup: Beta's alpha.
     {"sweep.lr": (1e-3, 1e-3), "sweep.mixup": (0.0, 2.0)}),
    (["--config.probe.examples=0", "--config.report.landscape_examples=0"],  # 0: all of them.
     {"probe.examples": 0, "report.landscape_examples": 0}),
]


@pytest.mark.parametrize("overrides,values", GOOD, ids=[" ".join(o) or "default" for o, _ in GOOD])
def test_good_overrides_pass_and_keep_their_values(overrides, values):
  config = config_of(*overrides)
  check(config)
  for field, value in values.items():
    got = validate._get(config, field)
    assert got == value and type(got) is type(value), (field, got)


def test_a_never_valid_value_in_an_unread_block_says_why_it_is_refused():
  with pytest.raises(validate.ConfigError) as refused:
    check(config_of("--config.upstream.epochs=-2"))
  assert str(refused.value) == (
      "config.upstream.epochs must be an integer >= 1, got -2 (this run does not read it, as "
      "config.init.source is not 'upstream': the start is loaded, not pretrained here, but no "
      "run could use this value); e.g. --config.upstream.epochs=1.")


def _ignored_warnings(caplog, config) -> list[str]:
  caplog.clear()
  with caplog.at_level("WARNING", logger="soup.validate"):
    validate.warn_ignored(config)
  return [r.getMessage() for r in caplog.records if r.name == "soup.validate"]


def test_fields_the_run_will_not_read_are_named_once_with_why(caplog):
  config = config_of("--config.upstream.epochs=5", "--config.soups.recipes=('uniform_soup',)")
  check(config)
  (message,) = _ignored_warnings(caplog, config)  # One warning for every ignored field.
  assert message.startswith("ignored by this run (set, but not read): config.upstream.{"
                            "objective, epochs, batch_size, lr,")
  assert "(config.init.source is not 'upstream': the start is loaded, not pretrained here)" \
      in message
  assert "config.soups.learned.{epochs, lr, batch_size}" in message
  assert "(no recipe of config.soups.recipes reads it)" in message
  assert "include_initialization" not in message  # Shared: read by every recipe.
  # Pretrained here with SimCLR, every recipe run: every field is read, nothing to say.
  assert _ignored_warnings(caplog, config_of(UPSTREAM)) == []
  # A supervised upstream: the SimCLR fields alone are ignored, and say why.
  (message,) = _ignored_warnings(caplog, config_of(UPSTREAM,
                                                   "--config.upstream.objective=supervised"))
  assert message == ("ignored by this run (set, but not read): config.upstream.{temperature, "
                     "projection_hidden, projection_out, crop_min_scale, jitter} "
                     "(config.upstream.objective is not 'simclr').")


def test_suggested_fixes():
  def message(*overrides):
    with pytest.raises(validate.ConfigError) as refused:
      check(config_of(*overrides))
    return str(refused.value)
  assert message("--config.eval.batch_size=7").endswith("e.g. --config.eval.batch_size=8.")
  assert message("--config.sweep.num_members=-3").endswith("--config.sweep.num_members=1.")
  assert "--config.sweep.lr='(0.0005, 0.005)'" in message("--config.sweep.lr=(5e-3,5e-4)")


def _config_args():
  """(config file, argument) for every config in configs/: its ARGS, alone and with smoke."""
  known = {"clip_vit_b32_imagenet": ("smoke", "released", "released,smoke"),
           "vit_b16_imagenet": ("smoke",),
           "clip_vit_bigg14_imagenet": ("smoke", "ViT-g-14", "ViT-g-14,smoke")}
  out = []
  for path in sorted(glob.glob(str(ROOT / "configs" / "*.py"))):
    name = Path(path).stem
    if name == "__init__":
      continue
    module = configs.module_of(path)
    args = getattr(module, "ARGS", None)
    if args is None:
      args = known.get(name, ("smoke",))
    else:
      args = (*args, *(f"{a},smoke" for a in args if a != "smoke"))
    out += [(name, arg) for arg in ("", *args)]
  return out


@pytest.mark.parametrize("name,arg", _config_args())
def test_every_shipped_config_passes(name, arg):
  module = configs.module_of(ROOT / "configs" / f"{name}.py")
  config = module.get_config(arg)
  before = config.to_dict()
  for devices in (1, 2):
    check(config, module, devices)
  assert config.to_dict() == before  # The check reads the config; it changes nothing.
  if arg:  # Each argument changes the config: none is silently ignored.
    assert before != module.get_config("").to_dict(), arg
  if "smoke" in arg.split(","):
    assert config.sweep.num_members < module.get_config("").sweep.num_members


def test_released_sweep_may_hold_model_0_only():
  clip = configs.module_of(ROOT / "configs/clip_vit_b32_imagenet.py")
  config = clip.get_config("released,smoke")
  config.sweep.num_members = 0  # scripts/import_official.py with model_0 only.
  check(config, clip)
  trained = clip.get_config("smoke")
  trained.sweep.num_members = 0
  with pytest.raises(validate.ConfigError, match="sweep.num_members must be an integer >= 1"):
    check(trained, clip)


@pytest.mark.slow
@pytest.mark.parametrize("override,field", [
    ("--config.sweep.num_members=-3", "sweep.num_members"),
    ("--config.finetune.batch_size=0", "finetune.batch_size"),
    ("--config.eval.batch_size=7", "eval.batch_size"),  # On soup.main's 2 host devices.
    ("--config.upstream.epochs=-2", "upstream.epochs"),  # Unread (a loaded start), never valid.
])
def test_cli_refuses_before_compute(override, field, tmp_path):
  workdir = tmp_path / "wd"
  proc = run_python(["-m", "soup.main", f"--config={FASHION}", f"--workdir={workdir}", override],
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=120,
                    check=False)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith(f"error: config.{field} "), proc.stderr[-3000:]
  assert not workdir.exists() or not any(workdir.iterdir())  # Nothing computed, nothing written.
