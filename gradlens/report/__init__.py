"""Pure renderers: results in, text out.

Besides `gradlens.cli`, the only package that imports rich (and matplotlib).
"""
