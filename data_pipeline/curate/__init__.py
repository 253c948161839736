"""Curation of LIMA-style pairs from raw sources (LIMA §2.1); each module reports per-rule drop counts."""
