"""Model assembly: the shared backbone, heads, the HF model class and size presets."""
