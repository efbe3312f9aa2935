"""Benchmarks: each compares ours, baselines and dense in one run, prints a table and writes JSON
under docs/results/. Run them as scripts (`python bench/quality.py --help`)."""
