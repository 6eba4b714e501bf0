"""Caption tokenizer: SentencePiece training, HuggingFace packaging, and batch encoding.

``vlpretrain tokenizer`` trains a SentencePiece BPE model on the captions of some shards and
saves it as a HuggingFace tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``, plus the
original ``tokenizer.model``) that ``transformers.AutoTokenizer.from_pretrained(DIR)`` loads without
sentencepiece. Special ids follow the model's conventions: pad=0, bos=1, eos=2, unk=3, mask=4.

:func:`encode_captions` is the one caption -> ids function (pipeline and processor): ``BOS tokens
EOS``, truncated to the context length keeping EOS, right-padded to the longest caption in the batch.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "mask_token": "<mask>"}
SPECIAL_IDS = {"pad_token": 0, "bos_token": 1, "eos_token": 2, "unk_token": 3, "mask_token": 4}


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train SentencePiece (BPE, no normalisation) on ``captions``; save an HF tokenizer folder.

    The vocabulary may come out smaller than ``vocab_size`` on a small corpus (soft limit); the
    saved tokenizer's ``len()`` is the true size. The folder is assembled aside and moved into place
    only when complete.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    if vocab_size < 8:
        raise ValueError(f"--vocab-size {vocab_size} is too small: 5 ids are special; use >= 8.")
    texts = [c for c in captions if c.strip()]
    if not texts:
        raise ValueError("no non-empty captions to train the tokenizer on; check --data.")
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists()
                                 else None))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(work / "spm"), model_type="bpe",
            vocab_size=vocab_size, hard_vocab_limit=False, normalization_rule_name="identity",
            character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
            user_defined_symbols=["<mask>"], minloglevel=2, num_threads=1,
        )
        hf = _to_hf_tokenizer(work / "spm.model")
        hf.save_pretrained(work / "hf")
        shutil.copy(work / "spm.model", work / "hf" / "tokenizer.model")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (work / "hf").rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _to_hf_tokenizer(spm_model: Path):
    """A SentencePiece BPE model as a ``tokenizers`` BPE fast tokenizer (same pieces and merges)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}  # {piece: id}
    for name, idx in SPECIAL_IDS.items():
        if vocab.get(SPECIAL_TOKENS[name]) != idx:
            raise RuntimeError(f"SentencePiece did not put {SPECIAL_TOKENS[name]} at id {idx}.")
    # the BPE merges implied by the piece order (as transformers does); vocab_scores=None is spelled out:
    # transformers <= 5.17 has no default for it (seen on the GPU machine's 5.17: TypeError)
    merges = generate_merges(vocab, None)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=SPECIAL_TOKENS["unk_token"], fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=10**6, **SPECIAL_TOKENS)


def load_tokenizer(path: str | Path):
    """A local HuggingFace tokenizer folder; a clear error if it is missing or lacks pad/bos/eos."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder '{path}' does not exist; create one with "
                                f"`vlpretrain tokenizer --data SHARDS --vocab-size N --out {path}` "
                                "or point data.tokenizer at a local HuggingFace tokenizer folder.")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # a tokenizer never runs folder code
    missing = [n for n in ("pad_token_id", "bos_token_id", "eos_token_id") if getattr(tok, n) is None]
    if missing:
        raise ValueError(f"tokenizer '{path}' has no {', '.join(missing)}; captions are encoded as "
                         "BOS ... EOS with padding. Add those special tokens to the tokenizer.")
    return tok


def encode_captions(tokenizer, captions: list[str], context_length: int, pad_multiple: int = 1
                    ) -> dict[str, torch.Tensor]:
    """Captions -> ``input_ids``/``attention_mask`` (B, T), T = longest ``BOS ... EOS`` rounded up to a
    multiple of ``pad_multiple``, capped at ``context_length``; truncation keeps EOS; right padding with
    the pad id."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for BOS and EOS.")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple} must be >= 1 (1: pad to the longest caption).")
    pieces = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [[bos, *p[: context_length - 2], eos] for p in pieces]
    width = max((len(r) for r in rows), default=2)
    width = min(-(-width // pad_multiple) * pad_multiple, context_length)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece caption tokenizer, saved for AutoTokenizer")
    p.add_argument("--data", required=True, help="shards to read captions from (same syntax as data.train)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (soft limit)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_tokenizer)


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from vlpretrain.data.reader import iter_captions

    out = train_tokenizer(iter_captions(args.data), args.vocab_size, args.out)
    tok = load_tokenizer(out)
    print(f"wrote tokenizer to {out}: {len(tok)} tokens (pad={tok.pad_token_id}, bos={tok.bos_token_id}, "
          f"eos={tok.eos_token_id}, unk={tok.unk_token_id}, mask={tok.mask_token_id})")
    return 0
