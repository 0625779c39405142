"""badexpert: detect backdoor (trojan) inputs to an image classifier with BaDExpert."""

__version__ = "0.1.0"
