import os

from hypothesis import HealthCheck, settings

# CI runs a fixed, bounded number of cases; XENPOOL_HYPOTHESIS=long for a deeper local run.
settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("XENPOOL_HYPOTHESIS", "ci"))
