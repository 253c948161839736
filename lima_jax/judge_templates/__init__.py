"""Judge prompt templates (pairwise.txt, likert.txt), read with lima_jax.report.load_template.

A package (not a bare folder) so setup.py's package_data "*.txt" ships the templates in wheels too.
"""
