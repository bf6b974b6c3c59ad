"""The demo's and the tests' models and data: the tiny demo models the workflow builds,
the shape-faithful miniatures of real checkpoints (with the InternVL chat family's), and
drawn shapes with their ground truth. The demo may import the stages, the families and
the core; nothing but the top level (cli, checks) and the tests import the demo.
"""
