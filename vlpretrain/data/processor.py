"""``VLProcessor``: images + text -> model inputs, with the training pipeline's own eval transform.

A processor is an :class:`~vlpretrain.data.images.ImageSettings` (size, mean/std, ...) plus a
tokenizer and a context length. Images go through the exact :class:`ImageTransform` the evaluation
stream uses (resize shorter side, centre crop, normalise) and captions through
:func:`~vlpretrain.data.tokenizer.encode_captions` (``BOS ... EOS``, padded to the longest).

It saves as a folder: ``vlprocessor_config.json`` next to the tokenizer files, so one hub folder can
hold model, tokenizer and processor. (A plain class rather than an HF ``ProcessorMixin``: the mixin
needs an HF image-processor class registered by name, which buys nothing here.)
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from transformers import BatchFeature

from vlpretrain.data.images import ImageSettings, ImageTransform
from vlpretrain.data.tokenizer import encode_captions, load_tokenizer

CONFIG_NAME = "vlprocessor_config.json"


class VLProcessor:
    """``processor(images=[...], text=[...], return_tensors="pt")`` -> ``pixel_values`` (B, 3, S, S),
    ``input_ids`` / ``attention_mask`` (B, T)."""

    def __init__(self, tokenizer, image_settings: ImageSettings | None = None, context_length: int = 64):
        self.tokenizer = tokenizer
        self.image_settings = image_settings or ImageSettings()
        self.context_length = context_length
        self.image_transform = ImageTransform(self.image_settings, train=False)

    @classmethod
    def from_data_config(cls, data_cfg, image_size: int, context_length: int, tokenizer) -> VLProcessor:
        """The processor matching a training run's ``data`` section and model sizes, with the run's
        ``tokenizer`` (given, never re-read from ``data.tokenizer``: a run keeps the one it trains with)."""
        settings = ImageSettings(size=image_size, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                                 max_pixels=data_cfg.max_image_pixels)
        return cls(tokenizer, settings, context_length)

    def __call__(self, images=None, text=None, return_tensors: str = "pt") -> BatchFeature:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors='{return_tensors}' is not supported; use 'pt'.")
        if images is None and text is None:
            raise ValueError("give images=, text= or both.")
        out = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            out["pixel_values"] = self.preprocess_images(images)  # (B, 3, S, S)
        if text is not None:
            text = [text] if isinstance(text, str) else list(text)
            out.update(encode_captions(self.tokenizer, text, self.context_length))  # (B, T) each
        return BatchFeature(out, tensor_type="pt")

    def preprocess_images(self, images: list):
        """PIL images or image file paths -> normalised float (B, 3, S, S)."""
        import torch

        tensors = []
        for img in images:
            if isinstance(img, (str, Path)):
                img = self.image_transform.decode(Path(img).read_bytes())
            elif isinstance(img, Image.Image):
                img = self.image_transform.prepare(img)
            else:
                raise TypeError(f"images must be PIL images or file paths, not {type(img).__name__}.")
            tensors.append(self.image_transform(img))  # (3, S, S) uint8
        return self.image_transform.normalize(torch.stack(tensors))

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """Token ids (e.g. ``model.generate`` output) -> captions."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        config = {"processor_class": type(self).__name__, "context_length": self.context_length,
                  "image": self.image_settings.to_dict()}
        tmp = path / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps(config, indent=2))
        tmp.replace(path / CONFIG_NAME)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Remember the auto class this class was loaded through (``AutoProcessor`` calls this on
        remote-code classes, as for HF's own processors)."""
        cls._auto_class = auto_class

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False, revision: str | None = None,
                        token: str | None = None, cache_dir: str | None = None,
                        _from_auto: bool = False) -> VLProcessor:
        """Load from a local folder or a hub repo id (downloaded with huggingface_hub at ``revision``).

        ``trust_remote_code`` and ``_from_auto`` are accepted because ``AutoProcessor`` passes them;
        nothing here runs code from the folder (its JSON and tokenizer files are data).
        """
        path = Path(path)
        if not path.is_dir() and not path.is_absolute() and str(path).count("/") == 1:
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(repo_id=str(path), revision=revision, token=token,
                                                 cache_dir=cache_dir))
            except Exception:  # not a reachable repo either: the missing-folder error below says what to do
                pass
        config_file = path / CONFIG_NAME
        if not config_file.is_file() and (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"'{path}' is a vlpretrain trainer checkpoint, not a model folder; run "
                                    f"`vlpretrain export {path} --out DIR` first and load DIR (or "
                                    "vlpretrain.export.source.load_source, which reads the checkpoint's processor).")
        if not config_file.is_file():
            raise FileNotFoundError(f"'{path}' has no {CONFIG_NAME}; save a processor there with "
                                    "VLProcessor.save_pretrained (the trainer's export does).")
        config = json.loads(config_file.read_text())
        return cls(load_tokenizer(path), ImageSettings.from_dict(config["image"]), config["context_length"])
