"""Subnet Explorer: training-free architecture search for smaller, faster subnets of a causal LM.

Pipeline, one module a step: loading -> data -> importance -> search -> slicing -> reform ->
evaluation -> export. The engine never imports Gradio.
"""

__version__ = "0.1.0"
