"""pychop.integrations: adapters to other libraries, imported on use (each needs its library installed)."""
