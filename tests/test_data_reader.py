"""Shard reading details: compressed shards are whole, cut ones are counted as truncated."""

from __future__ import annotations

import gzip
import io
import tarfile

from tests.data_helpers import jpeg_bytes, tar_bytes
from vlpretrain.data.reader import SkipCounter, by_reason, iter_shard


def samples_tar(n: int) -> bytes:
    """A shard of ``n`` good samples s0..s{n-1} (a JPEG and a caption each)."""
    return tar_bytes([(f"s{i}.{ext}", data) for i in range(n)
                      for ext, data in (("jpg", jpeg_bytes(color=(10 * i, 0, 0))), ("txt", f"caption {i}".encode()))])


def test_intact_gzipped_shard_yields_every_sample_and_skips_none(tmp_path):
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(samples_tar(3)))
    skips = SkipCounter()
    assert [s.key for s in iter_shard(str(path), skips)] == ["s0", "s1", "s2"]
    assert by_reason(skips.take()) == {}


def test_cut_plain_shard_is_counted_as_truncated(tmp_path):
    whole = samples_tar(3)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        last = tar.getmembers()[-1]  # s2.txt: cut inside its data
    path = tmp_path / "shard.tar"
    path.write_bytes(whole[: last.offset_data + 3])
    skips = SkipCounter()
    keys = [s.key for s in iter_shard(str(path), skips)]
    assert keys == ["s0", "s1"] and by_reason(skips.take()) == {"truncated_tar": 1}


def test_resuming_a_shard_passes_over_read_groups_and_keeps_the_listed_ones(tmp_path):
    """``start``/``keep`` (a data position's task): groups before ``start`` are passed over (a local plain tar
    seeks, gzip and pipes read through) and neither yielded nor counted again, except those in ``keep``;
    their keys still count for duplicate detection."""
    members = []
    for key, parts in [("s0", "jt"), ("nocap", "j"), ("s2", "jt"), ("s3", "jt"), ("s4", "jt"), ("s0", "jt"),
                       ("s6", "jt")]:  # groups 0..6: 1 lacks a caption, 5 repeats key s0
        members += [(f"{key}.{'jpg' if p == 'j' else 'txt'}", jpeg_bytes() if p == "j" else key.encode())
                    for p in parts]
    data = tar_bytes(members)
    plain, packed = tmp_path / "shard.tar", tmp_path / "shard.tar.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    for url in (str(plain), str(packed), f"pipe:cat {plain}"):
        skips = SkipCounter()
        assert [(s.key, s.index) for s in iter_shard(url, skips)] == [("s0", 0), ("s2", 2), ("s3", 3), ("s4", 4),
                                                                      ("s6", 6)]
        assert by_reason(skips.take()) == {"missing_caption": 1, "duplicate_key": 1}
        assert [(s.key, s.index) for s in iter_shard(url, skips, start=4, keep=[2])] == [("s2", 2), ("s4", 4),
                                                                                         ("s6", 6)]
        assert by_reason(skips.take()) == {"duplicate_key": 1}  # group 5, after the start: counted
        assert [(s.key, s.index) for s in iter_shard(url, skips, start=None, keep=[0, 3])] == [("s0", 0), ("s3", 3)]
        assert by_reason(skips.take()) == {}
