"""Developer tools: the demos, the fuzzer, the benchmarks, sample messages and the process helpers they share.

None of this runs in a daemon; ``xenpool ...`` (``xenpool/cli.py``) and the tests use it.
"""
