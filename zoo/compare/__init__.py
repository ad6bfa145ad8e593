"""`zoo compare`: families sized to one parameter budget, trained on the same tasks with a
learning-rate sweep, measured (FLOPs, speed, memory, decoding) and reported. See docs/compare.md.

Modules: families (builders and the width solver), tasks (the task list), sweep (vmapped
learning-rate sweep), measure (FLOPs, peak, decoding), harness (the run), report (results.json,
report.md, plots), scaling (model-size sweep and power-law fit).
"""
