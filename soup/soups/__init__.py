"""Model-agnostic soup recipes over param pytrees or ingredient checkpoint paths.

Nothing here knows about models: recipes take params (or paths), a layout
(soup/soups/average.py: host, flat-sharded or the train state's shardings) and an
evaluation function (params -> held-out accuracy) or an apply function.
"""

from soup.soups.average import (
                                IngredientMismatchError,
                                Layout,
                                RunningMean,
                                check_compatible,
                                restore,
                                weighted_average,
)
from soup.soups.ensemble import greedy_ensemble, logit_ensemble
from soup.soups.greedy import GreedyResult, greedy_soup
from soup.soups.interpolation import model_stock, wise_ft
from soup.soups.learned import LearnedSoupResult, learned_soup
