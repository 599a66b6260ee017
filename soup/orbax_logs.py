"""Quiets one Orbax log line that is expected here: the OCDBT merge warning.

Orbax tries to merge OCDBT files after every save, and warns when (as for ingredients
and train states, saved without OCDBT by design) there are none. `quiet` installs the
filter on absl's logger once; the modules that save call it.
"""

from __future__ import annotations

import logging


class _NoOcdbtMergeWarning(logging.Filter):
  """Drops "Skipping merge of OCDBT" records."""

  def filter(self, record):
    return "Skipping merge of OCDBT" not in record.getMessage()


_FILTER = _NoOcdbtMergeWarning()


def quiet() -> None:
  """Installs the filter on the absl logger (idempotent)."""
  logger = logging.getLogger("absl")
  if _FILTER not in logger.filters:
    logger.addFilter(_FILTER)
