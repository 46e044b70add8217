"""callcast's benchmark suite: callcast next to the raw broker clients and FastStream, in one run.

Run ``make bench`` (or ``python -m bench --help``); see ``bench/README.md`` for the method and the
format of ``bench/results/latest.json``.
"""
