"""Training data: text in, packed token sequences out, as memory-mapped shards.

`prepare_data` streams each source of a blend (a hub dataset, local `.txt` / `.jsonl` / `.parquet` files, an
`s3://` prefix, the built-in offline corpus `python-docs`, or a dataset prepared before), shuffles documents in a
bounded buffer, tokenizes them in batches (in `num_proc` worker processes), joins them with EOS and packs them into
sequences of exactly `seq_len` tokens. A `.txt` file's documents are its blank-line separated paragraphs (or its
lines: `sample_by`), read a line at a time and cut at `MAX_DOCUMENT_CHARS`: a large file is many documents, never
held whole. The sequences go to shard files of raw token ids (`<source>/<split>-NNNNN.bin`, the smallest unsigned
integer type that holds the vocabulary), listed with their sizes and sha256 in `index.json`.
Memory holds one batch of documents and one sequence per split, whatever the corpus size; a preparation killed at
any point and started again with the same command resumes after its last finished shard and writes the same files.

Validation is held out by whole documents: a document goes to validation when validation holds less than
`val_fraction` of the source's tokens read so far, so no document is split between the two and the held-out share
is exact to within one document.

With a store (a directory on a volume every step mounts, or an `s3://` prefix) the shards are published once
under `<store>/<digest>/`, named by what was prepared (a later preparation of the same settings reuses them), and
the output is a small reference: the manifest and an `index.json` that gives the shards' location and their sizes
and sha256. A pipeline's dataset artifact then stays a few KB however large the corpus, and no step downloads the
shards as a KFP input.

Readers (`load_packed`) memory-map the shards: in place, or, for shards on S3, after fetching them once into the
cache (`storage.localize`: a node fetches only what it lacks, under a file lock). A split is a map-style dataset
over the blend: each source gets its weight's share of the split's sequences (a source whose share exceeds its
size repeats, a smaller share takes a seeded sample), interleaved evenly, so any stretch of the split holds the
sources in proportion. The Trainer's sampler shuffles and shards that index over the processes; each shard's
sha256 is checked the first time a process reads it.

The package, one job a module: `pydocs` (the built-in corpus), `sources` (streaming each source), `tokenizing`
(the tokenizer pool), `writer` (the shard writer and its resume), `blend` (blend arithmetic), `prepare` (the step),
`reader` (the memory-mapped reader); `format` holds what they share. This face hands on their public names.
"""

from secateurs.data.blend import blend_counts, blend_index
from secateurs.data.format import FORMAT, INDEX, SPLITS, DataError, token_dtype, tokenizer_identity
from secateurs.data.prepare import PROGRESS, prepare_data
from secateurs.data.pydocs import python_docs_texts
from secateurs.data.reader import PackedDataset, PackedSplit, check_matches, load_packed, shard_root
from secateurs.data.sources import (
    BUILTIN_CORPORA,
    LOCAL_FORMATS,
    MAX_DOCUMENT_CHARS,
    documents,
    text_file_documents,
)
from secateurs.data.tokenizing import encode

__all__ = [
    "BUILTIN_CORPORA",
    "DataError",
    "FORMAT",
    "INDEX",
    "LOCAL_FORMATS",
    "MAX_DOCUMENT_CHARS",
    "PROGRESS",
    "PackedDataset",
    "PackedSplit",
    "SPLITS",
    "blend_counts",
    "blend_index",
    "check_matches",
    "documents",
    "encode",
    "load_packed",
    "prepare_data",
    "python_docs_texts",
    "shard_root",
    "text_file_documents",
    "token_dtype",
    "tokenizer_identity",
]
