"""The pre-training shard sets onecard downloads, and how many shards (and how much disk) a token
budget needs. Plain Python, no PyTorch and no network: the planner and the command line share it.

Every figure names its public source (docs/data.md lists them with their commits). Shard sizes and
characters per shard are averages for planning; a download reports the real sizes as it goes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from onecard.errors import UsageError
from onecard.model_config import ARCH_2026
from onecard.units import quantity

# Characters per token of nanochat's 65,536-token tokenizer on FineWeb-EDU: nanochat's own planning
# figure ("Assume our tokenizer is 4.8 chars/token"), karpathy/nanochat commit
# 00f1a3219d0dd945fada1c50182377c4c38ac5d4, speedrun.sh. Not measured here (no FineWeb on this
# machine); `onecard data download --chars-per-token` takes a measured one.
CHARS_PER_TOKEN = 4.8
HUGGING_FACE = "https://huggingface.co"
MANIFEST = "onecard-dataset.json"  # written by `onecard data download` in the shard folder
MANIFEST_FORMAT = "onecard-shards"


def hugging_face(url: str) -> str:
    """A Hugging Face URL through the mirror HF_ENDPOINT names, where it names one: the variable
    huggingface_hub reads for the same purpose (huggingface/huggingface_hub, constants.py: ENDPOINT)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    if not endpoint or not url.startswith(HUGGING_FACE):
        return url
    if not endpoint.lower().startswith(("http://", "https://")):
        raise UsageError(f"HF_ENDPOINT={endpoint!r} is not an http:// or https:// URL (a Hugging Face mirror)")
    return endpoint + url.removeprefix(HUGGING_FACE)


@dataclass(frozen=True)
class ShardSet:
    """A numbered set of parquet shards shard_00000.parquet ... whose last shard is the validation split."""

    name: str
    title: str
    base_url: str
    last: int  # index of the last shard: the validation shard
    shard_bytes: float  # average size on disk, for planning
    shard_chars: float  # average characters of text, for planning
    source: str  # where the figures come from

    def filename(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"

    @property
    def train_shards(self) -> int:
        return self.last  # shards 0 .. last-1

    def url(self, index: int, base_url: str | None = None) -> str:
        """The shard's URL: `base_url` is a folder URL, or a pattern with {index} / {name} in it."""
        base = base_url or hugging_face(self.base_url)
        if "{" in base:
            return base.format(index=index, name=self.filename(index))
        return f"{base.rstrip('/')}/{self.filename(index)}"

    def indices(self, train_shards: int) -> list[int]:
        """The validation shard first (a run needs it from the start), then training shards 0 .. n-1."""
        if not 0 < train_shards <= self.train_shards:
            raise UsageError(f"{self.name} has {self.train_shards:,} training shards (and 1 validation shard): "
                             f"ask for 1 to {self.train_shards:,}, not {train_shards:,}")
        return [self.last, *range(train_shards)]


# FineWeb-EDU, as nanochat repackaged it: 1,823 shuffled shards, shard_01822 the last.
# URL and count: karpathy/nanochat commit 030de3a71a80a3cf65fe406d8cd1115bf4a550fe, nanochat/dataset.py
# (BASE_URL, MAX_SHARD = 1822). ~250 M characters and ~100 MB a shard: karpathy/nanochat commit
# 00f1a3219d0dd945fada1c50182377c4c38ac5d4, speedrun.sh ("each data shard is ~250M chars",
# "each shard is ~100MB of text (compressed)").
FINEWEB_EDU = ShardSet(
    name="fineweb-edu", title="FineWeb-EDU (karpathy/fineweb-edu-100b-shuffle)",
    base_url=f"{HUGGING_FACE}/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
    last=1822, shard_bytes=100e6, shard_chars=250e6,
    source="nanochat dataset.py and speedrun.sh: 1,823 shards of ~250 M characters, ~100 MB each")

# ClimbMix, the set nanochat moved to in 2026: 6,543 shards, shard_06542 the pinned validation shard.
# URL and count: karpathy/autoresearch commit 00e01228eafead6563d9fbbafb11e1a3c9cfcdf3, prepare.py
# (BASE_URL, MAX_SHARD = 6542, VAL_SHARD = MAX_SHARD). Sizes are not published there: assumed like
# FineWeb-EDU's (400 B tokens / 6,543 shards = 61 M tokens, ~250 M characters at ~4 a token).
CLIMBMIX = ShardSet(
    name="climbmix", title="ClimbMix (karpathy/climbmix-400b-shuffle)",
    base_url=f"{HUGGING_FACE}/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
    last=6542, shard_bytes=100e6, shard_chars=250e6,
    source="autoresearch prepare.py: 6,543 shards; size per shard assumed like FineWeb-EDU's (estimate)")

SHARD_SETS = {s.name: s for s in (FINEWEB_EDU, CLIMBMIX)}


@dataclass(frozen=True)
class SingleFile:
    name: str
    url: str
    filename: str
    approx_bytes: float
    source: str

    def url_at(self, base_url: str | None = None) -> str:
        """The file's URL at a mirror, as --base-url names it for the shards: a folder URL, or a pattern
        with {name} (or {index}, 0) in it; a URL that ends in the file's suffix is the file itself."""
        if not base_url:
            return self.url
        if "{" in base_url:
            return base_url.format(index=0, name=self.filename)
        if urlsplit(base_url).path.endswith(Path(self.filename).suffix):
            return base_url
        return f"{base_url.rstrip('/')}/{self.filename}"


# The CORE evaluation bundle (22 tasks, DCLM's): karpathy/nanochat scripts/base_eval.py, EVAL_BUNDLE_URL
# ("~162MB of data needed to evaluate the CORE metric"); the copy read carried no commit id.
EVAL_BUNDLE = SingleFile(name="eval-bundle", url="https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip",
                         filename="eval_bundle.zip", approx_bytes=162e6,
                         source="nanochat scripts/base_eval.py EVAL_BUNDLE_URL (~162 MB)")



@dataclass(frozen=True)
class FileSet:
    """Files of a Hugging Face dataset, fetched as they are and kept under the same paths: the
    conversations `onecard sft` trains on and the task splits `onecard eval` scores."""

    name: str
    title: str
    repo: str  # the Hugging Face dataset
    files: tuple[str, ...]  # paths in the repository
    columns: tuple[tuple[str, ...], ...]  # a complete file has one of these sets of columns
    approx_bytes: float  # a rough estimate for the up-front disk check and progress, until the server says
    use: str

    def url(self, path: str, base_url: str | None = None) -> str:
        """A file's URL: `base_url` is a mirror's folder URL, or a pattern with {name} (the path) in it."""
        base = base_url or hugging_face(f"{HUGGING_FACE}/datasets/{self.repo}/resolve/main")
        if "{" in base:
            return base.format(index=self.files.index(path), name=path)
        return f"{base.rstrip('/')}/{path}"


# The sets nanochat's chat stages read through Hugging Face `datasets` (karpathy/nanochat, scripts/
# mid_train.py: SmolTalk train, MMLU auxiliary_train, GSM8K train; scripts/chat_sft.py: ARC-Easy and
# ARC-Challenge train, GSM8K train, 10K rows of SmolTalk; scripts/chat_eval.py: the test splits), as
# the parquet files those datasets publish. File paths: the datasets' repositories on Hugging Face
# (HuggingFaceTB/smol-smoltalk data/, allenai/ai2_arc ARC-Easy/ and ARC-Challenge/, cais/mmlu all/ and
# auxiliary_train/, openai/gsm8k main/). Sizes are onecard's rough estimates, not published figures.
SMOLTALK = FileSet(
    name="smoltalk", title="SmolTalk (HuggingFaceTB/smol-smoltalk)", repo="HuggingFaceTB/smol-smoltalk",
    files=(*(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)), "data/test-00000-of-00001.parquet"),
    columns=(("messages",),), approx_bytes=1.0e9,
    use="general conversations for SFT: `onecard sft --data data/smoltalk` (its train files)")
ARC = FileSet(
    name="arc", title="ARC (allenai/ai2_arc)", repo="allenai/ai2_arc",
    files=tuple(f"{subset}/{split}-00000-of-00001.parquet" for subset in ("ARC-Easy", "ARC-Challenge")
                for split in ("train", "test")),
    columns=(("question", "choices", "answerKey"),), approx_bytes=2e6,
    use="multiple choice: SFT reads the train files, `onecard eval` the test files")
MMLU = FileSet(
    name="mmlu", title="MMLU (cais/mmlu)", repo="cais/mmlu",
    files=("all/test-00000-of-00001.parquet", "auxiliary_train/train-00000-of-00001.parquet"),
    columns=(("question", "choices", "answer"), ("train",)), approx_bytes=60e6,
    use="multiple choice: SFT reads auxiliary_train, `onecard eval` all/test")
GSM8K = FileSet(
    name="gsm8k", title="GSM8K (openai/gsm8k)", repo="openai/gsm8k",
    files=("main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"),
    columns=(("question", "answer"),), approx_bytes=5e6,
    use="arithmetic with the calculator: SFT reads the train file, `onecard eval` the test file")
FILE_SETS = {s.name: s for s in (ARC, MMLU, GSM8K, SMOLTALK)}  # the small ones first
CHAT_DATA = "chat"  # every file set, each into its own folder

DATASETS = [*SHARD_SETS, EVAL_BUNDLE.name, *FILE_SETS, CHAT_DATA]


def check_base_url(url: str) -> None:
    """A mirror's URL: http(s), and a pattern that names only {index} and {name}."""
    if not url.lower().startswith(("http://", "https://")):
        raise UsageError(f"--base-url {url!r} is not an http:// or https:// URL")
    try:
        example = url.format(index=0, name="shard_00000.parquet")
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:  # {index[0]}, {index.x}
        raise UsageError(f"--base-url {url!r}: a pattern may name only {{index}} and {{name}} ({e})") from None
    try:
        host = urlsplit(example).hostname
    except ValueError as e:  # a malformed host, such as an unclosed IPv6 bracket
        raise UsageError(f"--base-url {url!r} is not a valid URL ({e})") from None
    if not host:
        raise UsageError(f"--base-url {url!r} names no host")


def find(name: str) -> ShardSet | SingleFile | FileSet | str:
    """The dataset of that name; CHAT_DATA (a string) for every file set."""
    key = name.strip().lower()
    if key in SHARD_SETS:
        return SHARD_SETS[key]
    if key == EVAL_BUNDLE.name:
        return EVAL_BUNDLE
    if key in FILE_SETS:
        return FILE_SETS[key]
    if key == CHAT_DATA:
        return CHAT_DATA
    raise UsageError(f"unknown dataset {name!r}: onecard downloads {', '.join(DATASETS)}")


@dataclass(frozen=True)
class ShardPlan:
    """How many shards a token budget reads: tokens x characters per token / characters per shard."""

    shard_set: ShardSet
    tokens: float
    chars_per_token: float
    train_shards: int  # capped at what the set holds
    wanted: int  # before the cap

    @property
    def chars(self) -> float:
        return self.tokens * self.chars_per_token

    @property
    def shards(self) -> int:
        return self.train_shards + 1  # the validation shard

    @property
    def bytes(self) -> float:
        return self.shards * self.shard_set.shard_bytes

    def line(self) -> str:
        """One line for `plan` and `train --dry-run`."""
        s = self.shard_set
        borrowed = s is not FINEWEB_EDU and self.chars_per_token == CHARS_PER_TOKEN
        assumed = " (FineWeb-EDU's, assumed)" if borrowed else ""
        sized = " (estimate)" if "estimate" in s.source else ""
        text = (f"{self.tokens:.3g} tokens x {self.chars_per_token:g} chars/token{assumed} = {self.chars:.3g} "
                f"characters = {quantity(self.train_shards, s.name + ' shard')} + 1 validation shard, about "
                f"{format_bytes(self.bytes)} (~{s.shard_chars / 1e6:.0f} M characters, ~{format_bytes(s.shard_bytes)} "
                f"a shard{sized})")
        if self.wanted > self.train_shards:
            text += (f"; the set holds only {s.train_shards:,} training shards, so the run repeats them "
                     f"{self.wanted / s.train_shards:.1f} times")
        return text

    def coverage(self, corpus) -> str:
        """How a downloaded shard folder (a Corpus with a validation shard) measures up, or ''."""
        if not getattr(corpus, "val_names", None):
            return ""
        have = sum(1 for n, kind in zip(corpus.names, corpus.kinds, strict=True)
                   if kind == "parquet" and n not in corpus.val_names)
        if have >= self.train_shards:
            return f"; the corpus holds {have:,} training shards: enough"
        return (f"; the corpus holds {have:,} training shards, so the run would read them "
                f"{self.train_shards / max(have, 1):.1f} times (`onecard data download {self.shard_set.name} "
                f"--shards {self.train_shards}` fetches the rest)")


def shard_set_for(arch: str, folder: str | Path | None = None) -> ShardSet:
    """The set a run reads: the one its shard folder's manifest names, else its family's own
    (nanochat-2026 trains on ClimbMix, as nanochat has since 2026; the classic on FineWeb-EDU)."""
    if folder is not None and Path(folder).is_dir():
        named = (read_manifest(Path(folder)) or {}).get("dataset")
        if named in SHARD_SETS:
            return SHARD_SETS[named]
    return CLIMBMIX if arch == ARCH_2026 else FINEWEB_EDU


def plan_shards(tokens: float, shard_set: ShardSet = FINEWEB_EDU,
                chars_per_token: float = CHARS_PER_TOKEN) -> ShardPlan:
    if not (math.isfinite(tokens) and tokens > 0):
        raise UsageError(f"a token budget must be a positive number, got {tokens!r}")
    if not (math.isfinite(chars_per_token) and 0.5 <= chars_per_token <= 64):
        raise UsageError(f"characters per token must be between 0.5 and 64, got {chars_per_token!r}")
    wanted = max(1, math.ceil(tokens * chars_per_token / shard_set.shard_chars))
    return ShardPlan(shard_set, float(tokens), chars_per_token, min(wanted, shard_set.train_shards), wanted)


def format_bytes(n: float) -> str:
    """Decimal units, as disks are sold, three significant digits: 21.7 GB, 100 MB, 1.5 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- the manifest of a shard folder

def read_manifest(folder: Path) -> dict | None:
    """The shard folder's manifest (which set, which shard is validation), or None if it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}): delete it and rerun `onecard data download`") from None
    if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT
            or not isinstance(data.get("validation"), list)
            or not all(isinstance(n, str) for n in data["validation"])):
        raise UsageError(f"{path} is not an onecard shard manifest: delete it and rerun `onecard data download`")
    return data


def write_manifest(folder: Path, data: dict) -> None:
    """Atomically: a crash leaves the old manifest or the new one, never half of one."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, **data}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
