"""``make bench``: the performance harness of visitorstats (see BENCHMARKS.md).

Every figure is measured against real processes on this machine and reported beside a baseline
measured in the same run, on the same machine, with the same number of processes.
"""
