"""Shard reading details: compressed shards are whole, cut ones are counted as truncated."""

from __future__ import annotations

import gzip
import io
import tarfile

from tests.data_helpers import jpeg_bytes
from vlpretrain.data.reader import SkipCounter, by_reason, iter_shard


def tar_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("jpg", jpeg_bytes(color=(10 * i, 0, 0))), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_intact_gzipped_shard_yields_every_sample_and_skips_none(tmp_path):
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(3)))
    skips = SkipCounter()
    assert [s.key for s in iter_shard(str(path), skips)] == ["s0", "s1", "s2"]
    assert by_reason(skips.take()) == {}


def test_cut_plain_shard_is_counted_as_truncated(tmp_path):
    whole = tar_bytes(3)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        last = tar.getmembers()[-1]  # s2.txt: cut inside its data
    path = tmp_path / "shard.tar"
    path.write_bytes(whole[: last.offset_data + 3])
    skips = SkipCounter()
    keys = [s.key for s in iter_shard(str(path), skips)]
    assert keys == ["s0", "s1"] and by_reason(skips.take()) == {"truncated_tar": 1}
