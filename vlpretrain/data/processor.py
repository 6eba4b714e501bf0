"""``VLProcessor``: images + text -> model inputs, a transformers ``ProcessorMixin``.

A processor is a :class:`~vlpretrain.data.image_processor.VLImageProcessor` (the evaluation stream's own
image transform) plus the caption tokenizer and the model's context length. Text is encoded as the
training pipeline encodes captions: ``BOS tokens EOS``, truncation keeps EOS, right padding with the pad
id (text positions count from the first token, so padding is always on the right, whatever the tokenizer's
``padding_side`` says). Defaults: ``padding="longest"``, ``truncation=True``, ``max_length`` = the context
length and ``return_tensors="pt"``, so a call with no options gives a batch the model takes.

It saves as transformers processors do: ``processor_config.json`` (the image processor's CLIP-style keys
nested under ``image_processor``, and ``context_length``) next to the tokenizer files, and loads from a
local folder or a hub repo (hub errors raise as themselves). In an ``hf`` export ``AutoProcessor`` finds it
through ``auto_map`` (``trust_remote_code=True``), with no vlpretrain installed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin, TextKwargs
from transformers.utils import cached_file

from vlpretrain.data.image_processor import VLImageProcessor
from vlpretrain.data.images import ImageSettings
from vlpretrain.data.tokenizer import load_tokenizer

CONFIG_NAME = "processor_config.json"
LEGACY_CONFIG_NAME = "vlprocessor_config.json"  # written by vlpretrain before the processor was a ProcessorMixin
_TEXT_KEYS = set(TextKwargs.__annotations__)
_HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class VLProcessor(ProcessorMixin):
    """``processor(images=[...], text=[...])`` -> ``pixel_values`` (B, 3, S, S), ``input_ids`` /
    ``attention_mask`` (B, T)."""

    def __init__(self, image_processor: VLImageProcessor, tokenizer, context_length: int = 64, chat_template=None):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        missing = [n for n in ("pad_token_id", "bos_token_id", "eos_token_id") if getattr(tokenizer, n) is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)}; captions are encoded as BOS ... EOS "
                             "with padding. Add those special tokens to the tokenizer.")
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for BOS and EOS.")
        self.context_length = context_length

    @classmethod
    def from_data_config(cls, data_cfg, image_size: int, context_length: int, tokenizer) -> VLProcessor:
        """The processor matching a training run's ``data`` section and model sizes, with the run's
        ``tokenizer`` (given, never re-read from ``data.tokenizer``: a run keeps the one it trains with)."""
        settings = ImageSettings(size=image_size, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                                 max_pixels=data_cfg.max_image_pixels)
        return cls(VLImageProcessor.from_settings(settings), tokenizer, context_length)

    # views used by the trainer, eval and export
    @property
    def image_settings(self) -> ImageSettings:
        return self.image_processor.settings

    @property
    def image_transform(self):
        return self.image_processor.transform

    # -- calling ------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, videos=None, audio=None, return_tensors="pt", text_kwargs=None,
                 images_kwargs=None, **kwargs) -> BatchFeature:
        """``images``: one or a list of PIL images, file paths, arrays or tensors. ``text``: a string or a
        list. Text options (``padding``, ``truncation``, ``max_length``, ``pad_to_multiple_of``, other tokenizer
        arguments) and image options (``size``, ``image_mean``, ...) may be given flat or as
        ``text_kwargs=`` / ``images_kwargs=`` dicts, as with transformers processors."""
        if videos is not None or audio is not None:
            raise ValueError("VLProcessor takes images and text only.")
        if images is None and text is None:
            raise ValueError("give images=, text= or both.")
        text_kwargs, images_kwargs = dict(text_kwargs or {}), dict(images_kwargs or {})
        image_keys = set(VLImageProcessor._keys(self.image_settings))
        for key, value in kwargs.items():
            if key in _TEXT_KEYS:
                text_kwargs[key] = value
            elif key in image_keys:
                images_kwargs[key] = value
            else:
                raise ValueError(f"VLProcessor got an unknown argument '{key}': text arguments are the tokenizer's "
                                 f"({', '.join(sorted(_TEXT_KEYS))}); image arguments are {sorted(image_keys)}.")
        out = {}
        if images is not None:
            out.update(self.image_processor(images, return_tensors=None, **images_kwargs))
        if text is not None:
            out.update(self.tokenize([text] if isinstance(text, str) else list(text), **text_kwargs))
        return BatchFeature(out, tensor_type=return_tensors)

    def tokenize(self, texts: list[str], padding="longest", truncation=True, max_length: int | None = None,
                    pad_to_multiple_of: int | None = None, add_special_tokens: bool = True,
                    return_attention_mask: bool = True, return_tensors=None, padding_side=None, **tokenizer_kwargs
                    ) -> dict:
        """Texts -> ``input_ids`` / ``attention_mask``: ``BOS tokens EOS`` per text, truncated to ``max_length``
        keeping EOS, padded on the right per ``padding`` (``longest``/True, ``max_length``, False). Other
        tokenizer arguments go to the tokenizer call that splits the texts."""
        del return_tensors, padding_side  # tensors are made by __call__; padding is on the right (see module doc)
        max_length = self.context_length if max_length is None else max_length
        padding, truncation = (getattr(v, "value", v) for v in (padding, truncation))  # transformers' enums
        mode = {True: "longest", False: "do_not_pad", None: "do_not_pad"}.get(padding, padding)
        truncate = truncation not in (False, None, "do_not_truncate")
        if mode not in ("longest", "max_length", "do_not_pad") or (truncate and max_length < 2):
            raise ValueError(f"padding={padding!r} / max_length={max_length}: use padding 'longest', 'max_length' "
                             "or False, and max_length >= 2 (BOS and EOS).")
        tok = self.tokenizer
        pieces = tok(texts, add_special_tokens=False, **tokenizer_kwargs)["input_ids"]
        specials = ([tok.bos_token_id], [tok.eos_token_id]) if add_special_tokens else ([], [])
        keep = max_length - len(specials[0]) - len(specials[1]) if truncate else None
        rows = [specials[0] + p[:keep] + specials[1] for p in pieces]
        width = max_length if mode == "max_length" else max((len(r) for r in rows), default=0)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        if mode == "do_not_pad":
            out = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        else:
            out = {"input_ids": [r + [tok.pad_token_id] * (width - len(r)) for r in rows],
                   "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]}
        if not return_attention_mask:
            del out["attention_mask"]
        return out

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Token ids (B, T), e.g. ``model.generate`` output -> texts, without BOS/EOS/pad by default."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """One sequence of token ids -> text, without BOS/EOS/pad by default."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    # -- saving and loading -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VLProcessor:
        """Load from a local folder or a hub repo id (``revision``, ``token``, ``cache_dir``, ... as for
        transformers); a hub error (no access, no such repo, offline) raises as transformers raises it.
        ``trust_remote_code`` only lets the tokenizer loader read the folder's remote config; the auto classes'
        private arguments are accepted and unused."""
        hub = {k: kwargs[k] for k in _HUB_KEYS if kwargs.get(k) is not None}
        path = Path(str(pretrained_model_name_or_path))
        if path.is_dir() and not (path / CONFIG_NAME).is_file():
            if (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"'{path}' is a vlpretrain trainer checkpoint, not a model folder; run "
                                        f"`vlpretrain export {path} --out DIR` first and load DIR (or "
                                        "vlpretrain.export.source.load_source, which reads the checkpoint's processor).")
            if (path / LEGACY_CONFIG_NAME).is_file():
                legacy = json.loads((path / LEGACY_CONFIG_NAME).read_text())
                return cls(VLImageProcessor.from_settings(ImageSettings.from_dict(legacy["image"])),
                           load_tokenizer(path), legacy["context_length"])
            raise FileNotFoundError(f"'{path}' has no {CONFIG_NAME} (nor the older {LEGACY_CONFIG_NAME}); save a "
                                    "processor there with VLProcessor.save_pretrained (the trainer's export does).")
        config = json.loads(Path(cached_file(str(pretrained_model_name_or_path), CONFIG_NAME, **hub)).read_text())
        # the caller's trust_remote_code lets AutoTokenizer read the export's config.json (remote VLConfig) quietly
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained_model_name_or_path),
                                                  trust_remote_code=bool(kwargs.get("trust_remote_code")), **hub)
        return cls(VLImageProcessor.from_dict(config["image_processor"]), tokenizer, config["context_length"])

