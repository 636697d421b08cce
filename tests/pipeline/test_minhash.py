"""FastMinhashSignature writes exactly datatrove's MinHash signature files, only faster."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig

from pipeline.minhash import BATCH_DOCS, BLOCK_ROWS, FastMinhashSignature, strip_marks
from pipeline.steps import SpaceWordTokenizer

WORDS = ("the cat sat on a mat Zürich naïve café résumé Ångström 1999 3,14 ١٢٣ Monday "
         "東京は晴れ Ελληνικά кириллица x\u0301y o\u0308 \u2003 tab\there new\nline "
         "emoji🙂 ¿qué? «quote» (paren) e-mail C++ 100% $5").split(" ")  # fmt: skip


def _docs() -> list[Document]:
    rng = random.Random(7)
    texts = [
        "",
        "too short here",  # fewer words than one n-gram: no signature, index still counted
        "one two three four five",  # exactly one n-gram
        " \u0301 a \u0301 b c d e f",  # a lone mark between spaces leaves an empty gap
        "ÀÉÎÕÜ àéîõü ǅ ﬁ ﬀ Ⅻ ① ² ½ \x1c\x1d\x1e\x1f separators \u2028 \u2029 end",
        " ".join(rng.choice(WORDS) for _ in range(BLOCK_ROWS * 2 + 17)),  # several blocks
    ]
    texts += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    texts += texts[10:20]  # exact copies: equal signatures sort by document index
    assert len(texts) > BATCH_DOCS  # more than one batch write per bucket
    return [Document(text=t, id=str(i)) for i, t in enumerate(texts)]


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.sig"))}


@pytest.mark.parametrize(
    "hash_config",
    [HashConfig(), HashConfig(precision=32, hash_fc="sha1")],
    ids=["xxhash64", "sha1-32"],
)
def test_signature_files_are_byte_identical_to_datatrove(tmp_path, hash_config):
    cfg = MinhashConfig(num_buckets=3, hashes_per_bucket=4, hash_config=hash_config, seed=3)
    ref = MinhashDedupSignature(str(tmp_path / "ref"), cfg, language=SpaceWordTokenizer())
    ref.run(iter(_docs()), rank=2)
    fast = FastMinhashSignature(str(tmp_path / "fast"), cfg)
    fast.run(iter(_docs()), rank=2)
    ref_files, fast_files = _files(tmp_path / "ref"), _files(tmp_path / "fast")
    assert sorted(fast_files) == [f"bucket_00{b}/00002.minhash.sig" for b in range(3)]
    assert fast_files == ref_files
    assert fast.stats["total"].total == len(_docs())


def test_no_documents_gives_empty_bucket_files(tmp_path):
    fast = FastMinhashSignature(str(tmp_path), MinhashConfig(num_buckets=2))
    fast.run(iter(()), rank=0)
    assert {k: len(v) for k, v in _files(tmp_path).items()} == {
        "bucket_000/00000.minhash.sig": 0, "bucket_001/00000.minhash.sig": 0,
    }  # fmt: skip


def test_strip_marks_removes_only_nonspacing_marks():
    assert strip_marks("café naïve") == "cafe naive"
    assert strip_marks("x\u0301y") == "xy"
    assert strip_marks("ﬁ ½ 東京") == "ﬁ ½ 東京"  # NFD (not NFKD): compatibility forms stay


def test_min_hashes_exact_when_a_product_folds_to_p_or_more(tmp_path):
    """The shift-and-mask modulus needs a correction for values that fold to >= 2^61 - 1."""
    cfg = MinhashConfig()
    ref = MinhashDedupSignature(str(tmp_path / "ref"), cfg, language=SpaceWordTokenizer())
    fast = FastMinhashSignature(str(tmp_path / "fast"), cfg)
    col = next(j for j in range(fast.num_hashes) if int(fast.parameters[0][0, j]) % 2)
    a, b = (int(x[0, col]) for x in fast.parameters)  # a odd: invertible mod 2^64
    # the shingle whose hash in column ``col`` is 2^64 - 1 before the modulus
    worst = (2**64 - 1 - b) * pow(a, -1, 2**64) % 2**64
    shingles = np.array([worst, 12345, 2**63 + 5], dtype=np.uint64)
    expected = np.concatenate(ref.get_signature(shingles.reshape(-1, 1)))
    assert (fast.min_hashes(shingles) == expected).all()
    assert (fast.min_hashes(shingles[1:]) == np.concatenate(
        ref.get_signature(shingles[1:].reshape(-1, 1)))).all()  # fmt: skip
