"""The datasets: the registry (registry.py), the Task interface (task.py), and one module per
dataset. Every dataset raises DatasetMissingError when its files are not where the config says."""


class DatasetMissingError(FileNotFoundError):
  """A dataset is not where the config says; the message says how to get or prepare it."""
