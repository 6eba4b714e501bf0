"""Export: a hub folder with remote code (``hf``), and the command ``vlpretrain export``."""
