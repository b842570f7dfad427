"""``xenpool chaos``: a fault-injection campaign against a real pool.

``model``: the pure parts (seeded schedule, invariant checker, log analysis, report);
``bed``: the test bed (network namespaces on a bridge, real ``twistd -n`` daemons);
``faults``: one small function per fault kind; ``campaign``: the trial loop and the CLI.
"""
