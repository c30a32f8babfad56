"""pychop.integrations: adapters to other libraries (``pychop.integrations.diffusers``), imported on use."""
