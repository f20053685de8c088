"""The benchmark harness and client-side tools (`mixserve bench`, `mixserve routing`, run as their own
process), the scenario scripts and their recorded results (results/), the namespaced-hosts harness
(netns.py) and load clients (load.py) that tests and benchmarks share. Nothing in the product imports
this package.
"""
