"""Adapters from third-party models to pychop (imported on demand; each needs its library installed)."""
