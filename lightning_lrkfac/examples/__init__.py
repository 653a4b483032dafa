"""Demo models and DataModules for the configs, examples, tests and benchmarks.

Not imported by ``import lightning_lrkfac``: they need scikit-learn, mnist1d or torchvision.
"""
