"""Hypothesis profiles for the whole suite.

``ci`` (the default, what ``./dev.sh test`` and CI run) derives every property test's
examples from the test itself (``derandomize``), so a run on a fresh clone tries the
same examples as the run before it: a red CI names a property that fails for a
reproducible input, not a lucky draw. ``explore`` draws fresh random examples each run
(``./dev.sh test --hypothesis-profile explore``) to search further.
"""

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("ci")
