"""The evaluation a training run does on ``data.val``: retrieval, caption token accuracy, captions.

Every rank embeds its share of the validation shards (shard ``i`` goes to rank ``i mod world``; a rank
without a shard contributes nothing), and rank 0 gathers the per-sample results with their (shard,
position), orders them by shard then position, keeps the first ``eval.max_samples`` and
computes the figures. A shard is cut into batches from its start and a batch never spans two shards,
so each sample is embedded in the same batch whatever the number of processes: the embeddings, and
with them R@k, equal the single-process evaluation's bit for bit.

Every rank makes the same sequence of model calls, in lockstep: a rank whose shards are done embeds a
one-sample dummy batch (and drops it) while another rank still has batches, and every rank generates
the few sample captions (on rank 0's images). Under FSDP each of those calls is a collective, so the
``model`` given must run sharded ``encode_image``/``encode_text``/``forward``/``generate`` on every rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlpretrain.data.images import BadSample
from vlpretrain.data.reader import SkipCounter, expand_sources, iter_shard
from vlpretrain.data.tokenizer import encode_captions
from vlpretrain.eval.metrics import multi_caption_recall

EVAL_BATCH = 64  # samples per validation batch (a shard's last batch may hold fewer)


def rank_shards(urls: list[str], rank: int, world_size: int) -> list[tuple[int, str]]:
    """(index, url) of the validation shards ``rank`` reads: every ``world_size``-th from ``rank`` on
    (none for a rank beyond the number of shards)."""
    return [(i, url) for i, url in enumerate(urls) if i % world_size == rank]


class ValShards(IterableDataset):
    """Batches of some validation shards, each within one shard, tagged with their (shard, positions).

    Images go through the processor's evaluation transform, the first caption is tokenised (padded to
    the batch's longest, rounded up to ``pad_multiple``). DataLoader workers split the shards; each
    worker reads its shards in index order and stops after a batch that brings it to ``max_samples``
    (0: never): the first ``max_samples`` samples overall are then always among those read.
    """

    def __init__(self, shards: list[tuple[int, str]], processor, *, pad_multiple: int = 1,
                 batch_size: int = EVAL_BATCH, max_samples: int = 0):
        self.shards, self.processor, self.pad_multiple = shards, processor, pad_multiple
        self.batch_size, self.max_samples = batch_size, max_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        read = 0
        for index, url in self.shards[worker::workers]:
            for batch in self._shard_batches(index, url):
                yield batch
                read += len(batch["keys"])
                if self.max_samples and read >= self.max_samples:
                    return

    def _shard_batches(self, index: int, url: str) -> Iterator[dict[str, Any]]:
        transform, items = self.processor.image_transform, []
        for position, sample in enumerate(iter_shard(url, SkipCounter())):
            try:
                items.append((transform(transform.decode(sample.image)), sample.captions[0], position, sample.key))
            except BadSample:
                continue
            if len(items) == self.batch_size:
                yield self._batch(index, items)
                items = []
        if items:
            yield self._batch(index, items)

    def _batch(self, index: int, items: list) -> dict[str, Any]:
        pixels = self.processor.image_transform.normalize(torch.stack([p for p, _, _, _ in items]))  # (B, 3, S, S)
        text = encode_captions(self.processor.tokenizer, [c for _, c, _, _ in items], self.processor.context_length,
                               self.pad_multiple)
        return {"pixel_values": pixels, **text, "order": [(index, pos) for _, _, pos, _ in items],
                "keys": [k for _, _, _, k in items]}


def _as_is(batch: dict) -> dict:
    """The loader's collate function: batches are made in the dataset (the default would turn tuples into lists)."""
    return batch


def evaluate_val_shards(model, processor, spec: str, *, max_samples: int, num_captions: int, max_new_tokens: int,
                        device, captioning: bool, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                        pad_multiple: int = 1, batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """Figures of ``model`` on the validation shards ``spec``, this rank embedding its share (see the
    module doc). Every rank must call it; rank 0 gets the figures, the others ``{}``."""
    urls = [url for source in expand_sources(spec) for url in source]
    mine = rank_shards(urls, rank, world_size)
    loader = DataLoader(ValShards(mine, processor, pad_multiple=pad_multiple, batch_size=batch_size,
                                  max_samples=max_samples),
                        batch_size=None, collate_fn=_as_is, num_workers=min(num_workers, len(mine)),
                        generator=torch.Generator().manual_seed(0))  # the caller's global RNG stays untouched
    return evaluate(model, loader, processor.tokenizer, max_samples, num_captions, max_new_tokens, device,
                    captioning, rank=rank, world_size=world_size)


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], tokenizer, max_samples: int, num_captions: int, max_new_tokens: int,
             device, captioning: bool = True, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Figures of ``model`` (a VLModel) over this rank's finite validation ``batches`` (dicts of
    pixel_values/input_ids/attention_mask and optionally ``order``: (shard, position) per sample, else
    arrival order), over the first ``max_samples`` (0: all) samples of all ranks in that order.

    ``retrieval`` recall@1/5 both ways and, when the model was trained to caption (``captioning``),
    teacher-forced ``caption_loss`` and ``caption_token_acc`` (next-token accuracy on real caption
    tokens) and ``captions``: a few greedy captions with their reference. Every rank must call it;
    rank 0 gets the figures, the others ``{}``.
    """
    was_training = model.training
    model.eval()
    local: dict[str, list] = {"order": [], "image": [], "text": [], "caption": []}
    first = None  # rank 0's earliest batch: the sample captions come from it
    for batch in _lockstep(iter(batches), world_size, device):
        real = batch is not None
        batch = batch if real else _dummy_batch(model.config)
        px = batch["pixel_values"].to(device)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        image, text = model.encode_image(px).float().cpu(), model.encode_text(ids, mask).float().cpu()
        caption = _caption_counts(model, px, ids, mask) if captioning else None
        if not real:
            continue
        start = len(local["order"])
        order = batch.get("order") or [(0, start + i) for i in range(len(px))]
        local["order"] += order
        local["image"].append(image)
        local["text"].append(text)
        local["caption"].append(caption)
        if first is None or order[0] < first[0]:
            first = (order[0], px[:num_captions].cpu(), ids[:num_captions].cpu())
    samples = _gather(local, rank, world_size)
    out = _figures(samples, max_samples, captioning) if rank == 0 else {}
    if captioning and num_captions:
        out.update(_sample_captions(model, first, tokenizer, max_new_tokens, device, rank, world_size))
    model.train(was_training)
    return out


def _lockstep(batches: Iterator[dict], world_size: int, device) -> Iterator[dict | None]:
    """This rank's batches, then ``None`` while another rank still has one: every rank loops equally
    often (one all-reduce of a flag per loop)."""
    for batch in itertools.chain(batches, itertools.repeat(None)):
        if world_size > 1:
            busy = torch.tensor([float(batch is not None)], device=device)
            dist.all_reduce(busy)
            if busy.item() == 0:
                return
        elif batch is None:
            return
        yield batch


def _dummy_batch(config) -> dict[str, torch.Tensor]:
    """One black image and a ``BOS EOS`` caption: what a rank out of data embeds (and drops)."""
    ids = torch.tensor([[config.bos_token_id, config.eos_token_id]])  # (1, 2)
    return {"pixel_values": torch.zeros(1, 3, config.image_size, config.image_size), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def _caption_counts(model, px, ids, mask) -> torch.Tensor:
    """(B, 3) float64 per caption: summed next-token loss, correct tokens, predicted tokens (teacher forced)."""
    logits = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
    real = mask[:, 1:].bool()  # (B, T-1) positions with a real next token
    nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    correct = (logits.argmax(-1) == ids[:, 1:]) & real
    return torch.stack([(nll * real).sum(1), correct.sum(1), real.sum(1)], dim=1).double().cpu()


def _gather(local: dict[str, list], rank: int, world_size: int) -> dict[str, Any] | None:
    """Every rank's per-sample results, on rank 0 (None elsewhere), ordered by (shard, position)."""
    mine = {"order": local["order"],
            **{k: torch.cat(v) if v and v[0] is not None else None for k, v in local.items()
               if k in ("image", "text", "caption")}}
    parts = [mine]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    parts = [p for p in parts if p["order"]]
    if not parts:
        raise RuntimeError("the validation shards gave no sample; check data.val.")
    order = [o for p in parts for o in p["order"]]
    if len(set(order)) < len(order):
        raise RuntimeError("two ranks evaluated the same validation sample; every shard must go to one rank.")
    by_order = torch.tensor(sorted(range(len(order)), key=order.__getitem__))
    return {k: torch.cat([p[k] for p in parts])[by_order] if parts[0][k] is not None else None
            for k in ("image", "text", "caption")}


def _figures(samples: dict[str, Any], max_samples: int, captioning: bool) -> dict[str, Any]:
    n = min(max_samples or len(samples["image"]), len(samples["image"]))
    img, txt = samples["image"][:n], samples["text"][:n]
    out: dict[str, Any] = {"samples": n, **multi_caption_recall(img, txt, torch.arange(n), ks=(1, 5))}
    if captioning:
        loss_sum, correct, counted = samples["caption"][:n].sum(0).tolist()
        out.update(caption_loss=loss_sum / max(counted, 1), caption_token_acc=correct / max(counted, 1))
    return out


def _sample_captions(model, first, tokenizer, max_new_tokens: int, device, rank: int, world_size: int) -> dict:
    """Greedy captions of rank 0's first images, generated by every rank (in lockstep) on those images."""
    shared = [first[1:] if first is not None else None]
    if world_size > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        return {}
    pixels, refs = shared[0]
    generated = model.generate(pixels.to(device), max_new_tokens=max_new_tokens)
    if rank != 0:
        return {}
    return {"captions": [{"generated": g, "reference": r} for g, r in zip(
        tokenizer.batch_decode(generated, skip_special_tokens=True),
        tokenizer.batch_decode(refs, skip_special_tokens=True))]}
